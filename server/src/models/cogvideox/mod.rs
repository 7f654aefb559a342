//! CogVideoX text-to-video (2b, 5b and 1.5 variants) as diffusers implements it.
pub mod config;
pub mod embeddings;
pub mod transformer;
