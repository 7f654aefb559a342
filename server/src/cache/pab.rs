//! Pyramid Attention Broadcast (arXiv 2408.12588), as diffusers 0.42.1 implements it.
//!
//! Every hooked attention module counts its own calls. A call computes when the module has no
//! cached output yet, on its first call, when the timestep lies outside the (strict) skip range,
//! or when the call index is a multiple of the skip range `N`; otherwise the last output is
//! broadcast (returned verbatim, no extrapolation). The counter advances on every call, in range
//! or not, so the phase inside the range depends on the calls before it.
//!
//! Module selection follows each attention module's [`AttentionRole`]: spatial, temporal and
//! cross-attention modules use their own `(N, range)` settings, and a role whose skip range is
//! unset is not hooked. FLUX's joint and single-stream attention (`transformer_blocks.i.attn`,
//! `single_transformer_blocks.j.attn`) and CogVideoX's full 3D `attn1` are spatial in diffusers'
//! classification, so only the spatial settings apply to them, and a config with only temporal or
//! cross ranges set hooks nothing there.
//!
//! Divergence from diffusers: counters and caches are kept per CFG branch. diffusers keeps one
//! counter and one cache per module for both passes of FLUX's sequential true CFG, so with `N = 2`
//! the branch landing on a reuse call receives the *other* branch's attention output.
use std::collections::HashMap;

use tch::Tensor;

use super::config::{PyramidAttentionBroadcastConfig, TimestepRange};
use super::{bytes_of, CacheKind, CacheStrategy, PerBranch};
use crate::dit::hooks::{
    AttentionId, AttentionRole, Branch, Decision, ForwardContext, Tensors, TransformerHooks,
};

/// PAB's per-generation state and decision rule.
#[derive(Debug)]
pub struct PyramidAttentionBroadcast {
    /// `(N, timestep range)` per attention role, `None` when modules of that role are not hooked.
    spatial: Option<(u32, TimestepRange)>,
    temporal: Option<(u32, TimestepRange)>,
    cross: Option<(u32, TimestepRange)>,
    branch: Branch,
    timestep: f64,
    /// Per branch, per attention module (its index among the forward's attention modules).
    modules: PerBranch<HashMap<usize, ModuleState>>,
}

#[derive(Debug, Default)]
struct ModuleState {
    iteration: u64,
    cache: Option<Tensors>,
}

impl PyramidAttentionBroadcast {
    /// A strategy with empty state.
    pub fn new(config: PyramidAttentionBroadcastConfig) -> Self {
        let c = &config;
        Self {
            spatial: c
                .spatial_attention_block_skip_range
                .map(|n| (n, c.spatial_attention_timestep_skip_range)),
            temporal: c
                .temporal_attention_block_skip_range
                .map(|n| (n, c.temporal_attention_timestep_skip_range)),
            cross: c
                .cross_attention_block_skip_range
                .map(|n| (n, c.cross_attention_timestep_skip_range)),
            branch: Branch::Cond,
            timestep: 0.0,
            modules: PerBranch::default(),
        }
    }

    /// The settings that apply to a module of `role`, if it is hooked.
    fn settings(&self, role: AttentionRole) -> Option<(u32, TimestepRange)> {
        match role {
            AttentionRole::Spatial => self.spatial,
            AttentionRole::Temporal => self.temporal,
            AttentionRole::Cross => self.cross,
        }
    }
}

impl TransformerHooks for PyramidAttentionBroadcast {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.branch = ctx.branch;
        self.timestep = ctx.timestep;
        Decision::Compute
    }

    fn before_attention(&mut self, id: &AttentionId) -> Decision<Tensors> {
        let Some((n, range)) = self.settings(id.role) else {
            return Decision::Compute;
        };
        let state = self
            .modules
            .get_mut(self.branch)
            .entry(id.index)
            .or_default();
        let iteration = state.iteration;
        state.iteration += 1;
        match &state.cache {
            Some(cache)
                if iteration != 0
                    && range.contains(self.timestep)
                    && !iteration.is_multiple_of(n as u64) =>
            {
                Decision::Reuse(cache.shallow_clone())
            }
            _ => Decision::Compute,
        }
    }

    fn after_attention(&mut self, id: &AttentionId, output: &Tensors) {
        if self.settings(id.role).is_some() {
            self.modules
                .get_mut(self.branch)
                .entry(id.index)
                .or_default()
                .cache = Some(output.shallow_clone());
        }
    }
}

impl CacheStrategy for PyramidAttentionBroadcast {
    fn kind(&self) -> CacheKind {
        CacheKind::PyramidAttentionBroadcast
    }

    fn state_bytes(&self) -> u64 {
        self.modules
            .both()
            .into_iter()
            .flat_map(|modules| modules.values())
            .filter_map(|m| m.cache.as_ref())
            .map(|cache| bytes_of(cache.iter().map(Some)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::cache::test_util::{attn, attn_decisions, ctx, dual, single};

    fn config(
        spatial: Option<u32>,
        temporal: Option<u32>,
        range: (f32, f32),
    ) -> PyramidAttentionBroadcastConfig {
        let range = TimestepRange::new(range.0, range.1);
        PyramidAttentionBroadcastConfig {
            spatial_attention_block_skip_range: spatial,
            temporal_attention_block_skip_range: temporal,
            cross_attention_block_skip_range: None,
            spatial_attention_timestep_skip_range: range,
            temporal_attention_timestep_skip_range: range,
            cross_attention_timestep_skip_range: range,
        }
    }

    fn pab(n: u32, range: (f32, f32)) -> PyramidAttentionBroadcast {
        PyramidAttentionBroadcast::new(config(Some(n), None, range))
    }

    /// FLUX-like timesteps 1000, 900, ... over `steps`.
    fn timesteps(steps: usize) -> Vec<f64> {
        (0..steps)
            .map(|i| 1000.0 * (1.0 - i as f64 / steps as f64))
            .collect()
    }

    fn one(value: f32) -> Tensors {
        Tensors(vec![Tensor::from_slice(&[value])])
    }

    #[test]
    fn schedule_follows_call_count_and_strict_range() {
        // t = 1000, 900, ..., 100; strictly inside (100, 800) for calls 3..=8; reuse at odd calls.
        let mut s = pab(2, (100.0, 800.0));
        assert_eq!(
            attn_decisions(&mut s, &timesteps(10), Branch::Cond),
            "CCCRCRCRCC"
        );
        // Temporal / cross ranges only: spatial modules are not hooked.
        let mut none = PyramidAttentionBroadcast::new(config(None, Some(2), (-1.0, 1001.0)));
        assert_eq!(
            attn_decisions(&mut none, &timesteps(6), Branch::Cond),
            "CCCCCC"
        );
    }

    #[test]
    fn each_role_follows_its_own_settings() {
        // Spatial every 3rd call, temporal every 2nd; cross-attention is not hooked.
        let mut s = PyramidAttentionBroadcast::new(config(Some(3), Some(2), (-1.0, 1001.0)));
        let block = dual(0, 1);
        let module = |role, index| AttentionId {
            role,
            index,
            ..attn(&block)
        };
        let modules = [
            module(AttentionRole::Spatial, 0),
            module(AttentionRole::Temporal, 1),
            module(AttentionRole::Cross, 2),
        ];
        let mut letters = vec![String::new(); 3];
        for step in 0..6 {
            s.before_forward(&ctx(step, 500.0, Branch::Cond));
            for (m, out) in modules.iter().zip(letters.iter_mut()) {
                let d = s.before_attention(m);
                if let Decision::Compute = d {
                    s.after_attention(m, &one(step as f32));
                }
                out.push(crate::cache::test_util::letter(&d));
            }
        }
        assert_eq!(letters, ["CRRCRR", "CRCRCR", "CCCCCC"]);
        assert!(!s.modules.cond.contains_key(&2));
    }

    #[test]
    fn reuse_returns_the_last_computed_output() {
        let mut s = pab(3, (-1.0, 1001.0));
        let id = attn(&dual(0, 2));
        let mut seen = Vec::new();
        for step in 0..7 {
            s.before_forward(&ctx(step, 500.0, Branch::Cond));
            match s.before_attention(&id) {
                Decision::Compute => {
                    let o = Tensor::from_slice(&[step as f32]);
                    s.after_attention(&id, &Tensors(vec![o.shallow_clone(), o]));
                    seen.push(format!("C{step}"));
                }
                Decision::Reuse(out) => seen.push(format!("R{}", out[0].double_value(&[0]))),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, ["C0", "R0", "R0", "C3", "R3", "R3", "C6"]);
    }

    #[test]
    fn branches_are_isolated() {
        let mut s = pab(2, (-1.0, 1001.0));
        let id = attn(&dual(0, 2));
        for step in 0..4 {
            for (branch, value) in [(Branch::Cond, 1.0f32), (Branch::Uncond, -1.0)] {
                s.before_forward(&ctx(step, 500.0, branch));
                match s.before_attention(&id) {
                    Decision::Compute => s.after_attention(&id, &one(value)),
                    // A branch only ever gets its own output back.
                    Decision::Reuse(out) => assert_eq!(out[0].double_value(&[0]), value as f64),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(s.modules.cond[&0].iteration, 4);
        assert_eq!(s.modules.uncond[&0].iteration, 4);
    }

    #[test]
    fn state_bytes_count_cached_outputs() {
        let mut s = pab(2, (-1.0, 1001.0));
        assert_eq!(s.state_bytes(), 0);
        s.before_forward(&ctx(0, 500.0, Branch::Cond));
        let joint = attn(&dual(0, 2));
        assert!(matches!(s.before_attention(&joint), Decision::Compute));
        s.after_attention(
            &joint,
            &Tensors(vec![
                Tensor::zeros([1, 4, 8], (Kind::Float, Device::Cpu)),
                Tensor::zeros([1, 2, 8], (Kind::Float, Device::Cpu)),
            ]),
        );
        s.before_forward(&ctx(0, 500.0, Branch::Uncond));
        let single = attn(&single(0, 1, 2));
        assert!(matches!(s.before_attention(&single), Decision::Compute));
        s.after_attention(
            &single,
            &Tensors(vec![Tensor::zeros(
                [1, 6, 8],
                (Kind::BFloat16, Device::Cpu),
            )]),
        );
        assert_eq!(s.state_bytes(), (32 + 16) * 4 + 48 * 2);
    }
}
