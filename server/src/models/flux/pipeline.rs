//! FLUX.1 text-to-image, as diffusers' `FluxPipeline` runs it, one denoising step at a time.
//!
//! The [`Pipeline`] implementation: [`prepare`](Pipeline::prepare) does everything before the
//! loop (prompt encoding, noise, schedule) and returns a [`FluxGeneration`];
//! [`step`](Pipeline::step) runs one step of it through the cache hooks;
//! [`decode`](Pipeline::decode) and [`preview`](Pipeline::preview) turn latents into pixels. Each
//! stage repeats diffusers' tensor ops in order and dtype, so fp32 CPU runs match it closely.
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::packing::{pack, FluxLayout};
use super::transformer::FluxTransformer;
use crate::dit::hooks::{Branch, ForwardContext, StepStats, TransformerHooks};
use crate::dit::layout::LatentLayout;
use crate::dit::pipeline::{Frames, ModelCard, Pipeline, Progress, StepCost, StepOutput};
use crate::dit::request::{GenerationRequest, PreviewKind};
use crate::models::clip::ClipTextModel;
use crate::models::pixels::{to_rgb8, LatentRgb};
use crate::models::rng::with_seeded_cpu_rng;
use crate::models::scheduler::FlowMatchEulerDiscreteScheduler;
use crate::models::t5::T5EncoderModel;
use crate::models::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::models::vae::AutoencoderKL;
use crate::models::weights::read_json;
use crate::models::{check_model_index, ModelError, Result};

/// The diffusers pipeline class `model_index.json` must name.
pub const PIPELINE_CLASS: &str = "FluxPipeline";

/// FluxPipeline's `default_sample_size`: the default image edge is this many latent pixels.
const DEFAULT_SAMPLE_SIZE: usize = 128;

/// FluxPipeline refuses longer T5 sequences.
const MAX_SEQUENCE_LENGTH: usize = 512;

/// Components and the (library, class) pairs accepted for each in `model_index.json`.
const COMPONENTS: [(&str, &[&str]); 7] = [
    ("scheduler", &["FlowMatchEulerDiscreteScheduler"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("text_encoder_2", &["T5EncoderModel"]),
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("tokenizer_2", &["T5TokenizerFast", "T5Tokenizer"]),
    ("transformer", &["FluxTransformer2DModel"]),
    ("vae", &["AutoencoderKL"]),
];

/// Largest image edge served, in pixels.
const MAX_SIZE: u32 = 2048;

/// ComfyUI's FLUX.1 latent-to-RGB factors (rows: the 16 latent channels; columns: R, G, B),
/// valid in the pipeline's normalized latent space.
const FLUX1_RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const FLUX1_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// FLUX.1's factors for 16-channel latents; other VAEs have none fitted.
fn latent_rgb(channels: usize) -> LatentRgb {
    if channels == FLUX1_RGB_FACTORS.len() {
        LatentRgb::new(&FLUX1_RGB_FACTORS, FLUX1_RGB_BIAS)
    } else {
        LatentRgb::first_channels(channels)
    }
}

/// The prompt embeddings of one CFG branch.
struct TextConditioning {
    /// T5 sequence `[B, L_txt, joint_dim]`.
    prompt_embeds: Tensor,
    /// Pooled CLIP embedding `[B, pooled_dim]`.
    pooled: Tensor,
    /// Zeros `[L_txt, 3]`: text tokens sit at position 0 on every RoPE axis.
    text_ids: Tensor,
}

/// A generation in progress: its conditioning, schedule, and current latents.
pub struct FluxGeneration {
    /// Owns its schedule, so generations of one pipeline are independent.
    scheduler: FlowMatchEulerDiscreteScheduler,
    step_index: usize,
    /// Packed latents `[B, (h/2)·(w/2), 4·C]`.
    latents: Tensor,
    /// Latent grid `h × w` (before packing), i.e. pixels / vae_scale_factor.
    layout: Arc<FluxLayout>,
    width: usize,
    height: usize,
    /// Image token positions `[(h/2)·(w/2), 3]`: (0, row, column).
    img_ids: Tensor,
    cond: TextConditioning,
    /// Present when true CFG is on.
    uncond: Option<TextConditioning>,
    true_cfg_scale: f64,
    /// `[B]` f32 guidance scale, for guidance-embedding models.
    guidance: Option<Tensor>,
    /// Packed `x0 = x_t − σ_t·v` of the last step.
    predicted_clean: Option<Tensor>,
}

// Tensors (and the text encoders' tokenizers) are plain owned data; the engine moves pipelines and
// generations to its own thread and uses each from that one thread only.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<FluxPipeline>();
    is_send::<FluxGeneration>();
};

impl FluxGeneration {
    /// Output image width in pixels (the request's, rounded down to the size multiple).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Output image height in pixels (rounded like the width).
    pub fn height(&self) -> usize {
        self.height
    }

    /// The clean latents the last step predicted, `x0 = x_t − σ_t·v`, unpacked to `[B, C, h, w]`
    /// (for previews). Before the first step: the initial noise, unpacked.
    pub fn predicted_clean(&self) -> Tensor {
        let packed = self.predicted_clean.as_ref().unwrap_or(&self.latents);
        self.layout.to_grid(packed)
    }
}

/// diffusers `_prepare_latent_image_ids`: `[(h)·(w), 3]` rows `(0, row, column)` for a `h × w`
/// token grid.
fn latent_image_ids(h: i64, w: i64, device: Device, kind: Kind) -> Tensor {
    let rows = Tensor::arange(h, (Kind::Float, Device::Cpu))
        .view([h, 1, 1])
        .expand([h, w, 1], false);
    let cols = Tensor::arange(w, (Kind::Float, Device::Cpu))
        .view([1, w, 1])
        .expand([h, w, 1], false);
    let zeros = Tensor::zeros([h, w, 1], (Kind::Float, Device::Cpu));
    Tensor::cat(&[zeros, rows, cols], 2)
        .reshape([h * w, 3])
        .to_device(device)
        .to_kind(kind)
}

/// The one width the pipeline needs from each text encoder config, to check it against the
/// transformer at load time rather than fail on the first request.
#[derive(Deserialize)]
struct ClipWidth {
    #[serde(default = "default_encoder_width")]
    hidden_size: i64,
}

#[derive(Deserialize)]
struct T5Width {
    #[serde(default = "default_encoder_width")]
    d_model: i64,
}

/// transformers' default for both `CLIPTextConfig.hidden_size` and `T5Config.d_model`.
fn default_encoder_width() -> i64 {
    512
}

/// A loaded FLUX pipeline: text encoders, transformer, scheduler config and VAE.
pub struct FluxPipeline {
    scheduler: FlowMatchEulerDiscreteScheduler,
    transformer: FluxTransformer,
    tokenizer: ClipTokenizer,
    tokenizer_2: T5Tokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: T5EncoderModel,
    vae: AutoencoderKL,
    /// `2^(len(vae.block_out_channels) - 1)`: pixels per latent pixel.
    vae_scale_factor: usize,
    latent_rgb: LatentRgb,
    card: ModelCard,
    device: Device,
    kind: Kind,
}

impl FluxPipeline {
    /// Loads a diffusers FLUX folder (`model_index.json` and one folder per component), every
    /// model on `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        check_model_index(dir, PIPELINE_CLASS, &COMPONENTS)?;

        let scheduler = FlowMatchEulerDiscreteScheduler::load(&dir.join("scheduler"))?;
        let transformer = FluxTransformer::load(&dir.join("transformer"), device, kind)?;
        let vae = AutoencoderKL::load(&dir.join("vae"), device, kind)?;
        let tc = transformer.config();
        let transformer_config = dir.join("transformer").join("config.json");
        let vae_config = dir.join("vae").join("config.json");

        // Packing 2×2 latent patches gives 4·C channels per token, in and out.
        let latent_channels = vae.config().latent_channels;
        if tc.in_channels != 4 * latent_channels {
            return Err(ModelError::config(
                &transformer_config,
                "in_channels",
                format!(
                    "{} is not 4 × the VAE's latent_channels ({latent_channels})",
                    tc.in_channels
                ),
            ));
        }
        if tc.output_dim() != tc.in_channels {
            return Err(ModelError::config(
                &transformer_config,
                "out_channels",
                format!(
                    "the model outputs {} channels per token but takes {} (patch_size {} × out_channels {})",
                    tc.output_dim(),
                    tc.in_channels,
                    tc.patch_size,
                    tc.out_channels()
                ),
            ));
        }
        let levels = vae.config().block_out_channels.len();
        if levels == 0 || levels > 8 {
            return Err(ModelError::config(
                &vae_config,
                "block_out_channels",
                format!("expected 1 to 8 levels, got {levels}"),
            ));
        }
        let vae_scale_factor = 1usize << (levels - 1);

        let clip_config = dir.join("text_encoder").join("config.json");
        let clip_width = read_json::<ClipWidth>(&clip_config)?.hidden_size;
        if clip_width != tc.pooled_projection_dim {
            return Err(ModelError::config(
                &clip_config,
                "hidden_size",
                format!(
                    "{clip_width}, but the transformer's pooled_projection_dim is {}",
                    tc.pooled_projection_dim
                ),
            ));
        }
        let t5_config = dir.join("text_encoder_2").join("config.json");
        let t5_width = read_json::<T5Width>(&t5_config)?.d_model;
        if t5_width != tc.joint_attention_dim {
            return Err(ModelError::config(
                &t5_config,
                "d_model",
                format!(
                    "{t5_width}, but the transformer's joint_attention_dim is {}",
                    tc.joint_attention_dim
                ),
            ));
        }

        let tokenizer_2 = T5Tokenizer::load(&dir.join("tokenizer_2"))?;
        let card = card(&transformer, &tokenizer_2, vae_scale_factor, device, kind);
        Ok(Self {
            scheduler,
            tokenizer: ClipTokenizer::load(&dir.join("tokenizer"))?,
            tokenizer_2,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), device, kind)?,
            text_encoder_2: T5EncoderModel::load(&dir.join("text_encoder_2"), device, kind)?,
            latent_rgb: latent_rgb(latent_channels as usize),
            transformer,
            vae,
            vae_scale_factor,
            card,
            device,
            kind,
        })
    }

    /// The loaded transformer (its config and block count).
    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }

    /// VAE latent channels (16 for FLUX.1), the channels of [`FluxGeneration::predicted_clean`].
    pub fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels as usize
    }

    /// Everything FluxPipeline does before its denoising loop: checks the request, encodes the
    /// prompt (and the negative prompt under true CFG), draws the seeded noise, and computes the
    /// schedule with the resolution-dependent shift.
    fn prepare_generation(&self, params: &GenerationRequest) -> Result<FluxGeneration> {
        let multiple = self.vae_scale_factor * 2;
        // FluxPipeline.prepare_latents: `2 * (int(height) // (vae_scale_factor * 2))`.
        let latent_size = |pixels: usize, field: &str| {
            if pixels < multiple {
                Err(ModelError::invalid_input(
                    field,
                    format!("must be at least {multiple} pixels, got {pixels}"),
                ))
            } else {
                Ok(2 * (pixels / multiple) as i64)
            }
        };
        let latent_height = latent_size(params.height, "height")?;
        let latent_width = latent_size(params.width, "width")?;
        if params.steps == 0 {
            return Err(ModelError::invalid_input("steps", "must be at least 1"));
        }
        if params.num_frames.is_some_and(|n| n != 1) {
            return Err(ModelError::invalid_input(
                "num_frames",
                "FLUX makes images: one frame",
            ));
        }
        if params.dynamic_cfg {
            return Err(ModelError::invalid_input(
                "use_dynamic_cfg",
                "FLUX has no dynamic classifier-free guidance",
            ));
        }
        if !(1..=MAX_SEQUENCE_LENGTH).contains(&params.max_sequence_length) {
            return Err(ModelError::invalid_input(
                "max_sequence_length",
                format!(
                    "must be between 1 and {MAX_SEQUENCE_LENGTH}, got {}",
                    params.max_sequence_length
                ),
            ));
        }
        for (field, value) in [
            ("guidance", params.guidance),
            ("true_cfg_scale", params.true_cfg_scale),
        ] {
            if !value.is_finite() {
                return Err(ModelError::invalid_input(
                    field,
                    format!("must be finite, got {value}"),
                ));
            }
        }

        let _no_grad = tch::no_grad_guard();
        let cond = self.encode_prompt(&params.prompt, "prompt", params.max_sequence_length)?;
        let true_cfg = params.true_cfg_scale > 1.0 && params.negative_prompt.is_some();
        let uncond = match (&params.negative_prompt, true_cfg) {
            (Some(negative), true) => {
                Some(self.encode_prompt(negative, "negative_prompt", params.max_sequence_length)?)
            }
            _ => None,
        };

        let channels = self.vae.config().latent_channels;
        let noise = with_seeded_cpu_rng(params.seed, || {
            Tensor::randn(
                [1, channels, latent_height, latent_width],
                (self.kind, Device::Cpu),
            )
        });
        let latents = pack(&noise).to_device(self.device);
        let img_ids = latent_image_ids(latent_height / 2, latent_width / 2, self.device, self.kind);

        let mut scheduler = self.scheduler.clone();
        let image_seq_len = latents.size()[1] as usize;
        scheduler.set_timesteps(params.steps, Some(scheduler.config().mu(image_seq_len)))?;

        let guidance = self.transformer.config().guidance_embeds.then(|| {
            Tensor::full([1], f64::from(params.guidance), (Kind::Float, self.device))
                .expand([latents.size()[0]], false)
        });
        let pixels = |latent: i64| latent as usize * self.vae_scale_factor;
        Ok(FluxGeneration {
            scheduler,
            step_index: 0,
            latents,
            layout: Arc::new(FluxLayout {
                h: latent_height,
                w: latent_width,
            }),
            width: pixels(latent_width),
            height: pixels(latent_height),
            img_ids,
            cond,
            uncond,
            true_cfg_scale: f64::from(params.true_cfg_scale),
            guidance,
            predicted_clean: None,
        })
    }

    /// FluxPipeline.encode_prompt for one prompt (the request's `field`): pooled CLIP output (CLIP
    /// tokens padded to the tokenizer's max length) and the T5 sequence (`max_sequence_length`
    /// tokens, no mask).
    fn encode_prompt(
        &self,
        prompt: &str,
        field: &str,
        max_sequence_length: usize,
    ) -> Result<TextConditioning> {
        let ids = |ids: Vec<i64>| {
            let len = ids.len() as i64;
            Tensor::from_slice(&ids)
                .view([1, len])
                .to_device(self.device)
        };
        let clip_ids = ids(self
            .tokenizer
            .encode(prompt, field, self.tokenizer.max_length())?);
        let (_, pooled) = self.text_encoder.forward(&clip_ids);
        let t5_ids = ids(self
            .tokenizer_2
            .encode(prompt, field, max_sequence_length)?);
        let prompt_embeds = self.text_encoder_2.forward(&t5_ids);
        let text_ids = Tensor::zeros([prompt_embeds.size()[1], 3], (self.kind, self.device));
        Ok(TextConditioning {
            prompt_embeds: prompt_embeds.to_kind(self.kind),
            pooled: pooled.to_kind(self.kind),
            text_ids,
        })
    }

    /// Unpacked latents `[B, C, h, w]` (e.g. [`FluxGeneration::predicted_clean`]) to an image
    /// `[B, 3, H, W]` in about [-1, 1]: `latents / scaling_factor + shift_factor`, then the VAE
    /// decoder.
    pub fn decode_unpacked(&self, latents: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let config = self.vae.config();
        let z = latents.to_device(self.device).to_kind(self.kind) / config.scaling_factor
            + config.shift_factor.unwrap_or(0.0);
        self.vae.decode(&z)
    }
}

impl Pipeline for FluxPipeline {
    type Generation = FluxGeneration;

    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn prepare(&self, request: &GenerationRequest) -> Result<FluxGeneration> {
        self.prepare_generation(request)
    }

    fn progress(&self, gen: &FluxGeneration) -> Progress {
        Progress {
            step_index: gen.step_index,
            num_steps: gen.scheduler.num_steps(),
        }
    }

    /// The conditional forward, the unconditional one and `uncond + scale·(cond − uncond)` under
    /// true CFG, then the Euler update.
    fn step(
        &self,
        gen: &mut FluxGeneration,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput {
        let total = gen.scheduler.num_steps();
        assert!(
            gen.step_index < total,
            "all {total} steps of this generation have run"
        );
        let _no_grad = tch::no_grad_guard();
        let index = gen.step_index;
        let t = gen.scheduler.timesteps()[index];
        let sigma = gen.scheduler.sigmas()[index];
        let batch = gen.latents.size()[0];
        // `t.expand(B).to(latents.dtype)`, then the pipeline passes `timestep / 1000`.
        let timestep = Tensor::from(t)
            .to_device(self.device)
            .expand([batch], false)
            .to_kind(gen.latents.kind())
            / 1000.0;
        let mut forward = |branch: Branch, text: &TextConditioning| {
            let ctx = ForwardContext {
                step: index,
                num_steps: total,
                timestep: f64::from(t),
                branch,
                batched_cfg: false,
                layout: gen.layout.clone(),
            };
            self.transformer.forward(
                &gen.latents,
                &text.prompt_embeds,
                &text.pooled,
                &timestep,
                gen.guidance.as_ref(),
                &gen.img_ids,
                &text.text_ids,
                &ctx,
                hooks,
                stats,
            )
        };
        let mut velocity = forward(Branch::Cond, &gen.cond);
        if let Some(uncond) = &gen.uncond {
            let negative = forward(Branch::Uncond, uncond);
            velocity = &negative + (velocity - &negative) * gen.true_cfg_scale;
        }
        gen.predicted_clean = Some(&gen.latents - &velocity * f64::from(sigma));
        gen.latents = gen.scheduler.step(&velocity, &gen.latents, index);
        gen.step_index += 1;
        StepOutput {
            index,
            total,
            timestep: f64::from(t),
            sigma: f64::from(sigma),
        }
    }

    /// Packed latents `[B, (h/2)·(w/2), 4·C]`, as FluxPipeline returns them.
    fn latents(&self, gen: &FluxGeneration) -> Tensor {
        gen.latents.shallow_clone()
    }

    fn decode(&self, gen: &FluxGeneration) -> Frames {
        to_rgb8(&self.decode_unpacked(&gen.layout.to_grid(&gen.latents)))
    }

    fn preview(&self, gen: &FluxGeneration, kind: PreviewKind) -> Frames {
        let x0 = gen.predicted_clean();
        match kind {
            PreviewKind::LatentRgb => self.latent_rgb.project(&x0),
            PreviewKind::FullDecode => to_rgb8(&self.decode_unpacked(&x0)),
        }
    }

    fn step_cost(&self, gen: &FluxGeneration, stats: &StepStats) -> StepCost {
        let (batch, image_tokens) = (gen.latents.size()[0], gen.latents.size()[1]);
        // Both CFG branches are padded to the same text length.
        let text_tokens = gen.cond.prompt_embeds.size()[1];
        let (total, saved) = self
            .transformer
            .step_flops(batch, image_tokens, text_tokens, stats);
        StepCost { total, saved }
    }
}

/// How the API describes a FLUX pipeline, with FluxPipeline's defaults.
fn card(
    transformer: &FluxTransformer,
    tokenizer_2: &T5Tokenizer,
    vae_scale_factor: usize,
    device: Device,
    kind: Kind,
) -> ModelCard {
    let c = transformer.config();
    let multiple = (vae_scale_factor * 2) as u32;
    let default_size = (DEFAULT_SAMPLE_SIZE * vae_scale_factor) as u32;
    let dev = c.guidance_embeds;
    ModelCard {
        family: "flux",
        variant: if dev { "flux-dev" } else { "flux-schnell" }.into(),
        default_width: default_size,
        default_height: default_size,
        size: (multiple, MAX_SIZE),
        size_multiple: multiple,
        // The step counts and guidance the FLUX.1 model cards recommend.
        default_steps: if dev { 28 } else { 4 },
        steps: (1, 1000),
        default_guidance: if dev { 3.5 } else { 0.0 },
        guidance: (0.0, 100.0),
        guidance_embeds: dev,
        supports_true_cfg: true,
        num_blocks: transformer.num_blocks() as u32,
        // FluxPipeline's 512, capped by the T5 tokenizer's `model_max_length` so that small
        // models trained on short prompts get their own budget.
        max_sequence_length: tokenizer_2.max_length().min(MAX_SEQUENCE_LENGTH),
        video: None,
        device,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn image_ids_are_row_and_column() {
        let ids = latent_image_ids(2, 3, Device::Cpu, Kind::Float);
        let row4: Vec<f32> = Vec::try_from(ids.get(4)).unwrap();
        assert_eq!(row4, [0.0, 1.0, 1.0]);
    }

    #[test]
    fn model_index_is_checked() {
        let good = serde_json::json!({
            "_class_name": "FluxPipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        });
        let dir = std::env::temp_dir().join(format!("denoised-flux-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |index: &Value| {
            std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
            check_model_index(&dir, PIPELINE_CLASS, &COMPONENTS).map_err(|e| e.to_string())
        };
        check(&good).unwrap();
        let mut bad = good.clone();
        bad["vae"] = serde_json::json!(["diffusers", "AutoencoderTiny"]);
        let err = check(&bad).unwrap_err();
        assert!(
            err.contains("`vae`") && err.contains("AutoencoderTiny"),
            "{err}"
        );
        bad["_class_name"] = serde_json::json!("StableDiffusion3Pipeline");
        let err = check(&bad).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("StableDiffusion3Pipeline"), "{err}");
    }
}
