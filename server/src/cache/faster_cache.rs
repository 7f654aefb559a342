//! FasterCache (arXiv 2410.19355), as diffusers 0.42.1 implements it, for batched CFG (one
//! `[uncond; cond]` forward per step, as CogVideoX runs it) and adapted to sequential true CFG (one
//! forward per branch, as FLUX runs it).
//!
//! Two parts:
//! - **Attention extrapolation.** Every attention module keeps its last two outputs `[older,
//!   newer]` (approximations included) and counts its calls. Inside the (strict) timestep range a
//!   call computes only when its index is positive and a multiple of `N`; otherwise it returns
//!   `newer + (newer - older) * w`, `w` being the config's
//!   [`AttentionWeight`](super::config::AttentionWeight) at the current step. Spatial
//!   self-attention modules follow the spatial settings, temporal ones the temporal settings (not
//!   hooked while `temporal_attention_block_skip_range` is unset); cross-attention is never
//!   hooked, as in diffusers.
//! - **Unconditional-branch reuse ("CFG-Cache").** At step iterations `i > 0` with
//!   `i mod n_uncond != 0` inside the uncond timestep range, the unconditional output is not
//!   computed but rebuilt from the same step's conditional output, in the frequency domain of the
//!   latent grid the family's [`LatentLayout`] gives (`[B, C, h, w]` or `[B, F, C, h, w]`; `fft2`
//!   over `h, w`, shifted, low band = within radius `floor(min(h, w) / 5)` of the centre):
//!   `uncond = cond + delta` per band, where the deltas `uncond - cond` were taken at the last step
//!   that computed both and are multiplied by the band weight (`alpha` inside that band's timestep
//!   range, else 1) on every rebuilt step, compounding as in diffusers. FFTs run in float32; the
//!   result is cast back to the output dtype. Under batched CFG the forward then runs the
//!   conditional half only ([`CfgRows::CondOnly`]: latents, text and timestep of batch 1) and the
//!   rebuilt half is concatenated in front; under sequential CFG the unconditional forward itself
//!   is skipped (`before_forward`, branch `Uncond`).
//!
//! `is_guidance_distilled` (FLUX-dev, guidance by embedding) turns the uncond reuse off and lets
//! every branch extrapolate its attention on its own schedule.
//!
//! Without it, attention is extrapolated only on steps whose unconditional output is rebuilt:
//! diffusers' batched forward computes attention whenever it runs the full batch, and keeps the
//! conditional half of its outputs (the only half ever extrapolated). Sequential CFG follows the
//! same schedule: the unconditional branch always computes its attention (and keeps no attention
//! cache), the conditional branch extrapolates at steps whose unconditional forward is rebuilt.
//! With no unconditional forward at all (no CFG) the conditional branch extrapolates on its own
//! schedule, as distilled (diffusers cannot run that case).
//!
//! Divergences from diffusers: under sequential CFG, state is per CFG branch (diffusers shares
//! attention caches between FLUX's separately-run branches); a module with nothing cached yet
//! computes (diffusers crashes when a distilled run's first call is already in range, e.g. a
//! switch to FasterCache late in a generation), and nothing is rebuilt before a step computed both
//! halves.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::config::{FasterCacheConfig, TimestepRange};
use super::{bytes_of, CacheKind, CacheStrategy, PerBranch};
use crate::dit::hooks::{
    AttentionId, AttentionRole, Branch, CfgRows, Decision, ForwardContext, Tensors,
    TransformerHooks,
};
#[cfg(doc)]
use crate::dit::layout::LatentLayout;

/// FasterCache's per-generation state and decision rules.
#[derive(Debug)]
pub struct FasterCache {
    config: FasterCacheConfig,
    /// The forward in progress.
    branch: Branch,
    /// It is a batched `[uncond; cond]` forward.
    batched: bool,
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
    cache: Option<[Tensors; 2]>,
}

impl FasterCache {
    /// A strategy with empty state.
    pub fn new(config: FasterCacheConfig) -> Self {
        Self {
            config,
            branch: Branch::Cond,
            batched: false,
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

    /// Records where the forward in progress stands.
    fn observe(&mut self, ctx: &ForwardContext) {
        self.branch = ctx.branch;
        self.batched = ctx.batched_cfg;
        self.step = ctx.step;
        self.num_steps = ctx.num_steps;
        self.timestep = ctx.timestep;
    }

    /// A step begins (the conditional forward, or the batched one): decides whether its
    /// unconditional output is rebuilt instead of computed. The conditional forward's attention
    /// schedule depends on it.
    fn begin_step(&mut self, ctx: &ForwardContext) {
        let c = &self.config;
        let iteration = self.steps_begun;
        self.steps_begun += 1;
        self.reuse_uncond = !c.is_guidance_distilled
            && iteration > 0
            && c.unconditional_batch_timestep_skip_range
                .contains(ctx.timestep)
            && !iteration.is_multiple_of(c.unconditional_batch_skip_range as u64)
            // Nothing to rebuild from yet (only after a switch to FasterCache mid-generation).
            && self.deltas.is_some();
    }

    /// The unconditional output rebuilt from the conditional one: `cond + delta` per frequency
    /// band, the deltas weighted first (and stored back, so consecutive reuses compound the
    /// weights, as in diffusers).
    fn rebuilt_uncond(&mut self, cond: &Tensor, ctx: &ForwardContext) -> Tensor {
        let c = &self.config;
        let (low_delta, high_delta) = self
            .deltas
            .take()
            .expect("an unconditional output is rebuilt only from stored deltas");
        let t = ctx.timestep;
        let low_delta = low_delta
            * band_weight(
                c.alpha_low_frequency,
                c.low_frequency_weight_update_timestep_range,
                t,
            );
        let high_delta = high_delta
            * band_weight(
                c.alpha_high_frequency,
                c.high_frequency_weight_update_timestep_range,
                t,
            );
        let (low, high) = Self::bands(cond, ctx);
        let uncond = ctx
            .layout
            .to_tokens(&from_bands(&((&low_delta + low) + (&high_delta + high))))
            .to_kind(cond.kind());
        self.deltas = Some((low_delta, high_delta));
        uncond
    }

    /// The frequency bands of a forward's output on its latent grid, in float32.
    fn bands(output: &Tensor, ctx: &ForwardContext) -> (Tensor, Tensor) {
        split_bands(&ctx.layout.to_grid(output).to_kind(Kind::Float))
    }

    /// `(N, timestep range)` for an attention module of `role`, if such modules are hooked.
    fn settings(&self, role: AttentionRole) -> Option<(u32, TimestepRange)> {
        let c = &self.config;
        match role {
            AttentionRole::Spatial => Some((
                c.spatial_attention_block_skip_range,
                c.spatial_attention_timestep_skip_range,
            )),
            AttentionRole::Temporal => c
                .temporal_attention_block_skip_range
                .map(|n| (n, c.temporal_attention_timestep_skip_range)),
            AttentionRole::Cross => None,
        }
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
fn extrapolate(older: &Tensors, newer: &Tensors, w: f64) -> Tensors {
    newer.zip_map(older, |new, old| new + (new - old) * w)
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
    fn cfg_rows(&mut self, ctx: &ForwardContext) -> CfgRows {
        self.observe(ctx);
        self.has_uncond = true;
        self.begin_step(ctx);
        if self.reuse_uncond {
            CfgRows::CondOnly
        } else {
            CfgRows::Both
        }
    }

    fn rebuild_uncond(&mut self, ctx: &ForwardContext, cond: &Tensor) -> Tensor {
        let uncond = self.rebuilt_uncond(cond, ctx);
        Tensor::cat(&[&uncond, cond], 0)
    }

    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.observe(ctx);
        if ctx.batched_cfg {
            // The step began in `cfg_rows`.
            return Decision::Compute;
        }
        match ctx.branch {
            Branch::Cond => {
                self.begin_step(ctx);
                Decision::Compute
            }
            Branch::Uncond => {
                self.has_uncond = true;
                match self.cond_output.as_ref().map(Tensor::shallow_clone) {
                    Some(cond) if self.reuse_uncond => {
                        Decision::Predict(self.rebuilt_uncond(&cond, ctx))
                    }
                    _ => Decision::Compute,
                }
            }
        }
    }

    fn after_forward(&mut self, ctx: &ForwardContext, output: &Tensor) {
        if self.config.is_guidance_distilled {
            return;
        }
        let deltas = |uncond: &Tensor, cond: &Tensor| {
            let (low_u, high_u) = Self::bands(uncond, ctx);
            let (low_c, high_c) = Self::bands(cond, ctx);
            (low_u - low_c, high_u - high_c)
        };
        if ctx.batched_cfg {
            // A full `[uncond; cond]` batch refreshes the deltas; a conditional-only one is
            // completed by `rebuild_uncond`.
            if !self.reuse_uncond {
                let halves = output.chunk(2, 0);
                self.deltas = Some(deltas(&halves[0], &halves[1]));
            }
            return;
        }
        match ctx.branch {
            Branch::Cond => self.cond_output = Some(output.shallow_clone()),
            Branch::Uncond => {
                if let Some(cond) = &self.cond_output {
                    self.deltas = Some(deltas(output, cond));
                }
            }
        }
    }

    fn before_attention(&mut self, id: &AttentionId) -> Decision<Tensors> {
        let Some((n, range)) = self.settings(id.role) else {
            return Decision::Compute;
        };
        if !self.keeps_attention() {
            return Decision::Compute;
        }
        let n = n as u64;
        let skip_candidate = self.extrapolates_attention() && range.contains(self.timestep);
        let w = self.config.attention_weight.at(self.step, self.num_steps) as f64;
        let state = self
            .attention
            .get_mut(self.branch)
            .entry(id.index)
            .or_default();
        let iteration = state.iteration;
        state.iteration += 1;
        let skip = skip_candidate && !(iteration > 0 && iteration.is_multiple_of(n));
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

    fn after_attention(&mut self, id: &AttentionId, output: &Tensors) {
        if !self.keeps_attention() || self.settings(id.role).is_none() {
            return;
        }
        // A full batched-CFG batch keeps its conditional half: the only one ever extrapolated.
        let output = if self.batched && !self.config.is_guidance_distilled && !self.reuse_uncond {
            Tensors(
                output
                    .iter()
                    .map(|t| t.chunk(2, 0)[1].shallow_clone())
                    .collect(),
            )
        } else {
            output.shallow_clone()
        };
        let state = self
            .attention
            .get_mut(self.branch)
            .entry(id.index)
            .or_default();
        state.cache = Some(match state.cache.take() {
            Some([_, newer]) => [newer, output],
            None => [output.shallow_clone(), output],
        });
    }
}

impl CacheStrategy for FasterCache {
    fn kind(&self) -> CacheKind {
        CacheKind::FasterCache
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
            .flat_map(|[older, newer]| older.iter().chain(newer.iter()))
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

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::cache::config::AttentionWeight;
    use crate::cache::test_util::{attn, attn_decisions, ctx, layout, single, Toy};
    use crate::cache::NoCache;
    use crate::dit::hooks::StepStats;
    use crate::dit::layout::LatentLayout;

    fn config(distilled: bool) -> FasterCacheConfig {
        FasterCacheConfig {
            spatial_attention_block_skip_range: 2,
            temporal_attention_block_skip_range: None,
            spatial_attention_timestep_skip_range: TimestepRange::new(-1.0, 681.0),
            temporal_attention_timestep_skip_range: TimestepRange::new(-1.0, 681.0),
            low_frequency_weight_update_timestep_range: TimestepRange::new(99.0, 901.0),
            high_frequency_weight_update_timestep_range: TimestepRange::new(-1.0, 301.0),
            alpha_low_frequency: 1.1,
            alpha_high_frequency: 1.1,
            unconditional_batch_skip_range: 5,
            unconditional_batch_timestep_skip_range: TimestepRange::new(-1.0, 641.0),
            attention_weight: AttentionWeight::Constant(0.5),
            is_guidance_distilled: distilled,
        }
    }

    /// 1000, 900, ..., 100.
    fn timesteps(steps: usize) -> Vec<f64> {
        (0..steps)
            .map(|i| 1000.0 * (1.0 - i as f64 / steps as f64))
            .collect()
    }

    #[test]
    fn distilled_attention_schedule() {
        // In range (t < 681) from call 4; computes at even calls there.
        let mut fc = FasterCache::new(config(true));
        assert_eq!(
            attn_decisions(&mut fc, &timesteps(10), Branch::Cond),
            "CCCCCPCPCP"
        );
        // Already in range at the first call: computes (diffusers fails there).
        let mut fc = FasterCache::new(config(true));
        assert_eq!(attn_decisions(&mut fc, &[500.0; 4], Branch::Cond), "CPCP");
    }

    #[test]
    fn extrapolations_are_linear_and_cached() {
        let mut c = config(true);
        c.spatial_attention_block_skip_range = 3;
        c.spatial_attention_timestep_skip_range = TimestepRange::new(-1.0, 1001.0);
        let mut fc = FasterCache::new(c);
        let id = attn(&single(0, 1, 2));
        let mut seen = Vec::new();
        for (step, value) in [1.0f32, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]
            .into_iter()
            .enumerate()
        {
            fc.before_forward(&ctx(step, 500.0, Branch::Cond));
            seen.push(match fc.before_attention(&id) {
                Decision::Compute => {
                    fc.after_attention(&id, &Tensors(vec![Tensor::from_slice(&[value])]));
                    value as f64
                }
                Decision::Predict(out) => out[0].double_value(&[0]),
                other => panic!("unexpected {other:?}"),
            });
        }
        // [c0, c0] -> c0 twice; compute 5; 5 + (5 - 1) / 2 = 7; 7 + (7 - 5) / 2 = 8; compute at 6.
        assert_eq!(seen, [1.0, 1.0, 1.0, 5.0, 7.0, 8.0, 0.0]);
    }

    #[test]
    fn uncond_reuse_and_the_cond_attention_schedule() {
        let toy = Toy { dual: 1, single: 1 };
        let mut fc = FasterCache::new(config(false));
        let letters = toy.run(&mut fc, &timesteps(10), &[Branch::Cond, Branch::Uncond]);
        // Uncond (t < 641 from step 4): rebuilt except at iterations that are multiples of 5.
        assert_eq!(letters[1], "CCCCFCFFFF");
        // Cond attention extrapolates only at odd calls of steps whose uncond is rebuilt.
        assert_eq!(letters[0], "CCCCCCCPCP");
        assert!(fc.attention.uncond.is_empty());
        // Without an unconditional pass the conditional one follows its own schedule.
        let mut fc = FasterCache::new(config(false));
        assert_eq!(
            toy.run(&mut fc, &timesteps(10), &[Branch::Cond])[0],
            "CCCCCPCPCP"
        );
        // Distilled with true CFG: no reuse, each branch extrapolates on its own.
        let mut fc = FasterCache::new(config(true));
        let letters = toy.run(&mut fc, &timesteps(10), &[Branch::Cond, Branch::Uncond]);
        assert_eq!(letters, ["CCCCCPCPCP", "CCCCCPCPCP"]);
    }

    /// True outputs of the toy, per step and branch.
    fn reference(toy: &Toy, step: usize, branch: Branch) -> Tensor {
        toy.forward(
            &mut NoCache,
            &ctx(step, 500.0, branch),
            &mut StepStats::default(),
        )
    }

    #[test]
    fn rebuilt_uncond_is_cond_plus_weighted_band_deltas() {
        let toy = Toy { dual: 1, single: 1 };
        let mut c = config(false);
        // No attention extrapolation, so the conditional outputs are exact.
        c.spatial_attention_timestep_skip_range = TimestepRange::new(-1.0, 0.0);
        c.unconditional_batch_timestep_skip_range = TimestepRange::new(-1.0, 1001.0);
        c.low_frequency_weight_update_timestep_range = TimestepRange::new(-1.0, 1001.0);
        c.high_frequency_weight_update_timestep_range = TimestepRange::new(-1.0, 1001.0);
        let delta0 = reference(&toy, 0, Branch::Uncond) - reference(&toy, 0, Branch::Cond);
        for (alpha_low, alpha_high) in [(1.0, 1.0), (1.1, 1.1), (1.5, 0.5)] {
            c.alpha_low_frequency = alpha_low;
            c.alpha_high_frequency = alpha_high;
            let mut fc = FasterCache::new(c.clone());
            for step in 0..3 {
                let mut stats = StepStats::default();
                let _ = toy.forward(&mut fc, &ctx(step, 500.0, Branch::Cond), &mut stats);
                let uncond = toy.forward(&mut fc, &ctx(step, 500.0, Branch::Uncond), &mut stats);
                assert_eq!(stats.forwards.predicted, (step > 0) as u32);
                // Weights compound: alpha^step on each band of the step-0 delta.
                let (low, high) = split_bands(&layout().to_grid(&delta0));
                let weighted = low * (alpha_low as f64).powi(step as i32)
                    + high * (alpha_high as f64).powi(step as i32);
                let expected = reference(&toy, step, Branch::Cond)
                    + layout().to_tokens(&from_bands(&weighted));
                let err = (uncond - expected).abs().max().double_value(&[]);
                assert!(
                    err < 1e-5,
                    "alphas ({alpha_low}, {alpha_high}) step {step}: {err}"
                );
            }
        }
    }

    #[test]
    fn bands_split_the_spectrum() {
        let x = Tensor::randn([2, 3, 16, 12], (Kind::Float, Device::Cpu));
        let (low, high) = split_bands(&x);
        // Radius floor(12 / 5) = 2 around (8, 6): 13 points of the disc.
        let mask = low.abs().gt(0.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(mask, 2 * 3 * 13);
        assert!(from_bands(&(low + high)).allclose(&x, 1e-5, 1e-5, false));
        let packed = Tensor::randn([1, 64, 8], (Kind::Float, Device::Cpu));
        assert!(layout()
            .to_tokens(&layout().to_grid(&packed))
            .equal(&packed));
    }

    #[test]
    fn state_bytes_count_outputs_deltas_and_attention() {
        let toy = Toy { dual: 1, single: 1 };
        let mut fc = FasterCache::new(config(false));
        toy.run(&mut fc, &[1000.0], &[Branch::Cond, Branch::Uncond]);
        let cond_output = 64 * 8 * 4;
        // Two complex64 bands of the [1, 8, 8, 8] grid.
        let deltas = 2 * (8 * 8 * 8) * 8;
        let attention = (64 + 3) * 8 * 4 + 67 * 8 * 4;
        assert_eq!(fc.state_bytes(), (cond_output + deltas + attention) as u64);
    }
}
