//! MagCache (arXiv 2506.09045), as diffusers 0.42.1 implements it.
//!
//! The magnitude ratio between consecutive steps' residuals follows a model-specific curve
//! (`mag_ratios`, resampled nearest-neighbour to `num_inference_steps`, by default the
//! generation's step count). Before the first block
//! of forward `s` (counted per CFG branch from the strategy's first step), once past the
//! retention window `s >= round_half_up(retention_ratio * num_inference_steps)`, the head
//! multiplies the accumulated ratio by `mag_ratios[s]` and adds `|1 - ratio|` to the accumulated
//! error; while that error stays `<= threshold` and the consecutive skips `<= max_skip_steps`
//! (and a residual exists) the whole block stack is skipped: hidden stream = input + the residual
//! (last block output − first block input, hidden stream as the family declares it) of the last
//! full forward, every other stream (text) unchanged.
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
use tch::{Kind, Tensor};

use super::config::MagCacheConfig;
use super::{as_typed, bytes_of, CacheKind, CacheStrategy, PerBranch};
use crate::dit::hooks::{BlockId, Branch, Decision, ForwardContext, Tensors, TransformerHooks};

/// diffusers' `FLUX_MAG_RATIOS` (28 steps), offered as the MagCache default for FLUX models.
pub const FLUX_MAG_RATIOS: [f32; 28] = [
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
    0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047,
    0.98828, 0.96484, 0.95703, 0.93359, 0.89062,
];

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
    /// A strategy with empty state for a generation of `num_steps` steps.
    pub fn new(config: MagCacheConfig, num_steps: usize) -> Self {
        let n = config.inference_steps(num_steps);
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
    let norm = |t: &Tensor| {
        t.to_kind(Kind::Float)
            .linalg_norm(2, [-1i64].as_slice(), false, None::<Kind>)
    };
    (norm(current) / (norm(previous) + 1e-8))
        .mean(None)
        .double_value(&[]) as f32
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

    fn before_block(&mut self, id: &BlockId, input: &Tensors) -> Decision<Tensors> {
        let hidden = id.streams.hidden;
        if id.is_first() {
            let skipping = self.decide_skip();
            let state = self.states.get_mut(self.branch);
            state.skipping = skipping;
            if !skipping {
                state.head_input = Some(input[hidden].shallow_clone());
                return Decision::Compute;
            }
            let residual = state
                .previous_residual
                .as_ref()
                .expect("skipping needs a residual");
            let mut output = input.shallow_clone();
            output.0[hidden] = &input[hidden] + residual;
            return Decision::Skip(output);
        }
        if self.states.get(self.branch).skipping {
            Decision::Skip(input.shallow_clone())
        } else {
            Decision::Compute
        }
    }

    fn after_block(&mut self, id: &BlockId, _input: &Tensors, output: &Tensors) {
        if !id.is_last() {
            return;
        }
        let calibrate = self.calibrate;
        let state = self.states.get_mut(self.branch);
        let Some(head_input) = state.head_input.take() else {
            return;
        };
        let residual = &output[id.streams.hidden] - head_input;
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
    fn kind(&self) -> CacheKind {
        CacheKind::MagCache
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::{ctx, dual, Toy};
    use crate::dit::hooks::{resolve, ModuleCounts};

    fn config(threshold: f32, steps: u32, ratios: &[f32]) -> MagCacheConfig {
        MagCacheConfig {
            threshold,
            max_skip_steps: 3,
            retention_ratio: 0.2,
            num_inference_steps: Some(steps),
            mag_ratios: ratios.to_vec(),
            calibrate: false,
        }
    }

    fn schedule(c: MagCacheConfig, steps: usize) -> String {
        let mut mc = MagCache::new(c, steps);
        let toy = Toy { dual: 1, single: 2 };
        toy.run(&mut mc, &vec![500.0; steps], &[Branch::Cond])[0].replace('S', "s")
    }

    #[test]
    fn flux_schedules_match_the_reference() {
        assert_eq!(
            schedule(config(0.06, 28, &FLUX_MAG_RATIOS), 28),
            "CCCCCCsCsCsssCsssCsssCssCsCC"
        );
        assert_eq!(
            schedule(config(0.20, 28, &FLUX_MAG_RATIOS), 28),
            "CCCCCCsssCsssCsssCsssCsssCsC"
        );
        let full = |threshold, steps| {
            schedule(config(threshold, steps as u32, &FLUX_MAG_RATIOS), steps)
                .matches('C')
                .count()
        };
        assert_eq!(full(0.10, 28), 13);
        assert_eq!(full(0.24, 28), 11);
        assert_eq!(full(0.06, 50), 26);
    }

    #[test]
    fn ratios_are_resampled_like_diffusers() {
        let ratios: Vec<f32> = (0..28).map(|i| i as f32).collect();
        let got: Vec<usize> = nearest_interp(&ratios, 50)
            .iter()
            .map(|&r| r as usize)
            .collect();
        assert_eq!(&got[..12], [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6]);
        assert_eq!(&got[47..], [26, 26, 27]);
        assert_eq!(nearest_interp(&ratios, 1), [27.0]);
        assert_eq!(nearest_interp(&ratios, 28), ratios);
    }

    /// Two blocks that double the image stream; returns the forward's image output.
    fn doubling_forward(mc: &mut MagCache, step: usize, x: f32) -> f32 {
        let c = ctx(step, 500.0, Branch::Cond);
        assert!(matches!(mc.before_forward(&c), Decision::Compute));
        let mut io = Tensors(vec![
            Tensor::from_slice(&[x]).view([1, 1, 1]),
            Tensor::zeros([1, 1, 1], (Kind::Float, tch::Device::Cpu)),
        ]);
        for i in 0..2 {
            let id = dual(i, 2);
            let (next, computed) = resolve(
                mc.before_block(&id, &io),
                &mut ModuleCounts::default(),
                || Tensors(vec![&io[0] * 2.0, io[1].shallow_clone()]),
            );
            if computed {
                mc.after_block(&id, &io, &next);
            }
            io = next;
        }
        mc.after_forward(&c, &io[0]);
        io[0].double_value(&[0, 0, 0]) as f32
    }

    #[test]
    fn skipped_forwards_add_the_last_residual_and_state_resets_itself() {
        let mut c = config(100.0, 3, &[1.0, 1.0, 1.0]);
        c.retention_ratio = 0.0;
        let mut mc = MagCache::new(c.clone(), 3);
        assert_eq!(doubling_forward(&mut mc, 0, 10.0), 40.0);
        assert_eq!(mc.state_bytes(), 4);
        // Skipped: 11 + (40 - 10), where computing would give 44.
        assert_eq!(doubling_forward(&mut mc, 1, 11.0), 41.0);
        assert_eq!(doubling_forward(&mut mc, 2, 12.0), 42.0);
        // num_inference_steps forwards done: fresh state, computes again.
        assert_eq!(doubling_forward(&mut mc, 3, 2.0), 8.0);
        // Retention covering every step: always computes.
        c.retention_ratio = 1.0;
        let mut mc = MagCache::new(c, 3);
        doubling_forward(&mut mc, 0, 10.0);
        assert_eq!(doubling_forward(&mut mc, 1, 11.0), 44.0);
    }

    #[test]
    fn calibration_records_ratios_and_never_skips() {
        let c = MagCacheConfig {
            calibrate: true,
            mag_ratios: Vec::new(),
            ..config(100.0, 3, &[])
        };
        let mut mc = MagCache::new(c, 3);
        assert_eq!(mc.calibrated_mag_ratios(), None);
        assert_eq!(doubling_forward(&mut mc, 0, 10.0), 40.0);
        assert_eq!(mc.calibrated_mag_ratios(), Some(vec![1.0]));
        // Residuals 3x: ratio 33 / 30.
        assert_eq!(doubling_forward(&mut mc, 1, 11.0), 44.0);
        assert_eq!(doubling_forward(&mut mc, 2, 5.0), 20.0);
        let expected = vec![1.0, (33.0f32 / (30.0 + 1e-8)), 15.0 / (33.0 + 1e-8)];
        assert_eq!(mc.calibrated_mag_ratios(), Some(expected.clone()));
        // The completed run stays reported while a new one starts.
        doubling_forward(&mut mc, 3, 1.0);
        assert_eq!(mc.calibrated_mag_ratios(), Some(expected));
        // Not calibrating: nothing to report.
        assert_eq!(
            MagCache::new(config(0.06, 28, &FLUX_MAG_RATIOS), 28).calibrated_mag_ratios(),
            None
        );
    }

    #[test]
    fn branches_keep_separate_curves() {
        let mut mc = MagCache::new(config(0.06, 28, &FLUX_MAG_RATIOS), 28);
        let toy = Toy { dual: 1, single: 1 };
        let letters = toy.run(&mut mc, &vec![500.0; 28], &[Branch::Cond, Branch::Uncond]);
        assert_eq!(letters[0], "CCCCCCSCSCSSSCSSSCSSSCSSCSCC");
        assert_eq!(letters[1], letters[0]);
        // One residual per branch: [1, 64, 8] float32 each.
        let mut mc = MagCache::new(config(0.06, 28, &FLUX_MAG_RATIOS), 28);
        toy.run(&mut mc, &[500.0], &[Branch::Cond, Branch::Uncond]);
        assert_eq!(mc.state_bytes(), 2 * 64 * 8 * 4);
        assert_eq!(
            (mc.states.cond.step_index, mc.states.uncond.step_index),
            (1, 1)
        );
    }
}
