//! Pipelines: prompt encoding, the denoising loop one step at a time, decoding to pixels.
pub mod flux;
pub mod preview;
