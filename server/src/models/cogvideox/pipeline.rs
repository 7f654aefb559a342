//! CogVideoX text-to-video, as diffusers' `CogVideoXPipeline` runs it, one denoising step at a
//! time: T5 prompt embeddings (`[negative; positive]` under classifier-free guidance, the negative
//! prompt empty by default), seeded latents `[1, F, C, h, w]`, ONE batched transformer forward per
//! step for both CFG halves, `uncond + g·(cond − uncond)` (with the optional dynamic schedule of
//! `g`), the DDIM or DPM step, and the causal 3D VAE decode.
//!
//! Every op repeats diffusers' in order and dtype, so fp32 CPU runs match it. The DPM scheduler
//! draws fresh noise every step from the pipeline's seeded generator; the generation replays that
//! stream ([`NoiseStream`]) so the same seed gives diffusers' video even while other generations
//! draw in between.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::scheduler::{CogVideoXScheduler, CogVideoXSchedulerConfig, SchedulerKind};
use super::transformer::{CogVideoXTransformer, Positions};
use super::vae::{AutoencoderKLCogVideoX, Tiling};
use crate::dit::hooks::{Branch, CfgRows, ForwardContext, StepStats, TransformerHooks};
use crate::dit::layout::LatentLayout;
use crate::dit::pipeline::{
    Frames, ModelCard, Pipeline, Progress, StepCost, StepOutput, VideoCard,
};
use crate::dit::request::{GenerationRequest, PreviewKind};
use crate::models::pixels::{to_rgb8, LatentRgb};
use crate::models::rng::with_seeded_cpu_rng;
use crate::models::t5::T5EncoderModel;
use crate::models::tokenizer::T5Tokenizer;
use crate::models::weights::read_json;
use crate::models::{check_model_index, ModelError, Result};

/// The diffusers pipeline class `model_index.json` must name.
pub const PIPELINE_CLASS: &str = "CogVideoXPipeline";

/// Components and the classes accepted for each in `model_index.json`.
const COMPONENTS: [(&str, &[&str]); 5] = [
    (
        "scheduler",
        &["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"],
    ),
    ("text_encoder", &["T5EncoderModel"]),
    ("tokenizer", &["T5Tokenizer", "T5TokenizerFast"]),
    ("transformer", &["CogVideoXTransformer3DModel"]),
    ("vae", &["AutoencoderKLCogVideoX"]),
];

/// CogVideoXPipeline's defaults.
const DEFAULT_STEPS: u32 = 50;
const DEFAULT_GUIDANCE: f32 = 6.0;
/// `max_sequence_length` of `__call__` (the T5 budget of the released models).
const MAX_SEQUENCE_LENGTH: usize = 226;
/// The frame rate CogVideoX's examples export at (`export_to_video(..., fps=8)`).
const DEFAULT_FPS: u32 = 8;
/// Largest frame edge served.
const MAX_SIZE: u32 = 2048;
/// Latent frames at most (odd: see the card's frame step).
const MAX_LATENT_FRAMES: u32 = 65;

/// CogVideoX's latents are the transformer's input and output layout, `[B, F, C, H, W]`.
#[derive(Debug)]
pub struct VideoLatents;

impl LatentLayout for VideoLatents {
    fn to_grid(&self, tokens: &Tensor) -> Tensor {
        tokens.shallow_clone()
    }

    fn to_tokens(&self, grid: &Tensor) -> Tensor {
        grid.shallow_clone()
    }
}

/// The per-step noise of the DPM scheduler, replayed from the generation's seed: diffusers draws
/// the initial latents and then every step's noise from one generator; libtorch's global CPU
/// generator cannot be saved and restored, so each step re-seeds it and redraws (and drops) what
/// came before, under the RNG lock. The cost is the earlier draws again, which DDIM never pays.
#[derive(Debug)]
struct NoiseStream {
    seed: u64,
    /// Shape and dtype of the latents (the initial draw and every step's).
    shape: Vec<i64>,
    kind: Kind,
    /// Step noises drawn so far.
    drawn: usize,
}

impl NoiseStream {
    /// The initial latents.
    fn initial(&self) -> Tensor {
        with_seeded_cpu_rng(self.seed, || {
            Tensor::randn(self.shape.as_slice(), (self.kind, Device::Cpu))
        })
    }

    /// The next `count` step noises, in order.
    fn next(&mut self, count: usize) -> Vec<Tensor> {
        if count == 0 {
            return Vec::new();
        }
        let options = (self.kind, Device::Cpu);
        let (skip, shape) = (self.drawn, self.shape.as_slice());
        let draws = with_seeded_cpu_rng(self.seed, || {
            for _ in 0..=skip {
                let _ = Tensor::randn(shape, options);
            }
            (0..count).map(|_| Tensor::randn(shape, options)).collect()
        });
        self.drawn += count;
        draws
    }
}

/// A generation in progress.
pub struct CogVideoXGeneration {
    scheduler: CogVideoXScheduler,
    step_index: usize,
    /// `[1, F, C, h, w]` in the pipeline dtype.
    latents: Tensor,
    /// `[negative; positive]` (CFG) or `[positive]` T5 embeddings `[B, L, text_dim]`.
    prompt_embeds: Tensor,
    cfg: bool,
    guidance_scale: f64,
    dynamic_cfg: bool,
    positions: Positions,
    /// DPM's second-order look-back: the previous step's `x0`.
    old_pred_original_sample: Option<Tensor>,
    /// The last step's `x0` estimate, for previews.
    predicted_clean: Option<Tensor>,
    noise: NoiseStream,
    /// CogVideoX1.5: latent frames padded at the front to a multiple of `patch_size_t`, dropped
    /// before decoding.
    padding_frames: i64,
    layout: Arc<VideoLatents>,
}

/// A loaded CogVideoX pipeline.
pub struct CogVideoXPipeline {
    tokenizer: T5Tokenizer,
    text_encoder: T5EncoderModel,
    transformer: CogVideoXTransformer,
    vae: AutoencoderKLCogVideoX,
    /// Tiled decoding, when the model is served with it.
    tiling: Option<Tiling>,
    scheduler: (CogVideoXSchedulerConfig, PathBuf),
    vae_scale_spatial: i64,
    vae_scale_temporal: i64,
    latent_rgb: LatentRgb,
    card: ModelCard,
    device: Device,
    kind: Kind,
}

// The engine moves pipelines and generations to its own thread and uses each from that one
// thread only.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<CogVideoXPipeline>();
    is_send::<CogVideoXGeneration>();
};

impl CogVideoXPipeline {
    /// Loads a diffusers CogVideoX folder, every model on `device` in `kind`; `vae_tiling`
    /// decodes in tiles of diffusers' default size.
    pub fn load(dir: &Path, device: Device, kind: Kind, vae_tiling: bool) -> Result<Self> {
        check_model_index(dir, PIPELINE_CLASS, &COMPONENTS)?;
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler_config: CogVideoXSchedulerConfig = read_json(&scheduler_path)?;
        // Validated now, not at the first request.
        CogVideoXScheduler::new(scheduler_config.clone(), &scheduler_path)?;
        let transformer = CogVideoXTransformer::load(&dir.join("transformer"), device, kind)?;
        let vae = AutoencoderKLCogVideoX::load(&dir.join("vae"), device, kind)?;
        let tc = transformer.config();
        let vc = vae.config();
        let transformer_config = dir.join("transformer").join("config.json");
        if tc.in_channels != vc.latent_channels || tc.out_channels() != vc.latent_channels {
            return Err(ModelError::config(
                &transformer_config,
                "in_channels",
                format!(
                    "in/out channels {}/{} differ from the VAE's latent_channels {}",
                    tc.in_channels,
                    tc.out_channels(),
                    vc.latent_channels
                ),
            ));
        }
        let text_encoder = T5EncoderModel::load(&dir.join("text_encoder"), device, kind)?;
        let tokenizer = T5Tokenizer::load(&dir.join("tokenizer"))?;
        // diffusers: 2^(levels - 1) spatially, the config's ratio in time.
        let vae_scale_spatial = 1i64 << (vc.block_out_channels.len() - 1);
        let tiling = vae_tiling.then(|| Tiling::defaults(vc));
        if let Some(tiling) = &tiling {
            tiling.check(vae_scale_spatial)?;
        }
        let vae_scale_temporal = vc.temporal_compression_ratio as i64;
        let card = card(
            &transformer,
            &tokenizer,
            vae_scale_spatial,
            vae_scale_temporal,
            (device, kind),
        );
        Ok(Self {
            latent_rgb: LatentRgb::first_channels(vc.latent_channels as usize),
            tokenizer,
            text_encoder,
            transformer,
            vae,
            tiling,
            scheduler: (scheduler_config, scheduler_path),
            vae_scale_spatial,
            vae_scale_temporal,
            card,
            device,
            kind,
        })
    }

    pub fn transformer(&self) -> &CogVideoXTransformer {
        &self.transformer
    }

    /// `_get_t5_prompt_embeds`: T5 over the prompt (the request's `field`) padded / truncated to
    /// `max_len` tokens (no attention mask), in the pipeline dtype.
    fn encode_prompt(&self, prompt: &str, field: &str, max_len: usize) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt, field, max_len)?;
        let len = ids.len() as i64;
        let ids = Tensor::from_slice(&ids)
            .view([1, len])
            .to_device(self.device);
        Ok(self.text_encoder.forward(&ids).to_kind(self.kind))
    }

    fn prepare_generation(&self, r: &GenerationRequest) -> Result<CogVideoXGeneration> {
        let multiple = self.vae_scale_spatial * self.transformer.config().patch_size;
        for (field, pixels) in [("height", r.height), ("width", r.width)] {
            if pixels == 0 || pixels as i64 % multiple != 0 {
                return Err(ModelError::invalid_input(
                    field,
                    format!("must be a positive multiple of {multiple} pixels, got {pixels}"),
                ));
            }
        }
        let tc = self.vae_scale_temporal;
        let num_frames = r
            .num_frames
            .unwrap_or(self.card.video.map_or(1, |v| v.default_frames as usize))
            as i64;
        if num_frames < 1 || (num_frames - 1) % tc != 0 {
            return Err(ModelError::invalid_input(
                "num_frames",
                format!(
                    "must be 1 + {tc}·k frames (the VAE's temporal compression), got {num_frames}"
                ),
            ));
        }
        if r.true_cfg_scale > 1.0 {
            return Err(ModelError::invalid_input(
                "true_cfg_scale",
                "CogVideoX's guidance is classifier-free already: set guidance instead",
            ));
        }
        if !r.guidance.is_finite() {
            return Err(ModelError::invalid_input("guidance", "must be finite"));
        }
        if r.max_sequence_length == 0 {
            return Err(ModelError::invalid_input(
                "max_sequence_length",
                "must be at least 1",
            ));
        }
        let (config, path) = &self.scheduler;
        let mut scheduler = CogVideoXScheduler::new(config.clone(), path)?;
        scheduler.set_timesteps(r.steps)?;

        let _no_grad = tch::no_grad_guard();
        let positive = self.encode_prompt(&r.prompt, "prompt", r.max_sequence_length)?;
        let cfg = r.guidance > 1.0;
        let prompt_embeds = if cfg {
            let negative = self.encode_prompt(
                r.negative_prompt.as_deref().unwrap_or(""),
                "negative_prompt",
                r.max_sequence_length,
            )?;
            Tensor::cat(&[negative, positive], 0)
        } else {
            positive
        };

        // CogVideoX1.5 pads the latent frames to a multiple of its temporal patch.
        let mut latent_frames = (num_frames - 1) / tc + 1;
        let padding_frames = match self.transformer.config().patch_size_t {
            Some(pt) if latent_frames % pt != 0 => pt - latent_frames % pt,
            _ => 0,
        };
        latent_frames += padding_frames;
        let (h, w) = (
            r.height as i64 / self.vae_scale_spatial,
            r.width as i64 / self.vae_scale_spatial,
        );
        let positions = self
            .transformer
            .positions((latent_frames, h, w), prompt_embeds.size()[1])?;
        let channels = self.transformer.config().in_channels;
        let noise = NoiseStream {
            seed: r.seed,
            shape: vec![1, latent_frames, channels, h, w],
            kind: self.kind,
            drawn: 0,
        };
        // `init_noise_sigma` is 1 for both schedulers.
        let latents = noise.initial().to_device(self.device);
        Ok(CogVideoXGeneration {
            scheduler,
            step_index: 0,
            latents,
            prompt_embeds,
            cfg,
            guidance_scale: f64::from(r.guidance),
            dynamic_cfg: r.dynamic_cfg,
            positions,
            old_pred_original_sample: None,
            predicted_clean: None,
            noise,
            padding_frames,
            layout: Arc::new(VideoLatents),
        })
    }

    /// `decode_latents` + postprocess: `[1, F, C, h, w]` latents (padding frames dropped) -> the
    /// video's RGB8 frames.
    fn decode_latents(&self, latents: &Tensor, padding_frames: i64) -> Frames {
        let _no_grad = tch::no_grad_guard();
        let f = latents.size()[1];
        let latents = latents.narrow(1, padding_frames, f - padding_frames);
        // `1 / scaling_factor * latents`, in that order.
        let z = latents.permute([0, 2, 1, 3, 4]) * (1.0 / self.vae.config().scaling_factor);
        let video = self
            .vae
            .decode_with(&z.to_kind(self.kind), self.tiling.as_ref())
            .expect("the tiling was checked at load"); // [1, 3, F, H, W]
        let frames = video.size()[2];
        let mut out: Option<Frames> = None;
        for i in 0..frames {
            let frame = to_rgb8(&video.get(0).select(1, i));
            match &mut out {
                None => out = Some(frame),
                Some(all) => all.frames.extend(frame.frames),
            }
        }
        out.expect("the VAE decodes at least one frame")
    }
}

/// `1 + g·(1 − cos(π·((N − t) / N)^5)) / 2` with the *timestep* `t`, as diffusers computes it.
fn dynamic_guidance(g: f64, num_steps: usize, t: i64) -> f64 {
    let n = num_steps as f64;
    1.0 + g * ((1.0 - (std::f64::consts::PI * ((n - t as f64) / n).powf(5.0)).cos()) / 2.0)
}

impl Pipeline for CogVideoXPipeline {
    type Generation = CogVideoXGeneration;

    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn prepare(&self, request: &GenerationRequest) -> Result<CogVideoXGeneration> {
        self.prepare_generation(request)
    }

    fn progress(&self, gen: &CogVideoXGeneration) -> Progress {
        Progress {
            step_index: gen.step_index,
            num_steps: gen.scheduler.num_steps(),
        }
    }

    /// One batched forward for both CFG halves (`[negative; positive]`), the guidance
    /// combination, then the scheduler step.
    fn step(
        &self,
        gen: &mut CogVideoXGeneration,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput {
        let total = gen.scheduler.num_steps();
        let index = gen.step_index;
        assert!(
            index < total,
            "all {total} steps of this generation have run"
        );
        let _no_grad = tch::no_grad_guard();
        let t = gen.scheduler.timesteps()[index];
        // The batched forward is one pass of the model: its strategies keep one state for it, as
        // diffusers' single "cond_uncond" cache context does.
        let ctx = ForwardContext {
            step: index,
            num_steps: total,
            timestep: t as f64,
            branch: Branch::Cond,
            batched_cfg: gen.cfg,
            layout: gen.layout.clone(),
        };
        let rows = if gen.cfg {
            hooks.cfg_rows(&ctx)
        } else {
            CfgRows::Both
        };
        let (model_input, prompt_embeds) = match (gen.cfg, rows) {
            (true, CfgRows::Both) => (
                Tensor::cat(&[&gen.latents, &gen.latents], 0),
                gen.prompt_embeds.shallow_clone(),
            ),
            // Without CFG the embeddings are the positive prompt's alone.
            (false, _) => (
                gen.latents.shallow_clone(),
                gen.prompt_embeds.shallow_clone(),
            ),
            (true, CfgRows::CondOnly) => (
                gen.latents.shallow_clone(),
                gen.prompt_embeds.narrow(0, 1, 1),
            ),
        };
        let batch = model_input.size()[0];
        let timestep = Tensor::from(t)
            .to_device(self.device)
            .expand([batch], false);
        let before = stats.forwards;
        let prediction = self.transformer.forward(
            &model_input,
            &prompt_embeds,
            &timestep,
            &gen.positions,
            &ctx,
            hooks,
            stats,
        );
        // Forwards count CFG halves, as under sequential CFG: the call recorded one; the other half
        // went the same way, or was rebuilt by the strategy.
        let prediction = match (gen.cfg, rows) {
            (true, CfgRows::Both) => {
                let first = stats.forwards.since(&before);
                stats.forwards.add(&first);
                prediction
            }
            (true, CfgRows::CondOnly) => {
                stats.forwards.predicted += 1;
                stats.note_uncond_rebuilt();
                hooks.rebuild_uncond(&ctx, &prediction)
            }
            (false, _) => prediction,
        }
        .to_kind(Kind::Float);
        let noise_pred = if gen.cfg {
            let scale = if gen.dynamic_cfg {
                dynamic_guidance(gen.guidance_scale, total, t)
            } else {
                gen.guidance_scale
            };
            let halves = prediction.chunk(2, 0);
            &halves[0] + (&halves[1] - &halves[0]) * scale
        } else {
            prediction
        };
        let draws = gen
            .scheduler
            .noise_draws(index, gen.old_pred_original_sample.is_some());
        let mut noises = gen.noise.next(draws).into_iter();
        let device = self.device;
        let out = gen.scheduler.step(
            &noise_pred,
            &gen.latents,
            index,
            gen.old_pred_original_sample.as_ref(),
            &mut || {
                noises
                    .next()
                    .expect("the scheduler draws what noise_draws counts")
                    .to_device(device)
            },
        );
        let kind = gen.prompt_embeds.kind();
        gen.latents = out.prev_sample.to_kind(kind);
        if gen.scheduler.kind() == SchedulerKind::Dpm {
            gen.old_pred_original_sample = Some(out.pred_original_sample.shallow_clone());
        }
        gen.predicted_clean = Some(out.pred_original_sample);
        gen.step_index += 1;
        // √((1 − ᾱ_t) / ᾱ_t): the noise level of the step's input in the variance-exploding
        // parametrisation, comparable with flow-matching sigmas.
        let alpha = gen.scheduler.alphas_cumprod().double_value(&[t]);
        StepOutput {
            index,
            total,
            timestep: t as f64,
            sigma: ((1.0 - alpha) / alpha).sqrt(),
        }
    }

    /// `[1, F, C, h, w]`, as CogVideoXPipeline returns them with `output_type="latent"`.
    fn latents(&self, gen: &CogVideoXGeneration) -> Tensor {
        gen.latents.shallow_clone()
    }

    fn decode(&self, gen: &CogVideoXGeneration) -> Frames {
        self.decode_latents(&gen.latents, gen.padding_frames)
    }

    fn preview(&self, gen: &CogVideoXGeneration, kind: PreviewKind) -> Frames {
        let x0 = gen.predicted_clean.as_ref().unwrap_or(&gen.latents);
        match kind {
            PreviewKind::FullDecode => self.decode_latents(x0, gen.padding_frames),
            PreviewKind::LatentRgb => {
                let x0 = x0.narrow(1, gen.padding_frames, x0.size()[1] - gen.padding_frames);
                let mut frames = self.latent_rgb.project(&x0.select(1, 0));
                for f in 1..x0.size()[1] {
                    frames
                        .frames
                        .extend(self.latent_rgb.project(&x0.select(1, f)).frames);
                }
                frames
            }
        }
    }

    fn step_cost(&self, gen: &CogVideoXGeneration, stats: &StepStats) -> StepCost {
        let text = gen.prompt_embeds.size()[1];
        let (_, f, _, h, w) = gen.latents.size5().expect("latents are [B, F, C, h, w]");
        let p = self.transformer.config().patch_size;
        let pt = self.transformer.config().patch_size_t.unwrap_or(1);
        let video = (f / pt) * (h / p) * (w / p);
        let (total, saved) = self.transformer.step_flops(text + video, stats);
        StepCost { total, saved }
    }
}

/// How the API describes a CogVideoX pipeline, with CogVideoXPipeline's defaults.
fn card(
    transformer: &CogVideoXTransformer,
    tokenizer: &T5Tokenizer,
    vae_scale_spatial: i64,
    vae_scale_temporal: i64,
    (device, kind): (Device, Kind),
) -> ModelCard {
    let c = transformer.config();
    let multiple = (vae_scale_spatial * c.patch_size) as u32;
    let variant = match (c.patch_size_t, c.use_rotary_positional_embeddings) {
        (Some(_), _) => "cogvideox-1.5",
        (None, true) => "cogvideox-5b",
        (None, false) => "cogvideox-2b",
    };
    // The sin-cos table fixes the text length; RoPE models take diffusers' 226 (capped by a small
    // tokenizer's own budget).
    let max_sequence_length = if c.use_rotary_positional_embeddings {
        tokenizer.max_length().min(MAX_SEQUENCE_LENGTH)
    } else {
        c.max_text_seq_length as usize
    };
    // The causal VAE decodes an odd number f of latent frames to 4f − 3 frames but an even one to
    // 4f (diffusers returns 16 frames for 13): served counts keep f odd, so a video has exactly
    // the frames asked for.
    let step = 2 * vae_scale_temporal as u32;
    ModelCard {
        family: "cogvideox",
        variant: variant.into(),
        default_width: (c.sample_width * vae_scale_spatial) as u32,
        default_height: (c.sample_height * vae_scale_spatial) as u32,
        size: (multiple, MAX_SIZE),
        size_multiple: multiple,
        default_steps: DEFAULT_STEPS,
        steps: (1, 1000),
        default_guidance: DEFAULT_GUIDANCE,
        guidance: (0.0, 100.0),
        guidance_embeds: false,
        supports_true_cfg: false,
        num_blocks: transformer.num_blocks() as u32,
        max_sequence_length,
        video: Some(VideoCard {
            default_frames: c.sample_frames as u32,
            max_frames: 1 + vae_scale_temporal as u32 * (MAX_LATENT_FRAMES - 1),
            frame_step: step,
            default_fps: DEFAULT_FPS,
        }),
        device,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_guidance_follows_the_timestep() {
        // At t = N the cosine term is cos(0) = 1: the scale is 1; it grows as t falls below N.
        assert_eq!(dynamic_guidance(6.0, 50, 50), 1.0);
        let late = dynamic_guidance(6.0, 50, 1);
        assert!(
            (late - (1.0 + 6.0 * (1.0 - (std::f64::consts::PI * 0.98f64.powf(5.0)).cos()) / 2.0))
                .abs()
                < 1e-12
        );
        // Timesteps above N give a negative base, odd power: diffusers' jumpy 1..7 at 50 steps.
        let early = dynamic_guidance(6.0, 50, 999);
        assert!((1.0..=7.0).contains(&early), "{early}");
    }

    #[test]
    fn replayed_noise_is_the_seeded_stream() {
        let mut stream = NoiseStream {
            seed: 7,
            shape: vec![1, 2, 3],
            kind: Kind::Float,
            drawn: 0,
        };
        let expected = with_seeded_cpu_rng(7, || {
            (0..4)
                .map(|_| Tensor::randn([1, 2, 3], (Kind::Float, Device::Cpu)))
                .collect::<Vec<_>>()
        });
        assert!(stream.initial().equal(&expected[0]));
        let first = stream.next(1);
        // Another generation draws in between: the stream is unaffected.
        let _ = with_seeded_cpu_rng(99, || Tensor::randn([5], (Kind::Float, Device::Cpu)));
        let rest = stream.next(2);
        assert!(first[0].equal(&expected[1]));
        assert!(rest[0].equal(&expected[2]) && rest[1].equal(&expected[3]));
        assert!(stream.next(0).is_empty());
    }
}
