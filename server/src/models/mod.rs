//! Model code: one file per model part, weights mapped once by their diffusers names.
pub mod clip;
pub mod cogvideox;
pub mod error;
pub mod flux;
pub mod scheduler;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};
