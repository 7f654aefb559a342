//! Model code: one file per model part, weights mapped once by their diffusers names.
pub mod clip;
pub mod cogvideox;
pub mod error;
pub mod flux;
pub mod nn;
pub mod pixels;
pub mod scheduler;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod weights;

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind};

pub use error::{ModelError, Result};

use crate::dit::pipeline::AnyPipeline;

/// Loads a diffusers pipeline folder with the family its `model_index.json` names.
pub fn load_pipeline(dir: &Path, device: Device, kind: Kind) -> Result<Box<dyn AnyPipeline>> {
    let index_path = dir.join("model_index.json");
    let index: Value = weights::read_json(&index_path)?;
    match index.get("_class_name").and_then(Value::as_str) {
        Some(flux::pipeline::PIPELINE_CLASS) => Ok(Box::new(flux::pipeline::FluxPipeline::load(
            dir, device, kind,
        )?)),
        other => Err(ModelError::UnknownClass {
            path: index_path,
            class: other.unwrap_or("<missing>").to_owned(),
            expected: flux::pipeline::PIPELINE_CLASS.to_owned(),
        }),
    }
}
