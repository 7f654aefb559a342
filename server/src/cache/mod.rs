//! Training-free step caches. Strategies share the family-neutral hook interface of
//! [`crate::dit::hooks`]; each strategy is a small module with its per-generation state and its
//! decision rule, and none imports a model family.
//!
//! State ownership: model weights are shared by all sessions, but every cached tensor and counter
//! lives in a strategy object owned by one generation of one session, on the engine thread.
//!
//! Semantics common to every strategy:
//! - State is kept per CFG branch ([`hooks::Branch`]): the conditional and unconditional passes of
//!   true CFG, which FLUX runs as two separate forwards per step, never see each other's cached
//!   tensors or counters. diffusers does the same for FirstBlockCache, MagCache and TaylorSeer
//!   (its "cond"/"uncond" cache contexts) but shares PAB and FasterCache state between the two
//!   passes; we deliberately diverge there.
//! - A strategy is built fresh at the start of a generation and on every switch or reset, so all
//!   counters start from 0 at that step (as after diffusers' `disable_cache` + `enable_cache`, or
//!   `_reset_stateful_cache()`): warm-ups and retention windows start again, and step-indexed
//!   tables (MagCache's ratios) are indexed from the step the strategy started on.
pub mod config;
mod faster_cache;
mod first_block;
mod mag_cache;
mod pab;
pub mod taylor_seer;

use tch::Tensor;

pub use config::{CacheConfig, CacheKind};
pub use faster_cache::FasterCache;
pub use first_block::FirstBlockCache;
pub use mag_cache::{MagCache, FLUX_MAG_RATIOS};
pub use pab::PyramidAttentionBroadcast;
pub use taylor_seer::TaylorSeer;

use crate::dit::hooks::{Branch, TransformerHooks};
use crate::error::ServiceResult;

/// A cache strategy instance: the hooks plus what the server reports about it.
pub trait CacheStrategy: TransformerHooks + Send {
    fn kind(&self) -> CacheKind;
    /// Bytes held by cached tensors right now.
    fn state_bytes(&self) -> u64;
    /// Magnitude ratios recorded by a MagCache calibration run.
    fn calibrated_mag_ratios(&self) -> Option<Vec<f32>> {
        None
    }
}

/// Computes every module: the reference the other strategies are measured against.
#[derive(Debug, Default)]
pub struct NoCache;

impl TransformerHooks for NoCache {}

impl CacheStrategy for NoCache {
    fn kind(&self) -> CacheKind {
        CacheKind::None
    }
    fn state_bytes(&self) -> u64 {
        0
    }
}

/// A fresh strategy (empty state) for one generation of `num_steps` steps.
pub fn build_strategy(
    config: &CacheConfig,
    num_steps: usize,
) -> ServiceResult<Box<dyn CacheStrategy>> {
    Ok(match config {
        CacheConfig::None => Box::new(NoCache),
        CacheConfig::PyramidAttentionBroadcast(c) => {
            Box::new(PyramidAttentionBroadcast::new(c.clone()))
        }
        CacheConfig::FasterCache(c) => Box::new(FasterCache::new(c.clone())),
        CacheConfig::TaylorSeer(c) => Box::new(TaylorSeer::new(c.clone())?),
        CacheConfig::FirstBlockCache(c) => Box::new(FirstBlockCache::new(c.clone())),
        CacheConfig::MagCache(c) => Box::new(MagCache::new(c.clone(), num_steps)),
    })
}

/// One value per CFG branch.
#[derive(Debug, Default)]
struct PerBranch<T> {
    cond: T,
    uncond: T,
}

impl<T> PerBranch<T> {
    fn get(&self, branch: Branch) -> &T {
        match branch {
            Branch::Cond => &self.cond,
            Branch::Uncond => &self.uncond,
        }
    }

    fn get_mut(&mut self, branch: Branch) -> &mut T {
        match branch {
            Branch::Cond => &mut self.cond,
            Branch::Uncond => &mut self.uncond,
        }
    }

    fn both(&self) -> [&T; 2] {
        [&self.cond, &self.uncond]
    }
}

/// Bytes held by a tensor's elements.
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Total bytes of some optional tensors.
fn bytes_of<'a>(tensors: impl IntoIterator<Item = Option<&'a Tensor>>) -> u64 {
    tensors.into_iter().flatten().map(tensor_bytes).sum()
}

/// The `f64` a user meant by an API `f32` (its shortest decimal form, e.g. `0.7f32` -> `0.7`).
/// diffusers receives such settings as Python floats (doubles); converting the `f32` directly
/// (`0.699999988...`) can flip a comparison or a rounding that sits exactly on a boundary.
fn as_typed(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

#[cfg(test)]
mod test_util {
    //! Toy drivers for the strategies' unit tests.
    use std::sync::Arc;

    use tch::{Device, Kind, Tensor};

    use crate::dit::hooks::{
        hooked_attention, resolve, AttentionId, AttentionRole, BlockId, Branch, Decision,
        ForwardContext, ModuleCounts, StepStats, StreamRoles, Tensors, TransformerHooks,
    };
    use crate::dit::layout::LatentLayout;

    /// The toy's block tensors: `[hidden, text]`.
    pub const STREAMS: StreamRoles = StreamRoles {
        hidden: 0,
        text: Some(1),
    };

    /// Tokens `[B, h·w, C]` of an `h × w` grid, one token per grid cell.
    #[derive(Debug)]
    pub struct ToyLayout {
        pub h: i64,
        pub w: i64,
    }

    impl LatentLayout for ToyLayout {
        fn to_grid(&self, tokens: &Tensor) -> Tensor {
            let (b, _, c) = tokens.size3().unwrap();
            tokens.view([b, self.h, self.w, c]).permute([0, 3, 1, 2])
        }
        fn to_tokens(&self, grid: &Tensor) -> Tensor {
            let (b, c, h, w) = grid.size4().unwrap();
            grid.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        }
    }

    /// The toy's layout: an 8x8 token grid.
    pub fn layout() -> ToyLayout {
        ToyLayout { h: 8, w: 8 }
    }

    /// A context for the toy's 8x8 token grid.
    pub fn ctx(step: usize, timestep: f64, branch: Branch) -> ForwardContext {
        ForwardContext {
            step,
            num_steps: 50,
            timestep,
            branch,
            batched_cfg: false,
            layout: Arc::new(layout()),
        }
    }

    /// Block `index` of `num_blocks`, named like FLUX's dual-stream blocks.
    pub fn dual(index: usize, num_blocks: usize) -> BlockId {
        BlockId {
            path: format!("transformer_blocks.{index}"),
            index,
            num_blocks,
            streams: STREAMS,
        }
    }

    /// Block `flat_index` of `num_blocks`, the `index`-th single-stream one.
    pub fn single(index: usize, flat_index: usize, num_blocks: usize) -> BlockId {
        BlockId {
            path: format!("single_transformer_blocks.{index}"),
            index: flat_index,
            num_blocks,
            streams: STREAMS,
        }
    }

    /// The attention module of a toy block (one per block).
    pub fn attn(block: &BlockId) -> AttentionId {
        AttentionId {
            path: format!("{}.attn", block.path),
            role: AttentionRole::Spatial,
            index: block.index,
        }
    }

    /// One letter per decision: C(ompute), R(euse), P(redict), S(kip).
    pub fn letter<T>(d: &Decision<T>) -> char {
        match d {
            Decision::Compute => 'C',
            Decision::Reuse(_) => 'R',
            Decision::Predict(_) => 'P',
            Decision::Skip(_) => 'S',
        }
    }

    /// A toy FLUX-shaped transformer driven through the hooks exactly as the real one is: blocks
    /// with joint (two-stream) / single-stream attention, then an output projection. Hidden
    /// states are `[1, 64, 8]` (the 8x8 grid of [`ctx`], 8 channels), text `[1, 3, 8]`.
    pub struct Toy {
        pub dual: usize,
        pub single: usize,
    }

    impl Toy {
        pub fn ids(&self) -> Vec<BlockId> {
            let n = self.dual + self.single;
            (0..n)
                .map(|i| {
                    if i < self.dual {
                        dual(i, n)
                    } else {
                        single(i - self.dual, i, n)
                    }
                })
                .collect()
        }

        /// Inputs that drift with the step (and differ per branch).
        pub fn inputs(step: usize, branch: Branch) -> (Tensor, Tensor) {
            let sign = if branch == Branch::Cond { 1.0 } else { -1.0 };
            let base = Tensor::arange(64 * 8, (Kind::Float, Device::Cpu)).view([1, 64, 8]) / 256.0;
            let hidden = (&base * sign).sin() + 0.05 * step as f64;
            let encoder = Tensor::ones([1, 3, 8], (Kind::Float, Device::Cpu)) * (0.3 * sign);
            (hidden, encoder)
        }

        fn block(
            &self,
            hooks: &mut impl TransformerHooks,
            id: &BlockId,
            io: &Tensors,
            counts: &mut ModuleCounts,
        ) -> Tensors {
            let gain = 0.1 * (1.0 + id.index as f64);
            let (hidden, text) = (&io[0], &io[1]);
            let joint = id.index < self.dual;
            let attn = hooked_attention(&attn(id), hooks, counts, || {
                if joint {
                    Tensors(vec![(hidden * gain).tanh(), (text * gain).tanh()])
                } else {
                    Tensors(vec![(Tensor::cat(&[text, hidden], 1) * gain).tanh()])
                }
            });
            if joint {
                Tensors(vec![hidden + &attn[0], text + &attn[1]])
            } else {
                let t = &attn[0];
                let l_txt = text.size()[1];
                Tensors(vec![
                    hidden + t.narrow(1, l_txt, t.size()[1] - l_txt),
                    text + t.narrow(1, 0, l_txt),
                ])
            }
        }

        /// One forward of `ctx.branch` at `ctx.step`, recording decisions in `stats`.
        pub fn forward(
            &self,
            hooks: &mut impl TransformerHooks,
            ctx: &ForwardContext,
            stats: &mut StepStats,
        ) -> Tensor {
            let (hidden, encoder) = Self::inputs(ctx.step, ctx.branch);
            let StepStats {
                forwards,
                blocks,
                attention,
                output_projection,
                ..
            } = stats;
            let (out, computed) = resolve(hooks.before_forward(ctx), forwards, || {
                let mut io = Tensors(vec![hidden, encoder]);
                for id in self.ids() {
                    let (next, computed) = resolve(hooks.before_block(&id, &io), blocks, || {
                        self.block(hooks, &id, &io, attention)
                    });
                    if computed {
                        hooks.after_block(&id, &io, &next);
                    }
                    io = next;
                }
                let (out, computed) =
                    resolve(hooks.before_output_projection(), output_projection, || {
                        &io[0] * 0.5
                    });
                if computed {
                    hooks.after_output_projection(&out);
                }
                out
            });
            if computed {
                hooks.after_forward(ctx, &out);
            }
            out
        }

        /// Runs `timesteps.len()` steps (each branch in `branches`, in order) and returns one
        /// letter per forward: C full compute, else what happened to its blocks (S skipped), its
        /// attention (P predicted / R reused), or the whole forward (F).
        pub fn run(
            &self,
            hooks: &mut impl TransformerHooks,
            timesteps: &[f64],
            branches: &[Branch],
        ) -> Vec<String> {
            let mut letters = vec![String::new(); branches.len()];
            for (step, &t) in timesteps.iter().enumerate() {
                for (b, &branch) in branches.iter().enumerate() {
                    let mut stats = StepStats::default();
                    let _ = self.forward(hooks, &ctx(step, t, branch), &mut stats);
                    letters[b].push(summary(&stats));
                }
            }
            letters
        }
    }

    /// One letter for a forward's stats (see [`Toy::run`]).
    pub fn summary(stats: &StepStats) -> char {
        if stats.forwards.computed == 0 {
            'F'
        } else if stats.blocks.skipped > 0 {
            'S'
        } else if stats.attention.predicted > 0 || stats.output_projection.predicted > 0 {
            'P'
        } else if stats.attention.reused > 0 {
            'R'
        } else {
            'C'
        }
    }

    /// Runs one forward per timestep with a single two-output attention module whose computed
    /// output is the step index, and returns the decision letters.
    pub fn attn_decisions(
        hooks: &mut impl TransformerHooks,
        timesteps: &[f64],
        branch: Branch,
    ) -> String {
        let id = attn(&dual(0, 2));
        timesteps
            .iter()
            .enumerate()
            .map(|(step, &t)| {
                assert!(matches!(
                    hooks.before_forward(&ctx(step, t, branch)),
                    Decision::Compute
                ));
                let d = hooks.before_attention(&id);
                if let Decision::Compute = d {
                    let out = Tensor::from_slice(&[step as f32]);
                    hooks.after_attention(&id, &Tensors(vec![out.shallow_clone(), out]));
                }
                letter(&d)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values_round_trip_as_decimals() {
        assert_eq!(as_typed(0.7), 0.7);
        assert_eq!(as_typed(0.05), 0.05);
        assert_eq!(as_typed(1e-8), 1e-8);
        assert_eq!(as_typed(0.25), 0.25);
    }
}
