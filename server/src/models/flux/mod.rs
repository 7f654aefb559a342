//! FLUX.1 (dev and schnell): the MMDiT transformer of black-forest-labs and `FluxPipeline`, as
//! diffusers implements them.
pub mod config;
pub mod embeddings;
pub mod packing;
pub mod pipeline;
pub mod transformer;
