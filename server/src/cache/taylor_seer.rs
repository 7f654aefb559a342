//! TaylorSeer (arXiv 2503.06923), as diffusers 0.42.1 implements it.
//!
//! Every hooked module counts its own calls `s` (from 0, per CFG branch). A call computes when
//! `s < disable_cache_before_step` (warm-up), when `(s - before - 1) mod cache_interval == 0`, or
//! when `s >= disable_cache_after_step`; a computed output `y` refreshes the module's Taylor
//! factors: order 0 is `y`, order `k + 1` is `(new order k - old order k) / d` with `d` the steps
//! since the previous refresh (differences in the output dtype, factors stored in
//! `taylor_factors_dtype`). Any other call returns `sum_k factor_k * m^k / k!`, `m` = steps
//! since the last refresh, accumulated in the output dtype.
//!
//! Hooked modules are matched by name (`fullmatch`) against the config's regexes: "active" ones
//! (`cache_identifiers`; default: every `transformer_blocks.i.attn` and
//! `single_transformer_blocks.j.attn`) are predicted; "inactive" ones (`skip_predict_identifiers`,
//! winning over active) return zeros of their last shape on predicted calls. The names on offer
//! are diffusers' module paths of what the transformer lets us intercept, as the family names
//! them: blocks (`transformer_blocks.3`), their attention (`transformer_blocks.3.attn` on FLUX)
//! and the output projection (`proj_out`).
//!
//! **Lite mode** predicts the model output and skips the blocks. diffusers implements it as
//! "`proj_out` active, every block inactive": on predicted steps each block returns zeros,
//! `norm_out` normalises those zeros, and `proj_out` ignores that meaningless input and returns
//! its prediction. So the output is still the Taylor extrapolation of past outputs: checked on a
//! tiny diffusers 0.42.1 FLUX transformer (predicted output == extrapolation, exactly) and by the
//! parity test, which matches diffusers' lite mode while feeding it different block values. (The
//! "pure noise on FLUX" comment in the TaylorSeer pull request predates the merged code and used
//! another pattern API.) We make the same prediction without manufacturing garbage: on predicted
//! steps every block is skipped with its input passed through (no zero tensors, no block state),
//! and the output projection hook, which covers `norm_out` and `proj_out` in our transformer,
//! returns the prediction, so nothing runs on meaningless inputs. As in diffusers, lite mode
//! ignores the identifier lists.
//!
//! Divergences from diffusers: a call that would predict before any refresh (e.g.
//! `disable_cache_before_step = 0`) computes instead of failing. State is per CFG branch, as
//! diffusers' "cond"/"uncond" contexts.
use std::collections::HashMap;

use regex::Regex;
use tch::{Device, Kind, Tensor};

use super::config::{FactorDtype, TaylorSeerConfig};
use super::{bytes_of, CacheKind, CacheStrategy, PerBranch};
use crate::dit::hooks::{
    AttentionId, BlockId, Branch, Decision, ForwardContext, Tensors, TransformerHooks,
};
use crate::error::{ServiceError, ServiceResult};

/// diffusers' default active patterns (attention modules).
const DEFAULT_CACHE_IDENTIFIERS: [&str; 4] = [
    "^blocks.*attn",
    "^transformer_blocks.*attn",
    "^single_transformer_blocks.*attn",
    "^temporal_transformer_blocks.*attn",
];

/// The output projection's module name.
const PROJ_OUT: &str = "proj_out";

/// TaylorSeer's per-generation state and decision rule.
#[derive(Debug)]
pub struct TaylorSeer {
    schedule: Schedule,
    max_order: usize,
    factor_kind: Kind,
    /// `None` in lite mode.
    patterns: Option<Patterns>,
    branch: Branch,
    /// Per branch, per hooked module name.
    modules: PerBranch<HashMap<String, ModuleState>>,
    /// Lite mode: the forward in progress predicts the output projection and skips the blocks.
    lite_predicting: bool,
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    interval: i64,
    before: i64,
    after: Option<i64>,
}

impl Schedule {
    fn computes(&self, s: i64) -> bool {
        s < self.before
            || (s - self.before - 1).rem_euclid(self.interval) == 0
            || self.after.is_some_and(|a| s >= a)
    }
}

#[derive(Debug)]
struct Patterns {
    active: Vec<Regex>,
    inactive: Vec<Regex>,
}

impl Patterns {
    /// `Some(inactive?)` for a hooked module.
    fn role(&self, name: &str) -> Option<bool> {
        if self.inactive.iter().any(|r| r.is_match(name)) {
            Some(true)
        } else if self.active.iter().any(|r| r.is_match(name)) {
            Some(false)
        } else {
            None
        }
    }
}

/// Python's `re.fullmatch(pattern, name)`.
/// A module pattern as diffusers applies it (`re.fullmatch`). The compiled size is capped so that
/// a short pattern with huge repetition counts is refused instead of compiled at length.
pub fn fullmatch(pattern: &str, field: &str) -> ServiceResult<Regex> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ServiceError::invalid(field, e.to_string()))
}

#[derive(Debug)]
struct ModuleState {
    inactive: bool,
    current_step: i64,
    last_update_step: Option<i64>,
    /// Per output, factors of order 0..=k (active modules).
    factors: Vec<Vec<Tensor>>,
    /// Per output: dtype, and shape (inactive modules return zeros of it).
    kinds: Vec<Kind>,
    shapes: Vec<Vec<i64>>,
    device: Device,
}

impl ModuleState {
    fn new(inactive: bool) -> Self {
        Self {
            inactive,
            current_step: -1,
            last_update_step: None,
            factors: Vec::new(),
            kinds: Vec::new(),
            shapes: Vec::new(),
            device: Device::Cpu,
        }
    }

    /// Counts a call; true when it must compute.
    fn begin_call(&mut self, schedule: &Schedule) -> bool {
        self.current_step += 1;
        // Nothing to predict from yet: compute (diffusers raises here).
        schedule.computes(self.current_step) || self.last_update_step.is_none()
    }

    fn update(&mut self, outputs: &[Tensor], max_order: usize, factor_kind: Kind) {
        self.kinds = outputs.iter().map(|t| t.kind()).collect();
        self.device = outputs[0].device();
        if self.inactive {
            self.shapes = outputs.iter().map(|t| t.size()).collect();
        } else {
            let delta = self
                .last_update_step
                .map(|last| (self.current_step - last) as f64);
            let mut factors = Vec::with_capacity(outputs.len());
            for (i, y) in outputs.iter().enumerate() {
                let mut new = vec![y.shallow_clone()];
                if let (Some(d), Some(old)) = (delta, self.factors.get(i)) {
                    for j in 0..max_order {
                        // A factor of another shape cannot be differenced: restart from order 0.
                        let Some(prev) = old.get(j).filter(|p| p.size() == new[j].size()) else {
                            break;
                        };
                        let next = (&new[j] - prev.to_kind(y.kind())) / d;
                        new.push(next);
                    }
                }
                factors.push(new.iter().map(|f| f.to_kind(factor_kind)).collect());
            }
            self.factors = factors;
        }
        self.last_update_step = Some(self.current_step);
    }

    fn predict(&self) -> Vec<Tensor> {
        if self.inactive {
            return self
                .shapes
                .iter()
                .zip(&self.kinds)
                .map(|(shape, &kind)| Tensor::zeros(shape.as_slice(), (kind, self.device)))
                .collect();
        }
        let m = (self.current_step - self.last_update_step.unwrap_or(self.current_step)) as f64;
        self.factors
            .iter()
            .zip(&self.kinds)
            .map(|(factors, &kind)| {
                // Not `+=`: order 0 may alias the stored factor, which must stay intact.
                factors.iter().enumerate().skip(1).fold(
                    factors[0].to_kind(kind),
                    |out, (k, factor)| {
                        // m^k / k!, exactly as Python's `(m ** k) / math.factorial(k)` here.
                        let coeff = m.powi(k as i32) / (1..=k).product::<usize>() as f64;
                        out + factor.to_kind(kind) * coeff
                    },
                )
            })
            .collect()
    }

    fn bytes(&self) -> u64 {
        bytes_of(self.factors.iter().flatten().map(Some))
    }
}

impl TaylorSeer {
    /// A strategy with empty state; fails on a pattern the regex engine rejects.
    pub fn new(config: TaylorSeerConfig) -> ServiceResult<Self> {
        let compile = |patterns: &[String], field: &str| {
            patterns
                .iter()
                .enumerate()
                .map(|(i, p)| fullmatch(p, &format!("cache.taylor_seer.{field}[{i}]")))
                .collect::<ServiceResult<Vec<_>>>()
        };
        let patterns = if config.use_lite_mode {
            None
        } else {
            let active = if config.cache_identifiers.is_empty() {
                DEFAULT_CACHE_IDENTIFIERS
                    .iter()
                    .map(|p| fullmatch(p, "cache.taylor_seer.cache_identifiers"))
                    .collect::<ServiceResult<Vec<_>>>()?
            } else {
                compile(&config.cache_identifiers, "cache_identifiers")?
            };
            Some(Patterns {
                active,
                inactive: compile(&config.skip_predict_identifiers, "skip_predict_identifiers")?,
            })
        };
        Ok(Self {
            schedule: Schedule {
                interval: config.cache_interval as i64,
                before: config.disable_cache_before_step as i64,
                after: config.disable_cache_after_step.map(i64::from),
            },
            max_order: config.max_order as usize,
            factor_kind: match config.taylor_factors_dtype {
                FactorDtype::BFloat16 => Kind::BFloat16,
                FactorDtype::Float16 => Kind::Half,
                FactorDtype::Float32 => Kind::Float,
            },
            patterns,
            branch: Branch::Cond,
            modules: PerBranch::default(),
            lite_predicting: false,
        })
    }

    /// Counts a call of `name` and returns its prediction, or `None` to compute (also for modules
    /// that are not hooked).
    fn begin_call(&mut self, name: &str) -> Option<(bool, Vec<Tensor>)> {
        let inactive = self.patterns.as_ref()?.role(name)?;
        let schedule = self.schedule;
        let state = self
            .modules
            .get_mut(self.branch)
            .entry(name.to_owned())
            .or_insert_with(|| ModuleState::new(inactive));
        if state.begin_call(&schedule) {
            None
        } else {
            Some((inactive, state.predict()))
        }
    }

    fn end_call(&mut self, name: &str, outputs: &[Tensor]) {
        let (max_order, factor_kind) = (self.max_order, self.factor_kind);
        if let Some(state) = self.modules.get_mut(self.branch).get_mut(name) {
            state.update(outputs, max_order, factor_kind);
        }
    }
}

/// A prediction (or, for an inactive module, zeros) as a decision.
fn decide<T>(
    prediction: Option<(bool, Vec<Tensor>)>,
    build: impl FnOnce(Vec<Tensor>) -> T,
) -> Decision<T> {
    match prediction {
        None => Decision::Compute,
        Some((false, outputs)) => Decision::Predict(build(outputs)),
        Some((true, outputs)) => Decision::Skip(build(outputs)),
    }
}

impl TransformerHooks for TaylorSeer {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.branch = ctx.branch;
        if self.patterns.is_none() {
            let schedule = self.schedule;
            let state = self
                .modules
                .get_mut(self.branch)
                .entry(PROJ_OUT.to_owned())
                .or_insert_with(|| ModuleState::new(false));
            self.lite_predicting = !state.begin_call(&schedule);
        }
        Decision::Compute
    }

    fn before_block(&mut self, id: &BlockId, input: &Tensors) -> Decision<Tensors> {
        if self.patterns.is_none() {
            return if self.lite_predicting {
                Decision::Skip(input.shallow_clone())
            } else {
                Decision::Compute
            };
        }
        decide(self.begin_call(&id.path), Tensors)
    }

    fn after_block(&mut self, id: &BlockId, _input: &Tensors, output: &Tensors) {
        if self.patterns.is_some() {
            self.end_call(&id.path, &output.0);
        }
    }

    fn before_attention(&mut self, id: &AttentionId) -> Decision<Tensors> {
        decide(self.begin_call(&id.path), Tensors)
    }

    fn after_attention(&mut self, id: &AttentionId, output: &Tensors) {
        self.end_call(&id.path, &output.0);
    }

    fn before_output_projection(&mut self) -> Decision<Tensor> {
        if self.patterns.is_none() {
            return if self.lite_predicting {
                let state = &self.modules.get(self.branch)[PROJ_OUT];
                Decision::Predict(state.predict().remove(0))
            } else {
                Decision::Compute
            };
        }
        decide(self.begin_call(PROJ_OUT), |mut outputs| outputs.remove(0))
    }

    fn after_output_projection(&mut self, output: &Tensor) {
        self.end_call(PROJ_OUT, std::slice::from_ref(output));
    }
}

impl CacheStrategy for TaylorSeer {
    fn kind(&self) -> CacheKind {
        CacheKind::TaylorSeer
    }

    fn state_bytes(&self) -> u64 {
        self.modules
            .both()
            .into_iter()
            .flat_map(|modules| modules.values())
            .map(ModuleState::bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::{attn, attn_decisions, ctx, dual, Toy};
    use crate::dit::hooks::StepStats;

    fn config(interval: u32, before: u32, after: Option<u32>, order: u32) -> TaylorSeerConfig {
        TaylorSeerConfig {
            cache_interval: interval,
            disable_cache_before_step: before,
            disable_cache_after_step: after,
            max_order: order,
            taylor_factors_dtype: FactorDtype::Float32,
            skip_predict_identifiers: Vec::new(),
            cache_identifiers: Vec::new(),
            use_lite_mode: false,
        }
    }

    fn schedule(interval: u32, before: u32, after: Option<u32>, steps: usize) -> String {
        let mut ts = TaylorSeer::new(config(interval, before, after, 1)).unwrap();
        let letters = attn_decisions(&mut ts, &vec![500.0; steps], Branch::Cond);
        letters.replace('P', "p")
    }

    #[test]
    fn schedules_match_the_reference() {
        assert_eq!(
            schedule(5, 3, None, 50),
            "CCCpCppppCppppCppppCppppCppppCppppCppppCppppCppppC"
        );
        assert_eq!(
            schedule(5, 10, None, 50),
            "CCCCCCCCCCpCppppCppppCppppCppppCppppCppppCppppCppp"
        );
        assert_eq!(
            schedule(5, 10, Some(45), 50),
            "CCCCCCCCCCpCppppCppppCppppCppppCppppCppppCpppCCCCC"
        );
        assert_eq!(schedule(3, 1, None, 8), "CpCppCpp");
        // Step 0 has nothing to predict from: it computes where diffusers would fail.
        assert_eq!(schedule(3, 0, None, 5), "CCppC");
    }

    /// Feeds `values[s]` as the computed output of one single-stream attention and returns what
    /// each call yields.
    fn outputs(ts: &mut TaylorSeer, values: &[f32], branch: Branch) -> Vec<f64> {
        let id = attn(&crate::cache::test_util::single(0, 1, 2));
        values
            .iter()
            .enumerate()
            .map(|(step, &v)| {
                ts.before_forward(&ctx(step, 500.0, branch));
                match ts.before_attention(&id) {
                    Decision::Compute => {
                        ts.after_attention(&id, &Tensors(vec![Tensor::from_slice(&[v])]));
                        v as f64
                    }
                    Decision::Predict(out) => out[0].double_value(&[0]),
                    other => panic!("unexpected {other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn predictions_are_taylor_extrapolations() {
        // Order 1 reproduces a linear signal exactly, across uneven gaps.
        let linear: Vec<f32> = (0..12).map(|s| 2.0 + 3.0 * s as f32).collect();
        let mut ts = TaylorSeer::new(config(4, 2, None, 1)).unwrap();
        let got = outputs(&mut ts, &linear, Branch::Cond);
        assert_eq!(got, linear.iter().map(|&v| v as f64).collect::<Vec<_>>());
        // Order 2 on s^2 after computes at 0, 1, 2: f = [4, 3, 2], at m = 1: 4 + 3 + 2/2 = 8.
        let square: Vec<f32> = (0..4).map(|s| (s * s) as f32).collect();
        let mut ts = TaylorSeer::new(config(5, 3, None, 2)).unwrap();
        assert_eq!(
            outputs(&mut ts, &square, Branch::Cond),
            [0.0, 1.0, 4.0, 8.0]
        );
        // Differences are divided by the latest gap only (as diffusers): computes at 0,1,2,4.
        // At 4: f1 = (16 - 4) / 2 = 6, f2 = (6 - 3) / 2 = 1.5; step 5 (m = 1): 16 + 6 + 0.75.
        let square: Vec<f32> = (0..6).map(|s| (s * s) as f32).collect();
        let mut ts = TaylorSeer::new(config(5, 3, None, 2)).unwrap();
        assert_eq!(outputs(&mut ts, &square, Branch::Cond)[5], 22.75);
    }

    #[test]
    fn branches_and_fresh_strategies_are_independent() {
        let values: Vec<f32> = (0..6).map(|s| s as f32).collect();
        let negated: Vec<f32> = values.iter().map(|v| -v).collect();
        let mut ts = TaylorSeer::new(config(5, 3, None, 1)).unwrap();
        let id = attn(&crate::cache::test_util::single(0, 1, 2));
        let mut cond = Vec::new();
        let mut uncond = Vec::new();
        for step in 0..6 {
            for (branch, v, out) in [
                (Branch::Cond, values[step], &mut cond),
                (Branch::Uncond, negated[step], &mut uncond),
            ] {
                ts.before_forward(&ctx(step, 500.0, branch));
                out.push(match ts.before_attention(&id) {
                    Decision::Compute => {
                        ts.after_attention(&id, &Tensors(vec![Tensor::from_slice(&[v])]));
                        v as f64
                    }
                    Decision::Predict(out) => out[0].double_value(&[0]),
                    other => panic!("unexpected {other:?}"),
                });
            }
        }
        assert_eq!(cond, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(uncond, [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]);
        // A fresh strategy (switch / reset) warms up again from its own step 0.
        let mut fresh = TaylorSeer::new(config(5, 3, None, 1)).unwrap();
        assert_eq!(
            attn_decisions(&mut fresh, &[500.0; 4], Branch::Cond),
            "CCCP"
        );
    }

    #[test]
    fn inactive_modules_return_zeros_and_patterns_select_modules() {
        let mut c = config(5, 1, None, 1);
        c.cache_identifiers = vec![r"transformer_blocks\.0\.attn".into()];
        c.skip_predict_identifiers = vec![r"single_transformer_blocks\.\d+".into()];
        let mut ts = TaylorSeer::new(c).unwrap();
        let toy = Toy { dual: 2, single: 1 };
        let mut letters = String::new();
        for step in 0..3 {
            let mut stats = StepStats::default();
            let _ = toy.forward(&mut ts, &ctx(step, 500.0, Branch::Cond), &mut stats);
            letters.push_str(&format!(
                "{}{}{}/",
                stats.attention.predicted, stats.blocks.skipped, stats.attention.computed
            ));
        }
        // Step 1 predicts dual block 0's attention and zeroes the single block; dual block 1's
        // attention is not hooked and computes. Step 2 is a compute step ((2-1-1) % 5 == 0).
        assert_eq!(letters, "003/111/003/");
        let id = crate::cache::test_util::single(0, 2, 3);
        let state = &ts.modules.cond[&id.path];
        assert!(state.inactive && state.factors.is_empty());
        assert_eq!(state.shapes, [vec![1, 64, 8], vec![1, 3, 8]]);
        let zeros = state.predict();
        assert_eq!(zeros[0].abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn lite_mode_predicts_the_output_and_passes_blocks_through() {
        let mut c = config(2, 2, None, 1);
        c.use_lite_mode = true;
        let mut ts = TaylorSeer::new(c).unwrap();
        let toy = Toy { dual: 1, single: 2 };
        // (step, output) of the computed forwards.
        let mut computed: Vec<(usize, Tensor)> = Vec::new();
        for step in 0..6 {
            let mut stats = StepStats::default();
            let out = toy.forward(&mut ts, &ctx(step, 500.0, Branch::Cond), &mut stats);
            // Schedule before 2, interval 2: C C p C p C.
            if [2, 4].contains(&step) {
                assert_eq!((stats.blocks.skipped, stats.blocks.computed), (3, 0));
                assert_eq!(stats.output_projection.predicted, 1);
                assert_eq!(stats.attention.total(), 0);
                let [(s0, y0), (s1, y1)] = &computed[computed.len() - 2..] else {
                    unreachable!()
                };
                let slope = (y1 - y0) / (s1 - s0) as f64;
                let expected = y1 + slope * (step - s1) as f64;
                assert!(out.allclose(&expected, 1e-6, 1e-6, false), "step {step}");
            } else {
                assert!(stats.full_compute() && stats.output_projection.computed == 1);
                computed.push((step, out));
            }
        }
        // Only the projection's factors are kept: two orders of [1, 64, 8] float32.
        assert_eq!(ts.state_bytes(), 2 * 64 * 8 * 4);
    }

    #[test]
    fn factors_are_stored_in_the_factor_dtype() {
        let mut c = config(5, 3, None, 1);
        c.taylor_factors_dtype = FactorDtype::BFloat16;
        let mut ts = TaylorSeer::new(c).unwrap();
        let toy = Toy { dual: 1, single: 1 };
        for step in 0..2 {
            let _ = toy.forward(
                &mut ts,
                &ctx(step, 500.0, Branch::Cond),
                &mut StepStats::default(),
            );
        }
        // Dual attention: outputs [1,64,8] + [1,3,8]; single: [1,67,8]; 2 orders each, bf16.
        assert_eq!(ts.state_bytes(), 2 * ((64 + 3) * 8 + 67 * 8) * 2);
        let id = dual(0, 2);
        assert_eq!(
            ts.modules.cond[&attn(&id).path].factors[0][1].kind(),
            Kind::BFloat16
        );
    }
}
