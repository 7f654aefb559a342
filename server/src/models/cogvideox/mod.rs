//! CogVideoX text-to-video (2b, 5b and 1.5 variants) as diffusers implements it: the video
//! transformer, the causal 3D VAE and the DDIM / DPM schedulers.
pub mod config;
pub mod embeddings;
pub mod pipeline;
pub mod scheduler;
pub mod transformer;
pub mod vae;
