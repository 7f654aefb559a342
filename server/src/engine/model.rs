//! A model loaded on the engine: the pipeline plus how the API describes it.
use denoised_proto::v1 as pb;
use tch::{Device, Kind};

use super::device::{device_name, dtype_name};
use crate::cache;
use crate::cache::hooks::{BlockKind, ModuleCounts, StepStats};
use crate::config::ModelEntry;
use crate::models::Result;
use crate::pipeline::flux::FluxPipeline;
use crate::pipeline::preview::LatentRgb;

/// FluxPipeline's default T5 token budget.
const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

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
            default_width: spec.default_width as u32,
            default_height: spec.default_height as u32,
            size: Some(pb::Range {
                min: spec.size_multiple as u32,
                max: 2048,
            }),
            size_multiple: spec.size_multiple as u32,
            default_steps: if spec.guidance_embeds { 28 } else { 4 },
            steps: Some(pb::Range { min: 1, max: 1000 }),
            default_guidance: if spec.guidance_embeds { 3.5 } else { 0.0 },
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
                .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH),
            latent_rgb: LatentRgb::for_channels(spec.latent_channels),
            pipeline,
        })
    }

    /// Estimated transformer FLOPs (2 per multiply-add) of one step (all its forwards) and the
    /// part the cache saved: skipped forwards save every block, skipped blocks their own cost, and reused or
    /// predicted attention the attention module's cost. Dual- and single-stream blocks cost the
    /// same to first order, so skipped blocks are costed as the average block.
    pub fn step_flops(
        &self,
        image_tokens: usize,
        text_tokens: usize,
        stats: &StepStats,
    ) -> (f64, f64) {
        let t = self.pipeline.transformer();
        let (l_img, l_txt) = (image_tokens as i64, text_tokens as i64);
        let spec_blocks = [
            (BlockKind::Dual, t.config().num_layers),
            (BlockKind::Single, t.config().num_single_layers),
        ];
        let per_forward: f64 = 2.0
            * spec_blocks
                .iter()
                .map(|&(kind, n)| n as f64 * t.block_flops(kind, l_img, l_txt))
                .sum::<f64>();
        let average_block = per_forward / t.num_blocks().max(1) as f64;
        let not_computed = |c: &ModuleCounts| (c.total() - c.computed) as f64;
        let total = stats.forwards.total() as f64 * per_forward;
        let saved = not_computed(&stats.forwards) * per_forward
            + not_computed(&stats.blocks) * average_block
            + not_computed(&stats.attention) * 2.0 * t.attention_flops(l_img, l_txt);
        (total, saved.min(total))
    }
}
