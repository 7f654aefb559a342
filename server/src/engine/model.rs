//! A model loaded on the engine: the pipeline plus how the API describes it.
use denoised_proto::v1 as pb;
use tch::{Device, Kind};

use super::device::{device_name, dtype_name};
use crate::cache;
use crate::config::ModelEntry;
use crate::models::weights::read_json;
use crate::models::Result;
use crate::pipeline::flux::FluxPipeline;
use crate::pipeline::preview::LatentRgb;

/// Serving defaults a model folder may ship in `denoised.json` (diffusers ignores the file). A
/// FLUX pipeline has no place for them: FluxPipeline defaults to 1024² whatever the model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServingDefaults {
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    guidance: Option<f32>,
}

impl ServingDefaults {
    fn load(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("denoised.json");
        if path.is_file() {
            read_json(&path)
        } else {
            Ok(Self::default())
        }
    }
}

pub struct LoadedModel {
    pub info: pb::ModelInfo,
    pub pipeline: FluxPipeline,
    pub max_sequence_length: usize,
    pub latent_rgb: LatentRgb,
}

impl LoadedModel {
    pub fn load(entry: &ModelEntry, device: Device, kind: Kind) -> Result<Self> {
        let pipeline = FluxPipeline::load(&entry.path, device, kind)?;
        let spec = pipeline.spec();
        let defaults = ServingDefaults::load(&entry.path)?;
        let info = pb::ModelInfo {
            name: entry.name.clone(),
            family: "flux".into(),
            variant: if spec.guidance_embeds {
                "flux-dev"
            } else {
                "flux-schnell"
            }
            .into(),
            conditioning: pb::Conditioning::Text as i32,
            default_width: defaults.width.unwrap_or(spec.default_width as u32),
            default_height: defaults.height.unwrap_or(spec.default_height as u32),
            size: Some(pb::Range {
                min: spec.size_multiple as u32,
                max: 2048,
            }),
            size_multiple: spec.size_multiple as u32,
            default_steps: defaults
                .steps
                .unwrap_or(if spec.guidance_embeds { 28 } else { 4 }),
            steps: Some(pb::Range { min: 1, max: 1000 }),
            default_guidance: defaults.guidance.unwrap_or(if spec.guidance_embeds {
                3.5
            } else {
                0.0
            }),
            guidance: Some(pb::FloatRange {
                min: 0.0,
                max: 100.0,
            }),
            guidance_embeds: spec.guidance_embeds,
            supports_true_cfg: true,
            dtype: dtype_name(kind).into(),
            device: device_name(device),
            supported_caches: cache::supported_kinds()
                .into_iter()
                .map(|k| k as i32)
                .collect(),
            num_blocks: (spec.num_dual_blocks + spec.num_single_blocks) as u32,
        };
        Ok(Self {
            info,
            max_sequence_length: entry
                .max_sequence_length
                .unwrap_or_else(|| pipeline.default_max_sequence_length()),
            latent_rgb: LatentRgb::for_channels(spec.latent_channels),
            pipeline,
        })
    }
}
