//! MagCache (arXiv 2506.09045), as diffusers 0.42.1 implements it.
//!
//! The magnitude ratio between consecutive steps' residuals follows a model-specific curve
//! (`mag_ratios`, resampled nearest-neighbour to `num_inference_steps`). Before the first block
//! of forward `s` (counted per CFG branch from the strategy's first step), once past the
//! retention window `s >= round_half_up(retention_ratio * num_inference_steps)`, the head
//! multiplies the accumulated ratio by `mag_ratios[s]` and adds `|1 - ratio|` to the accumulated
//! error; while that error stays `<= threshold` and the consecutive skips `<= max_skip_steps`
//! (and a residual exists) the whole block stack is skipped: image stream = input + the residual
//! (last block output − first block input) of the last full forward, text stream unchanged.
//! Otherwise the accumulators reset and the blocks run. Arithmetic is float32, as diffusers'
//! 0-dim tensors. After `num_inference_steps` forwards the state resets itself.
//!
//! `calibrate`: never skip; record at every full forward the mean over tokens of
//! `||r_t|| / (||r_{t-1}|| + 1e-8)` (channel norms, float32; 1.0 at the first) and report them
//! through [`CacheStrategy::calibrated_mag_ratios`] (conditional branch; the last completed run of
//! `num_inference_steps` forwards, else the forwards so far).
//!
//! State is per CFG branch, as diffusers' "cond"/"uncond" contexts. The step index advances once
//! per forward, also for single-block transformers (diffusers' tail hook misses skipped steps
//! there).
use denoised_proto::v1 as pb;
use tch::{Kind, Tensor};

use super::config::MagCacheConfig;
use super::hooks::{BlockId, BlockIo, Branch, Decision, ForwardContext, TransformerHooks};
use super::{as_typed, bytes_of, CacheStrategy, PerBranch};

/// MagCache's per-generation state and decision rule.
#[derive(Debug)]
pub struct MagCache {
    threshold: f32,
    max_skip_steps: u32,
    num_inference_steps: usize,
    retention_steps: usize,
    /// `mag_ratios` resampled to `num_inference_steps` (empty when calibrating).
    ratios: Vec<f32>,
    calibrate: bool,
    branch: Branch,
    states: PerBranch<State>,
}

#[derive(Debug)]
struct State {
    previous_residual: Option<Tensor>,
    /// First block input of the forward in progress, until the last block's residual is taken.
    head_input: Option<Tensor>,
    skipping: bool,
    accumulated_ratio: f32,
    accumulated_err: f32,
    accumulated_steps: u32,
    step_index: usize,
    calibration: Vec<f32>,
    completed_calibration: Option<Vec<f32>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            previous_residual: None,
            head_input: None,
            skipping: false,
            accumulated_ratio: 1.0,
            accumulated_err: 0.0,
            accumulated_steps: 0,
            step_index: 0,
            calibration: Vec::new(),
            completed_calibration: None,
        }
    }
}

/// diffusers' `nearest_interp`: index `i` maps to `round_half_even(f32(i) * f32((L-1)/(T-1)))`.
fn nearest_interp(ratios: &[f32], target: usize) -> Vec<f32> {
    if ratios.len() == target || ratios.is_empty() {
        return ratios.to_vec();
    }
    if target == 1 {
        return vec![ratios[ratios.len() - 1]];
    }
    let scale = ((ratios.len() - 1) as f64 / (target - 1) as f64) as f32;
    (0..target)
        .map(|i| ratios[(i as f32 * scale).round_ties_even() as usize])
        .collect()
}

impl MagCache {
    /// A strategy with empty state.
    pub fn new(config: MagCacheConfig) -> Self {
        let n = config.num_inference_steps as usize;
        // Python's `int(retention_ratio * num_inference_steps + 0.5)` on the ratio as typed.
        let retention_steps = (as_typed(config.retention_ratio) * n as f64 + 0.5) as usize;
        Self {
            threshold: config.threshold,
            max_skip_steps: config.max_skip_steps,
            num_inference_steps: n,
            retention_steps,
            ratios: if config.calibrate {
                Vec::new()
            } else {
                nearest_interp(&config.mag_ratios, n)
            },
            calibrate: config.calibrate,
            branch: Branch::Cond,
            states: PerBranch::default(),
        }
    }

    /// The head's decision for the forward in progress: true to skip every block.
    fn decide_skip(&mut self) -> bool {
        if self.calibrate {
            return false;
        }
        let state = self.states.get_mut(self.branch);
        let s = state.step_index;
        if s < self.retention_steps {
            return false;
        }
        let scale = self.ratios.get(s).copied().unwrap_or(1.0);
        state.accumulated_ratio *= scale;
        state.accumulated_steps += 1;
        state.accumulated_err += (1.0 - state.accumulated_ratio).abs();
        let skip = state.previous_residual.is_some()
            && state.accumulated_err <= self.threshold
            && state.accumulated_steps <= self.max_skip_steps;
        if !skip {
            state.accumulated_ratio = 1.0;
            state.accumulated_steps = 0;
            state.accumulated_err = 0.0;
        }
        skip
    }
}

/// Mean over tokens of the ratio of channel norms, float32.
fn magnitude_ratio(current: &Tensor, previous: &Tensor) -> f32 {
    let norm = |t: &Tensor| t.to_kind(Kind::Float).linalg_norm(2, [-1i64].as_slice(), false, None::<Kind>);
    (norm(current) / (norm(previous) + 1e-8)).mean(None).double_value(&[]) as f32
}

impl TransformerHooks for MagCache {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.branch = ctx.branch;
        Decision::Compute
    }

    fn after_forward(&mut self, _ctx: &ForwardContext, _output: &Tensor) {
        let n = self.num_inference_steps;
        let state = self.states.get_mut(self.branch);
        state.step_index += 1;
        if state.step_index >= n {
            let calibration = std::mem::take(&mut state.calibration);
            *state = State {
                completed_calibration: Some(calibration),
                ..State::default()
            };
        }
    }

    fn before_block(&mut self, id: &BlockId, input: &BlockIo) -> Decision<BlockIo> {
        if id.is_first() {
            let skipping = self.decide_skip();
            let state = self.states.get_mut(self.branch);
            state.skipping = skipping;
            if !skipping {
                state.head_input = Some(input.hidden.shallow_clone());
                return Decision::Compute;
            }
            let residual = state.previous_residual.as_ref().expect("skipping needs a residual");
            return Decision::Skip(BlockIo {
                hidden: &input.hidden + residual,
                encoder: input.encoder.shallow_clone(),
            });
        }
        if self.states.get(self.branch).skipping {
            Decision::Skip(input.shallow_clone())
        } else {
            Decision::Compute
        }
    }

    fn after_block(&mut self, id: &BlockId, _input: &BlockIo, output: &BlockIo) {
        if !id.is_last() {
            return;
        }
        let calibrate = self.calibrate;
        let state = self.states.get_mut(self.branch);
        let Some(head_input) = state.head_input.take() else { return };
        let residual = &output.hidden - head_input;
        if calibrate {
            let ratio = state
                .previous_residual
                .as_ref()
                .map_or(1.0, |previous| magnitude_ratio(&residual, previous));
            state.calibration.push(ratio);
        }
        state.previous_residual = Some(residual);
    }
}

impl CacheStrategy for MagCache {
    fn kind(&self) -> pb::CacheKind {
        pb::CacheKind::MagCache
    }

    fn state_bytes(&self) -> u64 {
        self.states
            .both()
            .into_iter()
            .map(|s| bytes_of([s.previous_residual.as_ref(), s.head_input.as_ref()]))
            .sum()
    }

    fn calibrated_mag_ratios(&self) -> Option<Vec<f32>> {
        if !self.calibrate {
            return None;
        }
        let cond = &self.states.cond;
        cond.completed_calibration
            .clone()
            .or_else(|| (!cond.calibration.is_empty()).then(|| cond.calibration.clone()))
    }
}
