//! The family-neutral denoiser contract that model families, cache strategies and the engine meet
//! in. It depends only on `tch`: families implement it, caches and the engine consume it, and
//! neither side imports the other.
//!
//! - [`hooks`]: the interceptable modules of a transformer forward and the strategies' decisions.
//! - [`layout`]: each family's token ↔ latent-grid conversion.
//! - [`pipeline`]: the trait the engine drives (describe, prepare, step, decode, preview, cost).
//! - [`request`]: the validated domain request a generation is prepared from.
pub mod hooks;
pub mod layout;
pub mod pipeline;
pub mod request;
