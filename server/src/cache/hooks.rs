//! The one interface between a transformer and the cache strategies.
//!
//! A transformer forward asks the hooks before each interceptable module whether to run it
//! (`Decision::Compute`) or to use a tensor the strategy supplies (reused, predicted, or a
//! pass-through when skipped), and reports each computed output afterwards so the strategy can
//! update its state. Decisions are asked for instead of passing closures so that a block's own
//! attention call can consult the hooks while the block is running.
//!
//! Interceptable modules, outermost first: the whole forward (one CFG branch of one step), each
//! transformer block, each block's attention, and the output projection.
use tch::Tensor;

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
    pub branch: Branch,
    /// Height `h` of the unpacked latent, as FluxPipeline rounds it:
    /// `2 * (height / (2 * vae_scale_factor))` (`2 * (height / 16)` for FLUX.1). The forward's
    /// input and output are packed `[B, (h/2)(w/2), C*4]`; FasterCache unpacks them to
    /// `[B, C, h, w]` for its frequency split.
    pub latent_height: usize,
    /// Width `w` of the unpacked latent, rounded like `latent_height`.
    pub latent_width: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// FLUX `transformer_blocks.i`: separate image and text streams, joint attention.
    Dual,
    /// FLUX `single_transformer_blocks.i`: one stream over [text; image].
    Single,
}

/// A transformer block's position: its own list and index, and its place among all blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId {
    pub kind: BlockKind,
    pub index: usize,
    /// Position in the flattened block order (all dual blocks, then all single blocks).
    pub flat_index: usize,
    pub num_blocks: usize,
}

impl BlockId {
    /// The module path as diffusers names it, for regex-based module selection.
    pub fn name(&self) -> String {
        match self.kind {
            BlockKind::Dual => format!("transformer_blocks.{}", self.index),
            BlockKind::Single => format!("single_transformer_blocks.{}", self.index),
        }
    }

    pub fn attention_name(&self) -> String {
        format!("{}.attn", self.name())
    }

    pub fn is_first(&self) -> bool {
        self.flat_index == 0
    }

    pub fn is_last(&self) -> bool {
        self.flat_index + 1 == self.num_blocks
    }
}

/// The two token streams entering or leaving a block.
#[derive(Debug)]
pub struct BlockIo {
    /// Image tokens `[B, L_img, D]`.
    pub hidden: Tensor,
    /// Text tokens `[B, L_txt, D]`.
    pub encoder: Tensor,
}

impl BlockIo {
    /// A second handle on the same storage (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self {
            hidden: self.hidden.shallow_clone(),
            encoder: self.encoder.shallow_clone(),
        }
    }
}

/// What an attention module returns.
#[derive(Debug)]
pub enum AttnOutput {
    /// Dual-stream joint attention: image part `[B, L_img, D]` and text part `[B, L_txt, D]`.
    Joint { hidden: Tensor, encoder: Tensor },
    /// Single-stream attention over the concatenated `[B, L_txt + L_img, D]` sequence.
    Single(Tensor),
}

impl AttnOutput {
    pub fn shallow_clone(&self) -> Self {
        match self {
            Self::Joint { hidden, encoder } => Self::Joint {
                hidden: hidden.shallow_clone(),
                encoder: encoder.shallow_clone(),
            },
            Self::Single(t) => Self::Single(t.shallow_clone()),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Joint { hidden, encoder } => vec![hidden, encoder],
            Self::Single(t) => vec![t],
        }
    }
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
    fn before_forward(&mut self, _ctx: &ForwardContext) -> Decision<Tensor> {
        Decision::Compute
    }
    fn after_forward(&mut self, _ctx: &ForwardContext, _output: &Tensor) {}

    fn before_block(&mut self, _id: &BlockId, _input: &BlockIo) -> Decision<BlockIo> {
        Decision::Compute
    }
    fn after_block(&mut self, _id: &BlockId, _input: &BlockIo, _output: &BlockIo) {}

    fn before_attention(&mut self, _id: &BlockId) -> Decision<AttnOutput> {
        Decision::Compute
    }
    fn after_attention(&mut self, _id: &BlockId, _output: &AttnOutput) {}

    /// The final projection to patch channels (TaylorSeer's lite mode predicts it).
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
}

/// What the cache did during one denoising step (all CFG branches together). The transformer
/// records every decision it receives here.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepStats {
    pub forwards: ModuleCounts,
    pub blocks: ModuleCounts,
    pub attention: ModuleCounts,
    pub output_projection: ModuleCounts,
}

impl StepStats {
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
