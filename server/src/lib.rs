//! denoised: diffusion transformers on libtorch behind a gRPC API, with per-session step caches.
//!
//! Request path: [`api`] turns the wire request into a domain request and hands an
//! [`engine::Job`] to the [`engine`] thread, which owns the [`models`] as family-neutral
//! [`dit::pipeline`]s and runs the session's [`cache`] strategy at every step; [`session`] holds
//! what a client opened; [`server`] wires it all to tonic. Model families and cache strategies meet
//! only in the [`dit`] contract.
pub mod api;
pub mod cache;
pub mod config;
pub mod dit;
pub mod engine;
pub mod error;
pub mod media;
pub mod models;
pub mod server;
pub mod session;
pub mod telemetry;
