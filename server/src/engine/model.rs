//! A model loaded on the engine: its pipeline plus how the server describes it.
use std::path::Path;

use tch::{Device, Kind};

use super::device::{device_name, dtype_name};
use crate::cache::CacheKind;
use crate::config::ModelEntry;
use crate::dit::pipeline::{AnyPipeline, ModelCard};
use crate::models::weights::read_json;
use crate::models::{self, Result};

/// Serving defaults a model folder may ship in `denoised.json` (diffusers ignores the file). A
/// diffusers pipeline has no place for them: FluxPipeline defaults to 1024² whatever the model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServingDefaults {
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    guidance: Option<f32>,
}

impl ServingDefaults {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("denoised.json");
        if path.is_file() {
            read_json(&path)
        } else {
            Ok(Self::default())
        }
    }
}

/// What the async side knows of a served model.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    /// The pipeline's card with the serving overrides applied.
    pub card: ModelCard,
    pub device: String,
    pub dtype: String,
    pub supported_caches: Vec<CacheKind>,
}

pub struct LoadedModel {
    pub info: ServedModel,
    pub pipeline: Box<dyn AnyPipeline>,
}

impl LoadedModel {
    pub fn load(entry: &ModelEntry, device: Device, kind: Kind) -> Result<Self> {
        let options = models::LoadOptions {
            vae_tiling: entry.vae_tiling,
        };
        let pipeline = models::load_pipeline_with(&entry.path, device, kind, options)?;
        let defaults = ServingDefaults::load(&entry.path)?;
        let mut card = pipeline.card().clone();
        card.default_width = defaults.width.unwrap_or(card.default_width);
        card.default_height = defaults.height.unwrap_or(card.default_height);
        card.default_steps = defaults.steps.unwrap_or(card.default_steps);
        card.default_guidance = defaults.guidance.unwrap_or(card.default_guidance);
        card.max_sequence_length = entry
            .max_sequence_length
            .unwrap_or(card.max_sequence_length);
        let info = ServedModel {
            name: entry.name.clone(),
            device: device_name(card.device),
            dtype: dtype_name(card.kind).into(),
            card,
            supported_caches: CacheKind::ALL.to_vec(),
        };
        Ok(Self { info, pipeline })
    }
}
