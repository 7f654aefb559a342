//! FLUX.1 text-to-image, as diffusers' `FluxPipeline` runs it, one denoising step at a time.
//!
//! [`FluxPipeline::prepare`] does everything before the loop (prompt encoding, noise, schedule)
//! and returns a [`FluxGeneration`]; [`FluxPipeline::step`] runs one step of it through the cache
//! hooks; [`FluxPipeline::decode`] and [`FluxPipeline::to_rgb8`] turn latents into pixels. Each
//! stage repeats diffusers' tensor ops in order and dtype, so fp32 CPU runs match it closely.
use std::path::Path;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::cache::hooks::{Branch, ForwardContext, StepStats, TransformerHooks};
use crate::models::clip::ClipTextModel;
use crate::models::flux::packing::{pack, unpack};
use crate::models::flux::transformer::FluxTransformer;
use crate::models::scheduler::FlowMatchEulerDiscreteScheduler;
use crate::models::t5::T5EncoderModel;
use crate::models::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::models::vae::AutoencoderKL;
use crate::models::weights::read_json;
use crate::models::{ModelError, Result};

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

/// The initial noise is drawn from libtorch's global CPU generator (seeded per generation, as
/// diffusers seeds a `torch.Generator("cpu")`), so seeding and drawing must not interleave
/// between threads.
static CPU_RNG: Mutex<()> = Mutex::new(());

/// What one text-to-image request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub prompt: String,
    /// Used only with `true_cfg_scale > 1` (true classifier-free guidance, two forwards a step).
    pub negative_prompt: Option<String>,
    /// Pixels; rounded down to a multiple of [`FluxSpec::size_multiple`] as diffusers does.
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Distilled guidance scale, fed to guidance-embedding models (FLUX.1-dev); ignored otherwise.
    pub guidance: f32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// T5 tokens (padded / truncated to exactly this many), at most 512.
    pub max_sequence_length: usize,
}

/// What the server needs to describe a loaded pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxSpec {
    /// Guidance-distilled (dev-like): `guidance` is a model input.
    pub guidance_embeds: bool,
    /// FluxPipeline's default size: `128 × vae_scale_factor` (1024 for FLUX.1).
    pub default_width: usize,
    pub default_height: usize,
    /// Image sizes are rounded down to a multiple of this (`vae_scale_factor × 2`, 16 for FLUX.1).
    pub size_multiple: usize,
    pub num_dual_blocks: usize,
    pub num_single_blocks: usize,
    /// VAE latent channels (16 for FLUX.1), the channels of [`FluxGeneration::predicted_clean`].
    pub latent_channels: usize,
    pub device: Device,
    pub kind: Kind,
}

/// What one call of [`FluxPipeline::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// 0-based index of the step just run.
    pub index: usize,
    pub total: usize,
    /// Model timestep of the step, on the 0..1000 scale.
    pub timestep: f64,
    /// Noise level the step started from.
    pub sigma: f64,
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
    latent_height: i64,
    latent_width: i64,
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
    /// Current packed latents `[B, L_img, 4·C]` (the initial noise before the first step), with
    /// the latent grid they unpack to.
    pub fn latents(&self) -> PackedLatents<'_> {
        PackedLatents {
            tensor: &self.latents,
            latent_height: self.latent_height,
            latent_width: self.latent_width,
        }
    }

    /// Steps run so far (the index of the next step).
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// Steps in the schedule.
    pub fn num_steps(&self) -> usize {
        self.scheduler.num_steps()
    }

    /// Every step has run; the latents are final.
    pub fn is_done(&self) -> bool {
        self.step_index >= self.num_steps()
    }

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
        unpack(packed, self.latent_height, self.latent_width)
    }
}

/// Packed latents `[B, (h/2)·(w/2), 4·C]` and the `h × w` latent grid they come from (which the
/// token count alone does not give for non-square images). Derefs to the packed tensor.
#[derive(Debug)]
pub struct PackedLatents<'a> {
    pub tensor: &'a Tensor,
    pub latent_height: i64,
    pub latent_width: i64,
}

impl PackedLatents<'_> {
    /// `[B, C, h, w]`.
    pub fn unpack(&self) -> Tensor {
        unpack(self.tensor, self.latent_height, self.latent_width)
    }
}

impl std::ops::Deref for PackedLatents<'_> {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        self.tensor
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

/// One `(library, class)` entry of `model_index.json`.
fn component_class(index: &Value, name: &str) -> Option<String> {
    index
        .get(name)?
        .as_array()?
        .get(1)?
        .as_str()
        .map(str::to_owned)
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
    device: Device,
    kind: Kind,
}

impl FluxPipeline {
    /// Loads a diffusers FLUX folder (`model_index.json` and one folder per component), every
    /// model on `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        let index: Value = read_json(&index_path)?;
        check_model_index(&index, &index_path)?;

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

        Ok(Self {
            scheduler,
            tokenizer: ClipTokenizer::load(&dir.join("tokenizer"))?,
            tokenizer_2: T5Tokenizer::load(&dir.join("tokenizer_2"))?,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), device, kind)?,
            text_encoder_2: T5EncoderModel::load(&dir.join("text_encoder_2"), device, kind)?,
            transformer,
            vae,
            vae_scale_factor,
            device,
            kind,
        })
    }

    /// FluxPipeline's `max_sequence_length` (512), capped by the T5 tokenizer's
    /// `model_max_length` so that small models trained on short prompts get their own budget.
    pub fn default_max_sequence_length(&self) -> usize {
        self.tokenizer_2.max_length().min(512)
    }

    /// The loaded transformer (its config, block count and per-block compute estimate).
    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }

    /// What the server needs to describe this model.
    pub fn spec(&self) -> FluxSpec {
        let c = self.transformer.config();
        FluxSpec {
            guidance_embeds: c.guidance_embeds,
            default_width: DEFAULT_SAMPLE_SIZE * self.vae_scale_factor,
            default_height: DEFAULT_SAMPLE_SIZE * self.vae_scale_factor,
            size_multiple: self.vae_scale_factor * 2,
            num_dual_blocks: c.num_layers,
            num_single_blocks: c.num_single_layers,
            latent_channels: self.vae.config().latent_channels as usize,
            device: self.device,
            kind: self.kind,
        }
    }

    /// Everything FluxPipeline does before its denoising loop: checks the request, encodes the
    /// prompt (and the negative prompt under true CFG), draws the seeded noise, and computes the
    /// schedule with the resolution-dependent shift.
    pub fn prepare(&self, params: &GenerateParams) -> Result<FluxGeneration> {
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
        let cond = self.encode_prompt(&params.prompt, params.max_sequence_length);
        let true_cfg = params.true_cfg_scale > 1.0 && params.negative_prompt.is_some();
        let uncond = match (&params.negative_prompt, true_cfg) {
            (Some(negative), true) => {
                Some(self.encode_prompt(negative, params.max_sequence_length))
            }
            _ => None,
        };

        let channels = self.vae.config().latent_channels;
        let noise = {
            let _rng = CPU_RNG
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            tch::manual_seed(params.seed as i64);
            Tensor::randn(
                [1, channels, latent_height, latent_width],
                (self.kind, Device::Cpu),
            )
        };
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
            latent_height,
            latent_width,
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

    /// FluxPipeline.encode_prompt for one prompt: pooled CLIP output (CLIP tokens padded to the
    /// tokenizer's max length) and the T5 sequence (`max_sequence_length` tokens, no mask).
    fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> TextConditioning {
        let ids = |ids: Vec<i64>| {
            let len = ids.len() as i64;
            Tensor::from_slice(&ids)
                .view([1, len])
                .to_device(self.device)
        };
        let clip_ids = ids(self.tokenizer.encode(prompt, self.tokenizer.max_length()));
        let (_, pooled) = self.text_encoder.forward(&clip_ids);
        let t5_ids = ids(self.tokenizer_2.encode(prompt, max_sequence_length));
        let prompt_embeds = self.text_encoder_2.forward(&t5_ids);
        let text_ids = Tensor::zeros([prompt_embeds.size()[1], 3], (self.kind, self.device));
        TextConditioning {
            prompt_embeds: prompt_embeds.to_kind(self.kind),
            pooled: pooled.to_kind(self.kind),
            text_ids,
        }
    }

    /// Runs denoising step `gen.step_index()`: the conditional forward, the unconditional one and
    /// `uncond + scale·(cond − uncond)` under true CFG, then the Euler update. Every module call
    /// goes through `hooks`; their decisions are tallied in `stats`. Panics if `gen` is done.
    pub fn step(
        &self,
        gen: &mut FluxGeneration,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput {
        assert!(
            !gen.is_done(),
            "all {} steps of this generation have run",
            gen.num_steps()
        );
        let _no_grad = tch::no_grad_guard();
        let index = gen.step_index;
        let total = gen.num_steps();
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
                latent_height: gen.latent_height as usize,
                latent_width: gen.latent_width as usize,
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

    /// Packed latents (e.g. [`FluxGeneration::latents`]) to an image `[B, 3, H, W]` in about
    /// [-1, 1]: unpacked, then as [`decode_unpacked`](Self::decode_unpacked).
    pub fn decode(&self, latents: &PackedLatents) -> Tensor {
        self.decode_unpacked(&latents.unpack())
    }

    /// Unpacked latents `[B, C, h, w]` (e.g. [`FluxGeneration::predicted_clean`]) to an image
    /// `[B, 3, H, W]`: `latents / scaling_factor + shift_factor`, then the VAE decoder.
    pub fn decode_unpacked(&self, latents: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let config = self.vae.config();
        let z = latents.to_device(self.device).to_kind(self.kind) / config.scaling_factor
            + config.shift_factor.unwrap_or(0.0);
        self.vae.decode(&z)
    }

    /// diffusers' postprocess to 8-bit RGB of the first image of `image` (`[B, 3, H, W]` or
    /// `[3, H, W]`): `(x·0.5 + 0.5).clamp(0, 1)` in the image's dtype, then in f32
    /// `(x·255).round()` (half to even, as numpy) -> `(width, height, HWC bytes)`.
    pub fn to_rgb8(image: &Tensor) -> (u32, u32, Vec<u8>) {
        let image = if image.dim() == 4 {
            image.get(0)
        } else {
            image.shallow_clone()
        };
        let (_, h, w) = image.size3().expect("image is [3, H, W]");
        let unit = (image * 0.5 + 0.5).clamp(0.0, 1.0);
        let bytes = (unit.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous();
        let len = (h * w * 3) as usize;
        let mut rgb = vec![0u8; len];
        bytes.copy_data_u8(&mut rgb, len);
        (w as u32, h as u32, rgb)
    }
}

/// `model_index.json` must describe a FluxPipeline with the expected component classes.
fn check_model_index(index: &Value, path: &Path) -> Result<()> {
    let class = index.get("_class_name").and_then(Value::as_str);
    if class != Some(PIPELINE_CLASS) {
        return Err(ModelError::UnknownClass {
            path: path.to_path_buf(),
            class: class.unwrap_or("<missing>").to_owned(),
            expected: PIPELINE_CLASS.to_owned(),
        });
    }
    for (name, accepted) in COMPONENTS {
        match component_class(index, name) {
            Some(class) if accepted.contains(&class.as_str()) => {}
            Some(class) => {
                return Err(ModelError::config(
                    path,
                    name,
                    format!("class `{class}` is not supported (expected one of {accepted:?})"),
                ))
            }
            None => return Err(ModelError::config(path, name, "missing component entry")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse() {
        let x = Tensor::arange(2 * 4 * 6, (Kind::Float, Device::Cpu)).view([1, 2, 4, 6]);
        let packed = pack(&x);
        assert_eq!(packed.size(), [1, 6, 8]);
        // The first token is the top-left 2×2 patch, channel-major.
        let first: Vec<f32> = Vec::try_from(packed.get(0).get(0)).unwrap();
        assert_eq!(first, [0.0, 1.0, 6.0, 7.0, 24.0, 25.0, 30.0, 31.0]);
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
        let path = Path::new("model_index.json");
        check_model_index(&good, path).unwrap();
        let mut bad = good.clone();
        bad["vae"] = serde_json::json!(["diffusers", "AutoencoderTiny"]);
        let err = check_model_index(&bad, path).unwrap_err().to_string();
        assert!(
            err.contains("`vae`") && err.contains("AutoencoderTiny"),
            "{err}"
        );
        bad["_class_name"] = serde_json::json!("StableDiffusion3Pipeline");
        let err = check_model_index(&bad, path).unwrap_err().to_string();
        assert!(err.contains("StableDiffusion3Pipeline"), "{err}");
    }
}
