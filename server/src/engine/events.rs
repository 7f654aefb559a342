//! What a generation tells its client, as domain values; `api/` maps them to the wire.
use crate::cache::{CacheConfig, CacheKind};
use crate::dit::hooks::{ForwardDecisions, ModuleCounts};
use crate::dit::request::{GenerationRequest, VideoPlan};
use crate::error::ServiceError;
use crate::media::{EncodedImage, EncodedVideo};

/// The events of one generation, in order: `Started`, one `Step` per step, `Completed`; or an
/// error that ends the stream.
#[derive(Debug, Clone)]
pub enum Event {
    Started(Box<Started>),
    Step(Step),
    Completed(Completed),
}

/// Carries a generation's events to its stream, with back-pressure.
pub type EventSender = tokio::sync::mpsc::Sender<Result<Event, ServiceError>>;

#[derive(Debug, Clone)]
pub struct Started {
    pub generation_id: String,
    pub session_id: String,
    pub model: String,
    /// The request with every default resolved.
    pub request: GenerationRequest,
    /// Video models: how the video is returned.
    pub video: Option<VideoPlan>,
    pub cache: CacheConfig,
    pub device: String,
    pub dtype: String,
    pub setup_ms: f32,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub index: u32,
    pub total: u32,
    pub timestep: f32,
    pub sigma: f32,
    pub cache: CacheActivity,
    pub step_ms: f32,
    pub preview: Option<EncodedImage>,
}

/// What the cache did during one step.
#[derive(Debug, Clone)]
pub struct CacheActivity {
    pub strategy: CacheKind,
    pub blocks: ModuleCounts,
    pub attention: ModuleCounts,
    pub full_compute: bool,
    pub strategy_step: u32,
    pub cache_state_bytes: u64,
    pub strategy_switched: bool,
    pub cache_reset: bool,
    /// The per-module record, when the request asked for it.
    pub modules: Option<Vec<ForwardDecisions>>,
}

#[derive(Debug, Clone)]
pub struct Completed {
    pub generation_id: String,
    /// The image; for a video, its first frame.
    pub image: EncodedImage,
    pub video: Option<EncodedVideo>,
    /// Every frame of a video, when asked for.
    pub frames: Vec<EncodedImage>,
    pub total_ms: f32,
    pub denoise_ms: f32,
    pub decode_ms: f32,
    pub steps: u32,
    pub full_compute_steps: u32,
    pub cache_hit_ratio: f32,
    pub estimated_flops_saved: f64,
    pub estimated_flops_total: f64,
    pub calibrated_mag_ratios: Vec<f32>,
}
