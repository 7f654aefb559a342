//! denoised: diffusion transformers on libtorch behind a gRPC API, with per-session step caches.
//!
//! Request path: [`api`] validates and hands a [`engine::Job`] to the [`engine`] thread, which owns
//! the [`models`] through a [`pipeline`] and runs the session's [`cache`] strategy at every step;
//! [`session`] holds what a client opened; [`server`] wires it all to tonic.
pub mod api;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod models;
pub mod pipeline;
pub mod server;
pub mod session;
pub mod telemetry;
