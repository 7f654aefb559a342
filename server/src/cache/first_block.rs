//! First Block Cache (ParaAttention's, TeaCache-inspired), as diffusers 0.42.1 implements it.
//!
//! The first block always runs. Its residual `r = out.hidden - in.hidden` (the block's hidden
//! stream, as the family declares it) is compared with the
//! residual of the last fully computed forward: when `mean|r - r_ref| / mean|r_ref| <= threshold`
//! (evaluated in the model dtype) every later block is skipped and the forward's block output is
//! the current head output plus the "rest of the network" residuals (tail output − head output,
//! every stream of the block) saved at that full forward. References are refreshed only on full
//! forwards, so drift accumulates against the last one. The first forward always computes.
//!
//! With our hooks the head cannot rewrite its own output, so the skipped blocks pass their input
//! through and the last block adds the saved residuals: the same sums as diffusers, which adds
//! them at the head and passes through after it.
//!
//! State is per CFG branch, as diffusers' "cond"/"uncond" contexts. A transformer with a single
//! block never skips (there is nothing after the head to skip; diffusers refuses it).
use tch::Tensor;

use super::config::FirstBlockCacheConfig;
use super::{as_typed, bytes_of, CacheKind, CacheStrategy, PerBranch};
use crate::dit::hooks::{BlockId, Branch, Decision, ForwardContext, Tensors, TransformerHooks};

/// First Block Cache's per-generation state and decision rule.
#[derive(Debug)]
pub struct FirstBlockCache {
    threshold: f64,
    branch: Branch,
    states: PerBranch<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Head output and residual at the last full forward.
    head_output: Option<Tensors>,
    head_residual: Option<Tensor>,
    /// Tail output − head output at the last full forward (every stream).
    tail_residuals: Option<Tensors>,
    /// The forward in progress skips every block after the head.
    skipping: bool,
}

impl FirstBlockCache {
    /// A strategy with empty state.
    pub fn new(config: FirstBlockCacheConfig) -> Self {
        Self {
            threshold: as_typed(config.threshold),
            branch: Branch::Cond,
            states: PerBranch::default(),
        }
    }
}

impl TransformerHooks for FirstBlockCache {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.branch = ctx.branch;
        self.states.get_mut(ctx.branch).skipping = false;
        Decision::Compute
    }

    fn before_block(&mut self, id: &BlockId, input: &Tensors) -> Decision<Tensors> {
        let state = self.states.get(self.branch);
        match (&state.tail_residuals, state.skipping && !id.is_first()) {
            (Some(tail), true) if id.is_last() => Decision::Skip(tail.zip_map(input, |r, x| r + x)),
            (_, true) => Decision::Skip(input.shallow_clone()),
            (_, false) => Decision::Compute,
        }
    }

    fn after_block(&mut self, id: &BlockId, input: &Tensors, output: &Tensors) {
        let threshold = self.threshold;
        let state = self.states.get_mut(self.branch);
        if id.is_first() {
            let hidden = id.streams.hidden;
            let residual = &output[hidden] - &input[hidden];
            let similar = state.head_residual.as_ref().is_some_and(|reference| {
                let change = (&residual - reference).abs().mean(None) / reference.abs().mean(None);
                // Skip unless strictly above the threshold, as diffusers (which would also skip
                // on a NaN change from an all-zero reference; we compute then).
                change.double_value(&[]) <= threshold
            });
            state.skipping = similar && state.tail_residuals.is_some() && !id.is_last();
            if !state.skipping {
                state.head_output = Some(output.shallow_clone());
                state.head_residual = Some(residual);
            }
        }
        if id.is_last() {
            if let Some(head) = &state.head_output {
                state.tail_residuals = Some(output.zip_map(head, |out, head| out - head));
            }
        }
    }
}

impl CacheStrategy for FirstBlockCache {
    fn kind(&self) -> CacheKind {
        CacheKind::FirstBlockCache
    }

    fn state_bytes(&self) -> u64 {
        self.states
            .both()
            .into_iter()
            .map(|s| {
                let ios = [&s.head_output, &s.tail_residuals];
                bytes_of(ios.into_iter().flatten().flat_map(|io| io.iter().map(Some)))
                    + bytes_of([s.head_residual.as_ref()])
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::{ctx, Toy};
    use crate::dit::hooks::StepStats;

    fn fbc(threshold: f32) -> FirstBlockCache {
        FirstBlockCache::new(FirstBlockCacheConfig { threshold })
    }

    #[test]
    fn skips_while_the_head_residual_is_similar() {
        let toy = Toy { dual: 2, single: 2 };
        // The toy's inputs drift by 0.05 per step: the head residual changes by a few percent.
        let loose = toy.run(&mut fbc(0.5), &[500.0; 6], &[Branch::Cond]);
        assert_eq!(loose[0], "CSSSSS");
        let strict = toy.run(&mut fbc(0.0), &[500.0; 6], &[Branch::Cond]);
        assert_eq!(strict[0], "CCCCCC");
    }

    #[test]
    fn skipped_forward_is_head_output_plus_cached_tail_residual() {
        let toy = Toy { dual: 2, single: 2 };
        let mut s = fbc(1.0);
        let mut none = crate::cache::NoCache;
        let full0 = toy.forward(
            &mut none,
            &ctx(0, 500.0, Branch::Cond),
            &mut StepStats::default(),
        );
        let out0 = toy.forward(
            &mut s,
            &ctx(0, 500.0, Branch::Cond),
            &mut StepStats::default(),
        );
        assert!(out0.equal(&full0));
        let head0 = s.states.cond.head_output.as_ref().unwrap()[0].shallow_clone();
        let tail_residual = s.states.cond.tail_residuals.as_ref().unwrap()[0].shallow_clone();
        let mut stats = StepStats::default();
        let out1 = toy.forward(&mut s, &ctx(1, 500.0, Branch::Cond), &mut stats);
        assert_eq!((stats.blocks.computed, stats.blocks.skipped), (1, 3));
        // References stay at step 0; the output is (head output at step 1 + residual) * 0.5.
        assert!(s.states.cond.head_output.as_ref().unwrap()[0].equal(&head0));
        // The toy's first block adds tanh(0.1 x) to the image stream.
        let (hidden1, _) = Toy::inputs(1, Branch::Cond);
        let head1 = &hidden1 + (&hidden1 * 0.1).tanh();
        let expected = (&tail_residual + head1) * 0.5;
        assert!(out1.allclose(&expected, 1e-6, 1e-6, false));
        assert!(out1.subtract(&full0).abs().max().double_value(&[]) > 0.0);
        // Head output (2 tensors), head residual, tail residuals (2 tensors), float32.
        assert_eq!(s.state_bytes(), ((64 + 3) * 8 + 64 * 8 + (64 + 3) * 8) * 4);
    }

    #[test]
    fn branches_are_isolated() {
        let toy = Toy { dual: 1, single: 1 };
        let mut s = fbc(0.5);
        let letters = toy.run(&mut s, &[500.0; 3], &[Branch::Cond, Branch::Uncond]);
        assert_eq!(letters, ["CSS", "CSS"]);
        let cond = &s.states.cond.head_residual.as_ref().unwrap();
        let uncond = &s.states.uncond.head_residual.as_ref().unwrap();
        assert!(!cond.allclose(uncond, 1e-3, 1e-3, false));
    }
}
