//! Training-free step caches. Strategies share the hook interface in [`hooks`]; each strategy is
//! a small module with its config, its per-generation state and its decision rule.
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
pub mod hooks;
mod mag_cache;
mod pab;
mod taylor_seer;

use denoised_proto::v1 as pb;
use tch::Tensor;

pub use config::CacheConfig;
pub use faster_cache::FasterCache;
pub use first_block::FirstBlockCache;
use hooks::{Branch, TransformerHooks};
pub use mag_cache::MagCache;
pub use pab::PyramidAttentionBroadcast;
pub use taylor_seer::TaylorSeer;

use crate::error::ServiceResult;

/// A cache strategy instance: the hooks plus what the server reports about it.
pub trait CacheStrategy: TransformerHooks + Send {
    fn kind(&self) -> pb::CacheKind;
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
    fn kind(&self) -> pb::CacheKind {
        pb::CacheKind::None
    }
    fn state_bytes(&self) -> u64 {
        0
    }
}

/// Strategies this build can run (every strategy of the API).
pub fn supported_kinds() -> Vec<pb::CacheKind> {
    vec![
        pb::CacheKind::None,
        pb::CacheKind::PyramidAttentionBroadcast,
        pb::CacheKind::FasterCache,
        pb::CacheKind::TaylorSeer,
        pb::CacheKind::FirstBlockCache,
        pb::CacheKind::MagCache,
    ]
}

/// A fresh strategy (empty state) for one generation.
pub fn build_strategy(config: &CacheConfig) -> ServiceResult<Box<dyn CacheStrategy>> {
    Ok(match config {
        CacheConfig::None => Box::new(NoCache),
        CacheConfig::PyramidAttentionBroadcast(c) => {
            Box::new(PyramidAttentionBroadcast::new(c.clone()))
        }
        CacheConfig::FasterCache(c) => Box::new(FasterCache::new(c.clone())),
        CacheConfig::TaylorSeer(c) => Box::new(TaylorSeer::new(c.clone())?),
        CacheConfig::FirstBlockCache(c) => Box::new(FirstBlockCache::new(c.clone())),
        CacheConfig::MagCache(c) => Box::new(MagCache::new(c.clone())),
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
    use tch::{Device, Kind, Tensor};

    use super::hooks::{
        resolve, AttnOutput, BlockId, BlockIo, BlockKind, Branch, Decision, ForwardContext,
        ModuleCounts, StepStats, TransformerHooks,
    };

    /// A context for a 16x16 latent (an 8x8 token grid).
    pub fn ctx(step: usize, timestep: f64, branch: Branch) -> ForwardContext {
        ForwardContext {
            step,
            num_steps: 50,
            timestep,
            branch,
            latent_height: 16,
            latent_width: 16,
        }
    }

    pub fn dual(index: usize, num_blocks: usize) -> BlockId {
        BlockId {
            kind: BlockKind::Dual,
            index,
            flat_index: index,
            num_blocks,
        }
    }

    pub fn single(index: usize, flat_index: usize, num_blocks: usize) -> BlockId {
        BlockId {
            kind: BlockKind::Single,
            index,
            flat_index,
            num_blocks,
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
    /// with joint / single-stream attention, then an output projection. Hidden states are
    /// `[1, 64, 8]` (the packed 16x16 latent of [`ctx`], 2 channels), text `[1, 3, 8]`.
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
            hooks: &mut impl TransformerHooks,
            id: &BlockId,
            io: &BlockIo,
            counts: &mut ModuleCounts,
        ) -> BlockIo {
            let gain = 0.1 * (1.0 + id.flat_index as f64);
            let (attn, computed) = resolve(hooks.before_attention(id), counts, || match id.kind {
                BlockKind::Dual => AttnOutput::Joint {
                    hidden: (&io.hidden * gain).tanh(),
                    encoder: (&io.encoder * gain).tanh(),
                },
                BlockKind::Single => {
                    AttnOutput::Single((Tensor::cat(&[&io.encoder, &io.hidden], 1) * gain).tanh())
                }
            });
            if computed {
                hooks.after_attention(id, &attn);
            }
            match attn {
                AttnOutput::Joint { hidden, encoder } => BlockIo {
                    hidden: &io.hidden + hidden,
                    encoder: &io.encoder + encoder,
                },
                AttnOutput::Single(t) => {
                    let text = io.encoder.size()[1];
                    BlockIo {
                        hidden: &io.hidden + t.narrow(1, text, t.size()[1] - text),
                        encoder: &io.encoder + t.narrow(1, 0, text),
                    }
                }
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
            } = stats;
            let (out, computed) = resolve(hooks.before_forward(ctx), forwards, || {
                let mut io = BlockIo { hidden, encoder };
                for id in self.ids() {
                    let (next, computed) = resolve(hooks.before_block(&id, &io), blocks, || {
                        Self::block(hooks, &id, &io, attention)
                    });
                    if computed {
                        hooks.after_block(&id, &io, &next);
                    }
                    io = next;
                }
                let (out, computed) =
                    resolve(hooks.before_output_projection(), output_projection, || {
                        &io.hidden * 0.5
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

    /// Runs one forward per timestep with a single joint attention module whose computed output
    /// is the step index, and returns the decision letters.
    pub fn attn_decisions(
        hooks: &mut impl TransformerHooks,
        timesteps: &[f64],
        branch: Branch,
    ) -> String {
        let id = dual(0, 2);
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
                    hooks.after_attention(
                        &id,
                        &AttnOutput::Joint {
                            hidden: out.shallow_clone(),
                            encoder: out,
                        },
                    );
                }
                letter(&d)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::config::{FirstBlockCacheConfig, MagCacheConfig};

    #[test]
    fn every_kind_builds_with_empty_state() {
        let configs = [
            CacheConfig::None,
            CacheConfig::from_proto(
                Some(&pb::CacheConfig {
                    strategy: Some(pb::cache_config::Strategy::PyramidAttentionBroadcast(
                        Default::default(),
                    )),
                }),
                "cache",
            )
            .unwrap(),
            CacheConfig::from_proto(
                Some(&pb::CacheConfig {
                    strategy: Some(pb::cache_config::Strategy::FasterCache(Default::default())),
                }),
                "cache",
            )
            .unwrap(),
            CacheConfig::from_proto(
                Some(&pb::CacheConfig {
                    strategy: Some(pb::cache_config::Strategy::TaylorSeer(Default::default())),
                }),
                "cache",
            )
            .unwrap(),
            CacheConfig::FirstBlockCache(FirstBlockCacheConfig { threshold: 0.05 }),
            CacheConfig::MagCache(MagCacheConfig {
                threshold: 0.06,
                max_skip_steps: 3,
                retention_ratio: 0.2,
                num_inference_steps: 28,
                mag_ratios: config::FLUX_MAG_RATIOS.to_vec(),
                calibrate: false,
            }),
        ];
        for config in &configs {
            let strategy = build_strategy(config).unwrap();
            assert_eq!(strategy.kind(), config.kind());
            assert_eq!(strategy.state_bytes(), 0);
        }
        assert_eq!(supported_kinds().len(), configs.len());
    }

    #[test]
    fn typed_values_round_trip_as_decimals() {
        assert_eq!(as_typed(0.7), 0.7);
        assert_eq!(as_typed(0.05), 0.05);
        assert_eq!(as_typed(1e-8), 1e-8);
        assert_eq!(as_typed(0.25), 0.25);
    }
}
