//! Descriptions of models and sessions returned by the server.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

use denoised_proto::v1;

use crate::cache::{CacheConfig, CacheKind};

/// What a model is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conditioning {
    /// Not reported (or unknown to this client).
    Unspecified,
    /// A text prompt.
    Text,
    /// A class label ([`GenerateRequest::class_label`](crate::GenerateRequest::class_label)).
    ClassLabel,
}

impl Conditioning {
    fn from_proto(value: i32) -> Self {
        match v1::Conditioning::try_from(value) {
            Ok(v1::Conditioning::Text) => Conditioning::Text,
            Ok(v1::Conditioning::ClassLabel) => Conditioning::ClassLabel,
            Ok(v1::Conditioning::Unspecified) | Err(_) => Conditioning::Unspecified,
        }
    }
}

/// What a model generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modality {
    /// Not reported (servers from before video support, which serve only image models) or
    /// unknown to this client.
    Unspecified,
    /// Still images.
    Image,
    /// Videos ([`ModelInfo::video`] has the frame limits).
    Video,
}

impl Modality {
    fn from_proto(value: i32) -> Self {
        match v1::Modality::try_from(value) {
            Ok(v1::Modality::Image) => Modality::Image,
            Ok(v1::Modality::Video) => Modality::Video,
            Ok(v1::Modality::Unspecified) | Err(_) => Modality::Unspecified,
        }
    }

    /// Lower-case name (`image`, `video`, `unspecified`).
    pub fn name(self) -> &'static str {
        match self {
            Modality::Unspecified => "unspecified",
            Modality::Image => "image",
            Modality::Video => "video",
        }
    }
}

/// Frame limits and defaults of a video model.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VideoLimits {
    /// Frames generated when the request leaves `num_frames` at 0.
    pub default_num_frames: u32,
    /// Allowed frame counts; within it, only `1 + k * num_frames_step`.
    pub num_frames: RangeInclusive<u32>,
    /// The VAE's temporal compression (4 for CogVideoX: 49 = 1 + 12 * 4).
    pub num_frames_step: u32,
    /// Frame rate when the request leaves `fps` at 0.
    pub default_fps: u32,
}

impl From<v1::VideoLimits> for VideoLimits {
    fn from(v: v1::VideoLimits) -> Self {
        VideoLimits {
            default_num_frames: v.default_num_frames,
            num_frames: v.num_frames.map_or(0..=0, |r| r.min..=r.max),
            num_frames_step: v.num_frames_step,
            default_fps: v.default_fps,
        }
    }
}

/// A model served by the server, with its limits and defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelInfo {
    /// The name to pass to `create_session` / `generate_once`.
    pub name: String,
    /// Model family, e.g. `flux`.
    pub family: String,
    /// Pipeline variant, e.g. `flux-dev` or `flux-schnell`.
    pub variant: String,
    /// What the model is conditioned on.
    pub conditioning: Conditioning,
    /// Default image width.
    pub default_width: u32,
    /// Default image height.
    pub default_height: u32,
    /// Allowed width and height.
    pub size: RangeInclusive<u32>,
    /// Width and height must be multiples of this.
    pub size_multiple: u32,
    /// Default step count.
    pub default_steps: u32,
    /// Allowed step counts.
    pub steps: RangeInclusive<u32>,
    /// Default guidance scale.
    pub default_guidance: f32,
    /// Allowed guidance scales.
    pub guidance: RangeInclusive<f32>,
    /// Whether the model embeds the guidance scale (FLUX.1-dev) rather than running true CFG only.
    pub guidance_embeds: bool,
    /// Whether a negative prompt with `true_cfg_scale > 1` is supported.
    pub supports_true_cfg: bool,
    /// Weights dtype, e.g. `bfloat16`.
    pub dtype: String,
    /// Device, e.g. `cuda:0`.
    pub device: String,
    /// Cache strategies this model supports.
    pub supported_caches: Vec<CacheKind>,
    /// Number of transformer blocks.
    pub num_blocks: u32,
    /// Images or videos.
    pub modality: Modality,
    /// Frame limits of a video model (`None` for image models).
    pub video: Option<VideoLimits>,
}

impl From<v1::ModelInfo> for ModelInfo {
    fn from(m: v1::ModelInfo) -> Self {
        let range = |r: Option<v1::Range>| r.map_or(0..=0, |r| r.min..=r.max);
        let guidance = m.guidance.map_or(0.0..=0.0, |r| r.min..=r.max);
        ModelInfo {
            conditioning: Conditioning::from_proto(m.conditioning),
            size: range(m.size),
            steps: range(m.steps),
            guidance,
            supported_caches: m
                .supported_caches
                .into_iter()
                .map(CacheKind::from_proto)
                .collect(),
            name: m.name,
            family: m.family,
            variant: m.variant,
            default_width: m.default_width,
            default_height: m.default_height,
            size_multiple: m.size_multiple,
            default_steps: m.default_steps,
            default_guidance: m.default_guidance,
            guidance_embeds: m.guidance_embeds,
            supports_true_cfg: m.supports_true_cfg,
            dtype: m.dtype,
            device: m.device,
            num_blocks: m.num_blocks,
            modality: Modality::from_proto(m.modality),
            video: m.video.map(VideoLimits::from),
        }
    }
}

/// The state of a session on the server.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// Model the session runs.
    pub model: String,
    /// The session's current cache strategy.
    pub cache: CacheConfig,
    /// Bytes held by the session's cached tensors right now.
    pub cache_state_bytes: u64,
    /// Generations completed or started in this session.
    pub generations_run: u64,
    /// Whether a generation is running now.
    pub generating: bool,
    /// When the session was created.
    pub created_at: Option<SystemTime>,
    /// Last request touching the session.
    pub last_activity: Option<SystemTime>,
    /// The session closes after this much inactivity.
    pub idle_timeout: Duration,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
}

impl From<v1::Session> for SessionInfo {
    fn from(s: v1::Session) -> Self {
        let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
        SessionInfo {
            id: s.session_id,
            model: s.model,
            cache: s.cache.map(CacheConfig::from).unwrap_or_default(),
            cache_state_bytes: s.cache_state_bytes,
            generations_run: s.generations_run,
            generating: s.generating,
            created_at: time(s.created_at),
            last_activity: time(s.last_activity),
            idle_timeout: Duration::from_secs(s.idle_timeout_seconds.into()),
            labels: s.labels.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_info_from_proto() {
        let info = ModelInfo::from(v1::ModelInfo {
            name: "flux-tiny".into(),
            family: "flux".into(),
            variant: "flux-dev".into(),
            conditioning: v1::Conditioning::Text as i32,
            default_width: 64,
            default_height: 64,
            size: Some(v1::Range { min: 16, max: 256 }),
            size_multiple: 16,
            default_steps: 4,
            steps: Some(v1::Range { min: 1, max: 100 }),
            default_guidance: 3.5,
            guidance: Some(v1::FloatRange {
                min: 0.0,
                max: 10.0,
            }),
            guidance_embeds: true,
            supports_true_cfg: true,
            dtype: "float32".into(),
            device: "cpu".into(),
            supported_caches: vec![
                v1::CacheKind::None as i32,
                v1::CacheKind::TaylorSeer as i32,
                42,
            ],
            num_blocks: 3,
            ..Default::default()
        });
        assert_eq!(info.conditioning, Conditioning::Text);
        assert_eq!(info.size, 16..=256);
        assert_eq!(info.steps, 1..=100);
        assert_eq!(info.guidance, 0.0..=10.0);
        assert_eq!(
            info.supported_caches,
            [
                CacheKind::None,
                CacheKind::TaylorSeer,
                CacheKind::Unspecified
            ]
        );
        // A server from before video support sends neither field.
        assert_eq!(info.modality, Modality::Unspecified);
        assert_eq!(info.video, None);
    }

    #[test]
    fn video_model_info_from_proto() {
        let info = ModelInfo::from(v1::ModelInfo {
            name: "cogvideox-2b".into(),
            modality: v1::Modality::Video as i32,
            video: Some(v1::VideoLimits {
                default_num_frames: 49,
                num_frames: Some(v1::Range { min: 1, max: 49 }),
                num_frames_step: 4,
                default_fps: 8,
            }),
            ..Default::default()
        });
        assert_eq!(info.modality, Modality::Video);
        assert_eq!(info.modality.name(), "video");
        let video = info.video.unwrap();
        assert_eq!(video.default_num_frames, 49);
        assert_eq!(video.num_frames, 1..=49);
        assert_eq!((video.num_frames_step, video.default_fps), (4, 8));

        let image = ModelInfo::from(v1::ModelInfo {
            modality: v1::Modality::Image as i32,
            ..Default::default()
        });
        assert_eq!(image.modality, Modality::Image);
        assert_eq!(Modality::from_proto(7), Modality::Unspecified);
    }

    #[test]
    fn session_info_from_proto() {
        let info = SessionInfo::from(v1::Session {
            session_id: "s1".into(),
            model: "flux-tiny".into(),
            cache: Some(
                CacheConfig::parse("fbc:threshold=0.1")
                    .unwrap()
                    .into_proto(),
            ),
            cache_state_bytes: 1024,
            generations_run: 2,
            generating: true,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            last_activity: None,
            idle_timeout_seconds: 600,
            labels: [("user".to_owned(), "ada".to_owned())].into(),
        });
        assert_eq!(info.id, "s1");
        assert_eq!(info.cache.to_string(), "fbc:threshold=0.1");
        assert_eq!(info.idle_timeout, Duration::from_secs(600));
        assert_eq!(
            info.created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(info.last_activity, None);
        assert_eq!(info.labels["user"], "ada");
    }
}
