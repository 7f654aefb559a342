//! The one interface between a transformer of any family and the cache strategies.
//!
//! A transformer forward asks the hooks before each interceptable module whether to run it
//! (`Decision::Compute`) or to use tensors the strategy supplies (reused, predicted, or a
//! pass-through when skipped), and reports each computed output afterwards so the strategy can
//! update its state. Decisions are asked for instead of passing closures so that a block's own
//! attention call can consult the hooks while the block is running.
//!
//! Interceptable modules, outermost first: the whole forward (one CFG branch of one step), each
//! transformer block, each attention module of a block, and the output projection. Modules are
//! named by their diffusers paths and say what they are ([`BlockId`], [`AttentionId`]); a
//! family declares once which of a block's tensors is the hidden stream and which the text
//! stream ([`StreamRoles`], diffusers' `TransformerBlockRegistry`), so strategies never depend on
//! a model family.
use std::sync::Arc;

use tch::Tensor;

use super::layout::LatentLayout;

/// Which classifier-free-guidance pass a forward belongs to. Strategies keep separate state per
/// branch (diffusers shares PAB/FasterCache state between separately-run branches; we do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    Cond,
    Uncond,
}

/// What the pipeline knows about the forward it is about to run.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// 0-based denoising step of the generation.
    pub step: usize,
    pub num_steps: usize,
    /// Scheduler timestep on the 0..1000 scale (`sigma * 1000` for flow matching).
    pub timestep: f64,
    /// The CFG branch of a sequential forward; `Cond` for a batched one.
    pub branch: Branch,
    /// The forward's batch is `[uncond; cond]` (classifier-free guidance in one forward, as
    /// CogVideoX runs it); strategies keep one state for it, as diffusers' single cache context.
    pub batched_cfg: bool,
    /// How the forward's output tokens map to the latent grid (FasterCache splits frequencies
    /// over the grid's spatial axes).
    pub layout: Arc<dyn LatentLayout>,
}

/// What an attention module attends over, as diffusers classifies modules for PAB and
/// FasterCache (`hooks/_common.py`): self-attention over space (or, in full 3D attention, over
/// every token), over time, or cross-attention to another stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionRole {
    Spatial,
    Temporal,
    Cross,
}

/// Which of a block's tensors (inputs and outputs alike) carries which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamRoles {
    /// The latent (image or video) token stream.
    pub hidden: usize,
    /// The text token stream, for blocks that carry one.
    pub text: Option<usize>,
}

/// A transformer block: its diffusers path and its place in the block order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// e.g. `transformer_blocks.3`, for regex-based module selection.
    pub path: String,
    /// Position in the order the forward runs its blocks.
    pub index: usize,
    pub num_blocks: usize,
    pub streams: StreamRoles,
}

impl BlockId {
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.num_blocks
    }
}

/// An attention module inside a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttentionId {
    /// e.g. `transformer_blocks.3.attn1`.
    pub path: String,
    pub role: AttentionRole,
    /// Position among all attention modules of the forward, in call order.
    pub index: usize,
}

/// The tensors a module takes or returns, in its family's order (see [`StreamRoles`] for
/// blocks). Strategies that do not care which is which treat them as a list.
#[derive(Debug)]
pub struct Tensors(pub Vec<Tensor>);

impl Tensors {
    /// Second handles on the same storage (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self(self.0.iter().map(Tensor::shallow_clone).collect())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Tensor> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies `f` to each tensor, with the matching tensor of `other` (same order, same count).
    pub fn zip_map(&self, other: &Tensors, f: impl Fn(&Tensor, &Tensor) -> Tensor) -> Tensors {
        assert_eq!(self.len(), other.len(), "tensor lists of different lengths");
        Tensors(
            self.iter()
                .zip(other.iter())
                .map(|(a, b)| f(a, b))
                .collect(),
        )
    }
}

impl std::ops::Index<usize> for Tensors {
    type Output = Tensor;

    fn index(&self, i: usize) -> &Tensor {
        &self.0[i]
    }
}

/// Which halves of a batched-CFG forward run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgRows {
    Both,
    /// Only the conditional half (batch 1); the strategy rebuilds the unconditional one
    /// ([`TransformerHooks::rebuild_uncond`]): FasterCache's CFG-Cache.
    CondOnly,
}

/// A strategy's answer for one module call.
#[derive(Debug)]
pub enum Decision<T> {
    /// Run the module; its output is then reported through the matching `after_*` hook.
    Compute,
    /// Use a cached output verbatim.
    Reuse(T),
    /// Use an output extrapolated from cached ones.
    Predict(T),
    /// Do not run the module; the value is what flows on (often its input unchanged).
    Skip(T),
}

/// The hooks a transformer calls. Every method has a pass-through default, so [`NoHooks`] is empty
/// and a strategy implements only the modules it intercepts.
///
/// Strategies keep handles on the tensors they are shown (inputs and outputs, without copying),
/// and the tensors they hand back may be such handles: the transformer must not modify either in
/// place.
pub trait TransformerHooks {
    /// Asked first for a batched-CFG forward ([`ForwardContext::batched_cfg`]): which halves of
    /// the batch to run.
    fn cfg_rows(&mut self, _ctx: &ForwardContext) -> CfgRows {
        CfgRows::Both
    }
    /// After a [`CfgRows::CondOnly`] forward, with its (conditional, batch-1) output: the full
    /// `[uncond; cond]` output. Asked only of strategies that answered `CondOnly`.
    fn rebuild_uncond(&mut self, _ctx: &ForwardContext, cond: &Tensor) -> Tensor {
        unreachable!(
            "a strategy that runs only the conditional half must rebuild the unconditional one \
             (got {:?})",
            cond.size()
        )
    }

    fn before_forward(&mut self, _ctx: &ForwardContext) -> Decision<Tensor> {
        Decision::Compute
    }
    fn after_forward(&mut self, _ctx: &ForwardContext, _output: &Tensor) {}

    fn before_block(&mut self, _id: &BlockId, _input: &Tensors) -> Decision<Tensors> {
        Decision::Compute
    }
    fn after_block(&mut self, _id: &BlockId, _input: &Tensors, _output: &Tensors) {}

    fn before_attention(&mut self, _id: &AttentionId) -> Decision<Tensors> {
        Decision::Compute
    }
    fn after_attention(&mut self, _id: &AttentionId, _output: &Tensors) {}

    /// The final norm and projection to patch channels (TaylorSeer's lite mode predicts it).
    fn before_output_projection(&mut self) -> Decision<Tensor> {
        Decision::Compute
    }
    fn after_output_projection(&mut self, _output: &Tensor) {}
}

/// Runs every module.
#[derive(Debug, Default)]
pub struct NoHooks;

impl TransformerHooks for NoHooks {}

/// Per-category tallies of what happened to modules during one step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModuleCounts {
    pub computed: u32,
    pub reused: u32,
    pub predicted: u32,
    pub skipped: u32,
}

impl ModuleCounts {
    pub fn record<T>(&mut self, decision: &Decision<T>) {
        match decision {
            Decision::Compute => self.computed += 1,
            Decision::Reuse(_) => self.reused += 1,
            Decision::Predict(_) => self.predicted += 1,
            Decision::Skip(_) => self.skipped += 1,
        }
    }

    pub fn total(&self) -> u32 {
        self.computed + self.reused + self.predicted + self.skipped
    }

    /// Modules that did not run.
    pub fn not_computed(&self) -> u32 {
        self.total() - self.computed
    }

    /// What was recorded since `earlier` (a copy of these counts taken before).
    pub fn since(&self, earlier: &ModuleCounts) -> ModuleCounts {
        ModuleCounts {
            computed: self.computed - earlier.computed,
            reused: self.reused - earlier.reused,
            predicted: self.predicted - earlier.predicted,
            skipped: self.skipped - earlier.skipped,
        }
    }

    pub fn add(&mut self, other: &ModuleCounts) {
        self.computed += other.computed;
        self.reused += other.reused;
        self.predicted += other.predicted;
        self.skipped += other.skipped;
    }
}

/// What happened to one module call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    Computed,
    Reused,
    Predicted,
    Skipped,
}

impl ModuleCounts {
    /// The decision recorded since `earlier`, when exactly one was.
    fn single_since(&self, earlier: &ModuleCounts) -> Option<DecisionKind> {
        let d = self.since(earlier);
        match (d.total(), d.computed, d.reused, d.predicted) {
            (1, 1, _, _) => Some(DecisionKind::Computed),
            (1, _, 1, _) => Some(DecisionKind::Reused),
            (1, _, _, 1) => Some(DecisionKind::Predicted),
            (1, _, _, _) => Some(DecisionKind::Skipped),
            _ => None,
        }
    }
}

/// Which samples one transformer call ran for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardRows {
    Cond,
    Uncond,
    /// Both CFG halves in one batch.
    BothCfg,
}

/// One block's decision, and its attention module's when the block ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDecision {
    pub block: DecisionKind,
    /// `None` when the block did not run (its attention was never asked).
    pub attention: Option<DecisionKind>,
}

/// Per-module decisions of one transformer call, in the order it ran its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardDecisions {
    pub rows: ForwardRows,
    pub forward: DecisionKind,
    /// Empty when the forward did not run.
    pub blocks: Vec<BlockDecision>,
    /// `None` when the forward did not run.
    pub output_projection: Option<DecisionKind>,
}

/// What the cache did during one denoising step (all CFG branches together). The transformer
/// records every decision it receives here.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepStats {
    pub forwards: ModuleCounts,
    pub blocks: ModuleCounts,
    pub attention: ModuleCounts,
    pub output_projection: ModuleCounts,
    /// Estimated multiply-adds of the blocks and attention modules that did not run inside the
    /// forwards that did. The transformer adds each one's cost as it resolves it, because only
    /// it knows the module's kind and the shapes it was called with; forwards that did not run
    /// at all are costed by the pipeline from `forwards`.
    pub macs_not_run: f64,
    /// Per-module decisions, when asked for ([`StepStats::recording`]); `None` costs nothing.
    pub record: Option<Vec<ForwardDecisions>>,
}

impl StepStats {
    /// Stats that also keep the per-module record.
    pub fn recording(on: bool) -> Self {
        Self {
            record: on.then(Vec::new),
            ..Self::default()
        }
    }

    /// A transformer call begins (before its forward decision is asked).
    pub fn note_forward_start(&mut self, ctx: &ForwardContext) {
        if let Some(record) = &mut self.record {
            record.push(ForwardDecisions {
                rows: match (ctx.batched_cfg, ctx.branch) {
                    (true, _) => ForwardRows::BothCfg,
                    (false, Branch::Cond) => ForwardRows::Cond,
                    (false, Branch::Uncond) => ForwardRows::Uncond,
                },
                forward: DecisionKind::Computed,
                blocks: Vec::new(),
                output_projection: None,
            });
        }
    }

    /// The call's forward decision was resolved; `before` are the forward counts before it.
    pub fn note_forward(&mut self, before: &ModuleCounts) {
        let kind = self.forwards.single_since(before);
        if let (Some(last), Some(kind)) = (self.last_forward(), kind) {
            last.forward = kind;
        }
    }

    /// A block was resolved; `blocks` and `attention` are the counts from before it.
    pub fn note_block(&mut self, blocks: &ModuleCounts, attention: &ModuleCounts) {
        let block = self.blocks.single_since(blocks);
        let attention = self.attention.single_since(attention);
        if let (Some(last), Some(block)) = (self.last_forward(), block) {
            last.blocks.push(BlockDecision { block, attention });
        }
    }

    /// The output projection was resolved; `before` are its counts from before it.
    pub fn note_output_projection(&mut self, before: &ModuleCounts) {
        let kind = self.output_projection.single_since(before);
        if let Some(last) = self.last_forward() {
            last.output_projection = kind;
        }
    }

    /// A batched-CFG call ran the conditional half only and the strategy rebuilt the other.
    pub fn note_uncond_rebuilt(&mut self) {
        if let Some(record) = &mut self.record {
            if let Some(last) = record.last_mut() {
                last.rows = ForwardRows::Cond;
            }
            record.push(ForwardDecisions {
                rows: ForwardRows::Uncond,
                forward: DecisionKind::Predicted,
                blocks: Vec::new(),
                output_projection: None,
            });
        }
    }

    fn last_forward(&mut self) -> Option<&mut ForwardDecisions> {
        self.record.as_mut().and_then(|r| r.last_mut())
    }

    /// True when every block and the whole forward ran in full.
    pub fn full_compute(&self) -> bool {
        self.blocks.computed == self.blocks.total()
            && self.forwards.computed == self.forwards.total()
            && self.attention.computed == self.attention.total()
    }
}

/// Resolves a decision into the value to use: runs `compute` (and returns its output) for
/// `Compute`, else unwraps the supplied value; records the decision in `counts` either way.
pub fn resolve<T>(
    decision: Decision<T>,
    counts: &mut ModuleCounts,
    compute: impl FnOnce() -> T,
) -> (T, bool) {
    counts.record(&decision);
    match decision {
        Decision::Compute => (compute(), true),
        Decision::Reuse(v) | Decision::Predict(v) | Decision::Skip(v) => (v, false),
    }
}

/// Asks the hooks about an attention module, runs it if told to, and reports what was computed.
pub fn hooked_attention(
    id: &AttentionId,
    hooks: &mut dyn TransformerHooks,
    counts: &mut ModuleCounts,
    compute: impl FnOnce() -> Tensors,
) -> Tensors {
    let (out, computed) = resolve(hooks.before_attention(id), counts, compute);
    if computed {
        hooks.after_attention(id, &out);
    }
    out
}
