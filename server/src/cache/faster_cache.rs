//! FasterCache (arXiv 2410.19355), as diffusers 0.42.1 implements it, adapted to FLUX's
//! sequential true CFG.
//!
//! Two parts:
//! - **Attention extrapolation.** Every attention module keeps its last two outputs `[older,
//!   newer]` (approximations included) and counts its calls. Inside the (strict) timestep range a
//!   call computes only when its index is positive and a multiple of `N`; otherwise it returns
//!   `newer + (newer - older) * w`, with `w` from [`AttentionWeight`](super::config::AttentionWeight) at the current step.
//! - **Unconditional-branch reuse ("CFG-Cache").** diffusers skips the unconditional half of a
//!   *batched* CFG forward. FLUX runs the conditional forward and then the unconditional one, so
//!   here the unconditional forward itself is skipped (`before_forward`, branch `Uncond`) at step
//!   iterations `i > 0` with `i mod n_uncond != 0` inside the uncond timestep range, and rebuilt
//!   from the same step's conditional output: in the frequency domain of the unpacked latent
//!   `[B, C, h, w]` (`fft2` over `h, w`, shifted, low band = within radius `floor(min(h, w) / 5)`
//!   of the centre), `uncond = cond + delta` per band, where the deltas `uncond - cond` were taken
//!   at the last step that ran both forwards and are multiplied by the band weight (`alpha` inside
//!   that band's timestep range, else 1) on every skipped step, compounding as in diffusers. FFTs
//!   run in float32; the result is cast back to the output dtype.
//!
//! `is_guidance_distilled` (FLUX-dev, guidance by embedding) turns the uncond reuse off and lets
//! every branch extrapolate its attention on its own schedule.
//!
//! Without it, the attention schedule follows what diffusers' batched CFG does: a step that runs
//! the unconditional forward is a full-batch forward there, whose attention always computes, so
//! here the unconditional branch always computes its attention (and keeps no attention cache) and
//! the conditional branch extrapolates only at steps whose unconditional forward is rebuilt. With
//! no unconditional forward at all (no true CFG) the conditional branch extrapolates on its own
//! schedule, as distilled (diffusers cannot run that case).
//!
//! Divergences from diffusers, besides the sequential CFG above: state is per CFG branch (diffusers
//! shares attention caches between FLUX's separately-run branches); a module with nothing cached
//! yet computes (diffusers crashes when a distilled run's first call is already in range, e.g. a
//! switch to FasterCache late in a generation).
use std::collections::HashMap;

use denoised_proto::v1 as pb;
use tch::{Kind, Tensor};

use super::config::{FasterCacheConfig, TimestepRange};
use super::hooks::{AttnOutput, BlockId, Branch, Decision, ForwardContext, TransformerHooks};
use super::{bytes_of, CacheStrategy, PerBranch};

/// FasterCache's per-generation state and decision rules.
#[derive(Debug)]
pub struct FasterCache {
    config: FasterCacheConfig,
    /// The forward in progress.
    branch: Branch,
    step: usize,
    num_steps: usize,
    timestep: f64,
    /// Steps begun (conditional forwards seen); the current step's iteration is one less.
    steps_begun: u64,
    /// Whether this generation runs unconditional forwards (known after the first step).
    has_uncond: bool,
    /// The current step's unconditional forward is rebuilt instead of run.
    reuse_uncond: bool,
    /// The current step's conditional output, for the unconditional forward that follows.
    cond_output: Option<Tensor>,
    /// `(low, high)` band deltas `uncond - cond`, complex, in shifted-FFT layout.
    deltas: Option<(Tensor, Tensor)>,
    attention: PerBranch<HashMap<usize, AttentionState>>,
}

#[derive(Debug, Default)]
struct AttentionState {
    iteration: u64,
    /// `[older, newer]` outputs.
    cache: Option<[AttnOutput; 2]>,
}

impl FasterCache {
    /// A strategy with empty state.
    pub fn new(config: FasterCacheConfig) -> Self {
        Self {
            config,
            branch: Branch::Cond,
            step: 0,
            num_steps: 0,
            timestep: 0.0,
            steps_begun: 0,
            has_uncond: false,
            reuse_uncond: false,
            cond_output: None,
            deltas: None,
            attention: PerBranch::default(),
        }
    }

    /// Whether the current forward's attention outputs are kept (see the module doc).
    fn keeps_attention(&self) -> bool {
        self.config.is_guidance_distilled || self.branch == Branch::Cond
    }

    /// Whether the current forward's attention may be extrapolated at all.
    fn extrapolates_attention(&self) -> bool {
        self.config.is_guidance_distilled
            || (self.branch == Branch::Cond && (!self.has_uncond || self.reuse_uncond))
    }

    /// The frequency bands of a packed FLUX output, in float32.
    fn bands(output: &Tensor, ctx: &ForwardContext) -> (Tensor, Tensor) {
        let (h, w) = (ctx.latent_height as i64, ctx.latent_width as i64);
        split_bands(&unpack(output, h, w).to_kind(Kind::Float))
    }
}

/// A band's delta weight: `alpha` inside the band's timestep range, else 1.
fn band_weight(alpha: f32, range: TimestepRange, timestep: f64) -> f64 {
    if range.contains(timestep) {
        alpha as f64
    } else {
        1.0
    }
}

/// `newer + (newer - older) * w`, per output tensor.
fn extrapolate(older: &AttnOutput, newer: &AttnOutput, w: f64) -> AttnOutput {
    let step = |old: &Tensor, new: &Tensor| new + (new - old) * w;
    let old = older.tensors();
    match newer {
        AttnOutput::Joint { hidden, encoder } => AttnOutput::Joint {
            hidden: step(old[0], hidden),
            encoder: step(old[1], encoder),
        },
        AttnOutput::Single(t) => AttnOutput::Single(step(old[0], t)),
    }
}

/// `[B, (h/2)(w/2), C*4]` -> `[B, C, h, w]`, as diffusers' `FluxPipeline._unpack_latents`.
fn unpack(x: &Tensor, h: i64, w: i64) -> Tensor {
    let size = x.size();
    let (b, c4) = (size[0], size[2]);
    x.view([b, h / 2, w / 2, c4 / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, c4 / 4, h, w])
}

/// `[B, C, h, w]` -> `[B, (h/2)(w/2), C*4]`, as diffusers' `FluxPipeline._pack_latents`.
fn pack(x: &Tensor) -> Tensor {
    let size = x.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    x.view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4])
}

const SPATIAL_DIMS: [i64; 2] = [-2, -1];

/// Splits `x` (`[.., h, w]`, float32) into its low and high frequency bands: the shifted 2-D
/// spectrum masked inside / outside the disc of radius `floor(min(h, w) / 5)` around
/// `(floor(h / 2), floor(w / 2))`, boundary in the low band. (diffusers shifts every dimension;
/// the mask is constant over the leading ones, so shifting only `h, w` gives the same values.)
fn split_bands(x: &Tensor) -> (Tensor, Tensor) {
    let size = x.size();
    let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
    let spectrum = x
        .fft_fft2(None::<&[i64]>, SPATIAL_DIMS, "backward")
        .fft_fftshift(SPATIAL_DIMS.as_slice());
    let radius = h.min(w) / 5;
    let (ch, cw) = (h / 2, w / 2);
    let mask: Vec<bool> = (0..h)
        .flat_map(|i| (0..w).map(move |j| (j - cw).pow(2) + (i - ch).pow(2) <= radius.pow(2)))
        .collect();
    let low_mask = Tensor::from_slice(&mask).view([h, w]).to_device(x.device());
    let low = &spectrum * &low_mask;
    let high = &spectrum * low_mask.logical_not();
    (low, high)
}

/// The real signal of a shifted spectrum.
fn from_bands(spectrum: &Tensor) -> Tensor {
    spectrum
        .fft_ifftshift(SPATIAL_DIMS.as_slice())
        .fft_ifft2(None::<&[i64]>, SPATIAL_DIMS, "backward")
        .real()
}

impl TransformerHooks for FasterCache {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.branch = ctx.branch;
        self.step = ctx.step;
        self.num_steps = ctx.num_steps;
        self.timestep = ctx.timestep;
        let c = &self.config;
        match ctx.branch {
            Branch::Cond => {
                let iteration = self.steps_begun;
                self.steps_begun += 1;
                // Decided here: the conditional forward's attention schedule depends on it.
                self.reuse_uncond = !c.is_guidance_distilled
                    && iteration > 0
                    && c.unconditional_batch_timestep_skip_range.contains(ctx.timestep)
                    && iteration % c.unconditional_batch_skip_range as u64 != 0;
                Decision::Compute
            }
            Branch::Uncond => {
                self.has_uncond = true;
                let (true, Some(cond), Some((low_delta, high_delta))) =
                    (self.reuse_uncond, &self.cond_output, &self.deltas)
                else {
                    return Decision::Compute;
                };
                let t = ctx.timestep;
                let low_delta =
                    low_delta * band_weight(c.alpha_low_frequency, c.low_frequency_weight_update_timestep_range, t);
                let high_delta =
                    high_delta * band_weight(c.alpha_high_frequency, c.high_frequency_weight_update_timestep_range, t);
                let (low, high) = Self::bands(cond, ctx);
                let uncond = pack(&from_bands(&((&low_delta + low) + (&high_delta + high)))).to_kind(cond.kind());
                // Stored back: consecutive reuses compound the weights, as in diffusers.
                self.deltas = Some((low_delta, high_delta));
                Decision::Predict(uncond)
            }
        }
    }

    fn after_forward(&mut self, ctx: &ForwardContext, output: &Tensor) {
        if self.config.is_guidance_distilled {
            return;
        }
        match ctx.branch {
            Branch::Cond => self.cond_output = Some(output.shallow_clone()),
            Branch::Uncond => {
                if let Some(cond) = &self.cond_output {
                    let (low_u, high_u) = Self::bands(output, ctx);
                    let (low_c, high_c) = Self::bands(cond, ctx);
                    self.deltas = Some((low_u - low_c, high_u - high_c));
                }
            }
        }
    }

    fn before_attention(&mut self, id: &BlockId) -> Decision<AttnOutput> {
        if !self.keeps_attention() {
            return Decision::Compute;
        }
        let n = self.config.spatial_attention_block_skip_range as u64;
        let skip_candidate = self.extrapolates_attention()
            && self.config.spatial_attention_timestep_skip_range.contains(self.timestep);
        let w = self.config.attention_weight.at(self.step, self.num_steps) as f64;
        let state = self.attention.get_mut(self.branch).entry(id.flat_index).or_default();
        let iteration = state.iteration;
        state.iteration += 1;
        let skip = skip_candidate && !(iteration > 0 && iteration % n == 0);
        match state.cache.take() {
            Some([older, newer]) if skip => {
                let predicted = extrapolate(&older, &newer, w);
                // Approximations are cached too and feed the next extrapolation.
                state.cache = Some([newer, predicted.shallow_clone()]);
                Decision::Predict(predicted)
            }
            cache => {
                state.cache = cache;
                Decision::Compute
            }
        }
    }

    fn after_attention(&mut self, id: &BlockId, output: &AttnOutput) {
        if !self.keeps_attention() {
            return;
        }
        let state = self.attention.get_mut(self.branch).entry(id.flat_index).or_default();
        state.cache = Some(match state.cache.take() {
            Some([_, newer]) => [newer, output.shallow_clone()],
            None => [output.shallow_clone(), output.shallow_clone()],
        });
    }
}

impl CacheStrategy for FasterCache {
    fn kind(&self) -> pb::CacheKind {
        pb::CacheKind::FasterCache
    }

    fn state_bytes(&self) -> u64 {
        // The two cached outputs of a module share storage until a second call; count each once.
        let mut seen = std::collections::HashSet::new();
        let attention: u64 = self
            .attention
            .both()
            .into_iter()
            .flat_map(|modules| modules.values())
            .filter_map(|m| m.cache.as_ref())
            .flat_map(|[older, newer]| older.tensors().into_iter().chain(newer.tensors()))
            .filter(|t| seen.insert(t.data_ptr() as usize))
            .map(super::tensor_bytes)
            .sum();
        let deltas = self.deltas.as_ref();
        attention
            + bytes_of([
                self.cond_output.as_ref(),
                deltas.map(|d| &d.0),
                deltas.map(|d| &d.1),
            ])
    }
}
