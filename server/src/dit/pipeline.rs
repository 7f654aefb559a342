//! The pipeline trait the engine drives, whatever the model family: describe the model, prepare a
//! generation from a domain request, run one denoising step through the cache hooks, decode,
//! preview, and estimate what a step cost and what the cache saved.
//!
//! Families implement [`Pipeline`] with their own generation type; the engine holds pipelines as
//! [`AnyPipeline`] trait objects and generations as opaque [`Generation`]s.
use std::any::Any;

use tch::{Device, Kind, Tensor};

use super::hooks::{StepStats, TransformerHooks};
use super::request::{GenerationRequest, PreviewKind};
use crate::models::ModelError;

/// What the engine and the API need to know about a loaded model (before serving overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    /// Model family, e.g. `flux`.
    pub family: &'static str,
    /// e.g. `flux-dev` (guidance-distilled) or `flux-schnell`.
    pub variant: String,
    pub default_width: u32,
    pub default_height: u32,
    /// Smallest and largest accepted image edge, in pixels.
    pub size: (u32, u32),
    /// Sizes are rounded down to a multiple of this.
    pub size_multiple: u32,
    pub default_steps: u32,
    pub steps: (u32, u32),
    pub default_guidance: f32,
    pub guidance: (f32, f32),
    /// Guidance is a model input (distilled), not classifier-free guidance.
    pub guidance_embeds: bool,
    pub supports_true_cfg: bool,
    /// Transformer blocks one forward runs.
    pub num_blocks: u32,
    /// The text-encoder token budget when the request does not set one.
    pub max_sequence_length: usize,
    /// Present for models that make videos.
    pub video: Option<VideoCard>,
    pub device: Device,
    pub kind: Kind,
}

/// What a video model accepts and defaults to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoCard {
    pub default_frames: u32,
    pub max_frames: u32,
    /// Frame counts are `1 + k · frame_step` (the VAE's temporal compression).
    pub frame_step: u32,
    pub default_fps: u32,
}

/// Decoded pixels: one or more RGB8 frames (`height × width × 3` bytes each, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub width: u32,
    pub height: u32,
    pub frames: Vec<Vec<u8>>,
}

/// Where a generation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Steps run so far (the index of the next step).
    pub step_index: usize,
    pub num_steps: usize,
}

impl Progress {
    /// Every step has run; the latents are final.
    pub fn is_done(&self) -> bool {
        self.step_index >= self.num_steps
    }
}

/// What one call of [`Pipeline::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// 0-based index of the step just run.
    pub index: usize,
    pub total: usize,
    /// Model timestep of the step, on the 0..1000 scale.
    pub timestep: f64,
    /// Noise level the step started from.
    pub sigma: f64,
}

/// Estimated transformer FLOPs of one step and the part the cache saved (2 per multiply-add).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepCost {
    pub total: f64,
    pub saved: f64,
}

/// One model family's pipeline.
pub trait Pipeline: Send + 'static {
    /// A generation in progress: conditioning, schedule, latents.
    type Generation: Send + 'static;

    fn card(&self) -> &ModelCard;

    /// Everything the diffusers pipeline does before its denoising loop; refuses what the model
    /// cannot run with [`ModelError::InvalidInput`] naming the field.
    fn prepare(&self, request: &GenerationRequest) -> Result<Self::Generation, ModelError>;

    fn progress(&self, generation: &Self::Generation) -> Progress;

    /// Runs the next denoising step; every module call goes through `hooks`, every decision is
    /// tallied in `stats`. Panics if the generation is done.
    fn step(
        &self,
        generation: &mut Self::Generation,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput;

    /// The current latents as diffusers returns them with `output_type="latent"`.
    fn latents(&self, generation: &Self::Generation) -> Tensor;

    /// The final output in 8-bit RGB, post-processed as diffusers does.
    fn decode(&self, generation: &Self::Generation) -> Frames;

    /// A preview of the clean latents the last step predicted.
    fn preview(&self, generation: &Self::Generation, kind: PreviewKind) -> Frames;

    /// The cost model: estimated FLOPs of the step whose decisions are `stats`.
    fn step_cost(&self, generation: &Self::Generation, stats: &StepStats) -> StepCost;
}

/// A generation of some pipeline, opaque to the engine.
pub struct Generation(Box<dyn Any + Send>);

/// [`Pipeline`] as a trait object: the same methods over opaque [`Generation`]s. Implemented for
/// every pipeline; a generation must be used with the pipeline that prepared it.
pub trait AnyPipeline: Send {
    fn card(&self) -> &ModelCard;
    fn prepare(&self, request: &GenerationRequest) -> Result<Generation, ModelError>;
    fn progress(&self, generation: &Generation) -> Progress;
    fn step(
        &self,
        generation: &mut Generation,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput;
    fn latents(&self, generation: &Generation) -> Tensor;
    fn decode(&self, generation: &Generation) -> Frames;
    fn preview(&self, generation: &Generation, kind: PreviewKind) -> Frames;
    fn step_cost(&self, generation: &Generation, stats: &StepStats) -> StepCost;
}

const FOREIGN: &str = "a generation used with a pipeline that did not prepare it";

impl<P: Pipeline> AnyPipeline for P {
    fn card(&self) -> &ModelCard {
        Pipeline::card(self)
    }

    fn prepare(&self, request: &GenerationRequest) -> Result<Generation, ModelError> {
        Ok(Generation(Box::new(Pipeline::prepare(self, request)?)))
    }

    fn progress(&self, generation: &Generation) -> Progress {
        Pipeline::progress(self, own::<P>(generation))
    }

    fn step(
        &self,
        generation: &mut Generation,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> StepOutput {
        let generation = generation.0.downcast_mut().expect(FOREIGN);
        Pipeline::step(self, generation, hooks, stats)
    }

    fn latents(&self, generation: &Generation) -> Tensor {
        Pipeline::latents(self, own::<P>(generation))
    }

    fn decode(&self, generation: &Generation) -> Frames {
        Pipeline::decode(self, own::<P>(generation))
    }

    fn preview(&self, generation: &Generation, kind: PreviewKind) -> Frames {
        Pipeline::preview(self, own::<P>(generation), kind)
    }

    fn step_cost(&self, generation: &Generation, stats: &StepStats) -> StepCost {
        Pipeline::step_cost(self, own::<P>(generation), stats)
    }
}

fn own<P: Pipeline>(generation: &Generation) -> &P::Generation {
    generation.0.downcast_ref().expect(FOREIGN)
}
