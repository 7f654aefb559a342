//! Model code: one file per model part, weights mapped once by their diffusers names.
pub mod clip;
pub mod cogvideox;
pub mod error;
pub mod flux;
pub mod nn;
pub mod pixels;
pub mod rng;
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

/// `dir/model_index.json` must name pipeline `class` and, for each component, one of the
/// accepted `(library, class)` entries.
pub fn check_model_index(dir: &Path, class: &str, components: &[(&str, &[&str])]) -> Result<()> {
    let path = dir.join("model_index.json");
    let index: Value = weights::read_json(&path)?;
    let named = index.get("_class_name").and_then(Value::as_str);
    if named != Some(class) {
        return Err(ModelError::UnknownClass {
            path,
            class: named.unwrap_or("<missing>").to_owned(),
            expected: class.to_owned(),
        });
    }
    for &(name, accepted) in components {
        let entry = index
            .get(name)
            .and_then(Value::as_array)
            .and_then(|e| e.get(1))
            .and_then(Value::as_str);
        match entry {
            Some(c) if accepted.contains(&c) => {}
            Some(c) => {
                return Err(ModelError::config(
                    &path,
                    name,
                    format!("class `{c}` is not supported (expected one of {accepted:?})"),
                ))
            }
            None => return Err(ModelError::config(&path, name, "missing component entry")),
        }
    }
    Ok(())
}

/// How a pipeline is loaded, beyond its folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Decode in overlapping tiles (video models; diffusers' `vae.enable_tiling()`).
    pub vae_tiling: bool,
}

/// Loads a diffusers pipeline folder with the family its `model_index.json` names.
pub fn load_pipeline(dir: &Path, device: Device, kind: Kind) -> Result<Box<dyn AnyPipeline>> {
    load_pipeline_with(dir, device, kind, LoadOptions::default())
}

/// [`load_pipeline`] with options; an option the family does not have is a config error.
pub fn load_pipeline_with(
    dir: &Path,
    device: Device,
    kind: Kind,
    options: LoadOptions,
) -> Result<Box<dyn AnyPipeline>> {
    let index_path = dir.join("model_index.json");
    let index: Value = weights::read_json(&index_path)?;
    match index.get("_class_name").and_then(Value::as_str) {
        Some(flux::pipeline::PIPELINE_CLASS) => {
            if options.vae_tiling {
                return Err(ModelError::config(
                    &index_path,
                    "vae_tiling",
                    "tiled decoding is implemented for video models only",
                ));
            }
            Ok(Box::new(flux::pipeline::FluxPipeline::load(
                dir, device, kind,
            )?))
        }
        Some(cogvideox::pipeline::PIPELINE_CLASS) => Ok(Box::new(
            cogvideox::pipeline::CogVideoXPipeline::load(dir, device, kind, options.vae_tiling)?,
        )),
        other => Err(ModelError::UnknownClass {
            path: index_path,
            class: other.unwrap_or("<missing>").to_owned(),
            expected: format!(
                "{} or {}",
                flux::pipeline::PIPELINE_CLASS,
                cogvideox::pipeline::PIPELINE_CLASS
            ),
        }),
    }
}
