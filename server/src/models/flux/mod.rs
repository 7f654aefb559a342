//! FLUX.1 (dev and schnell): the MMDiT transformer of black-forest-labs as diffusers implements it.
pub mod config;
pub mod embeddings;
pub mod packing;
pub mod transformer;
