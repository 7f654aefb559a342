//! CogVideoX (text-to-video) model parts.
pub mod scheduler;
pub mod vae;
