//! The one boundary between the wire (generated proto types, `tonic::Status`) and the domain:
//! wire → domain conversions that validate, domain → wire conversions for replies and stream
//! events, and the exhaustive mapping of service errors to statuses.
pub mod cache;

use denoised_proto::v1 as pb;
use tonic::{Code, Status};

use crate::dit::hooks::{DecisionKind, ForwardDecisions, ForwardRows, ModuleCounts};
use crate::dit::request::{ImageFormat, VideoFormat};
use crate::engine::events::{self, Event};
use crate::engine::ServedModel;
use crate::error::ServiceError;
use crate::media::{EncodedImage, EncodedVideo};
use crate::models::ModelError;
use crate::session::Session;

/// The status code a service error maps to.
pub fn code(e: &ServiceError) -> Code {
    match e {
        ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
        ServiceError::SessionNotFound(_) | ServiceError::ModelNotFound(_) => Code::NotFound,
        ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
        ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
        ServiceError::Cancelled => Code::Cancelled,
        ServiceError::EngineStopped | ServiceError::ShuttingDown => Code::Unavailable,
        ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        // Input the model rejects (e.g. a prompt the tokenizer cannot take) is the caller's.
        ServiceError::Model(ModelError::InvalidInput { .. }) => Code::InvalidArgument,
        ServiceError::Model(_) | ServiceError::Internal(_) => Code::Internal,
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let message = match &e {
            // Name the field the way the request spells it.
            ServiceError::Model(ModelError::InvalidInput { field, message }) => {
                format!("invalid `{field}`: {message}")
            }
            other => other.to_string(),
        };
        Status::new(code(&e), cap(message))
    }
}

/// Longest status message sent: it travels in a header, which peers limit (8–16 KiB).
const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// `message`, cut on a character boundary to [`MAX_STATUS_MESSAGE_BYTES`].
fn cap(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut cut = MAX_STATUS_MESSAGE_BYTES - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

pub fn model_info(m: &ServedModel) -> pb::ModelInfo {
    let c = &m.card;
    pb::ModelInfo {
        name: m.name.clone(),
        family: c.family.into(),
        variant: c.variant.clone(),
        conditioning: pb::Conditioning::Text as i32,
        default_width: c.default_width,
        default_height: c.default_height,
        size: Some(pb::Range {
            min: c.size.0,
            max: c.size.1,
        }),
        size_multiple: c.size_multiple,
        default_steps: c.default_steps,
        steps: Some(pb::Range {
            min: c.steps.0,
            max: c.steps.1,
        }),
        default_guidance: c.default_guidance,
        guidance: Some(pb::FloatRange {
            min: c.guidance.0,
            max: c.guidance.1,
        }),
        guidance_embeds: c.guidance_embeds,
        supports_true_cfg: c.supports_true_cfg,
        dtype: m.dtype.clone(),
        device: m.device.clone(),
        supported_caches: m
            .supported_caches
            .iter()
            .map(|&k| cache::cache_kind(k) as i32)
            .collect(),
        num_blocks: c.num_blocks,
        modality: if c.video.is_some() {
            pb::Modality::Video
        } else {
            pb::Modality::Image
        } as i32,
        video: c.video.map(|v| pb::VideoLimits {
            default_num_frames: v.default_frames,
            num_frames: Some(pb::Range {
                min: 1,
                max: v.max_frames,
            }),
            num_frames_step: v.frame_step,
            default_fps: v.default_fps,
        }),
    }
}

pub fn session(s: &Session) -> pb::Session {
    let timestamp = |t: std::time::SystemTime| Some(prost_types::Timestamp::from(t));
    pb::Session {
        session_id: s.id.clone(),
        model: s.model.clone(),
        cache: Some(cache::cache_config_to_wire(&s.cache())),
        cache_state_bytes: s.cache_bytes(),
        generations_run: s.generations_run(),
        generating: s.is_generating(),
        created_at: timestamp(s.created_at),
        last_activity: timestamp(s.last_activity()),
        idle_timeout_seconds: s.idle_timeout.as_secs() as u32,
        labels: s.labels.clone(),
    }
}

/// The wire image format (unspecified means PNG); `field` names it in the error.
pub fn image_format(value: i32, field: &str) -> Result<ImageFormat, ServiceError> {
    match pb::ImageFormat::try_from(value) {
        Ok(pb::ImageFormat::Unspecified | pb::ImageFormat::Png) => Ok(ImageFormat::Png),
        Ok(pb::ImageFormat::Jpeg) => Ok(ImageFormat::Jpeg),
        Err(_) => Err(ServiceError::invalid(
            field,
            format!("unknown value {value}"),
        )),
    }
}

fn image(i: EncodedImage) -> pb::Image {
    pb::Image {
        format: match i.format {
            ImageFormat::Png => pb::ImageFormat::Png,
            ImageFormat::Jpeg => pb::ImageFormat::Jpeg,
        } as i32,
        width: i.width,
        height: i.height,
        data: i.data,
    }
}

fn video(v: EncodedVideo) -> pb::Video {
    pb::Video {
        format: match v.format {
            VideoFormat::Mp4 => pb::VideoFormat::Mp4,
            VideoFormat::Gif => pb::VideoFormat::Gif,
        } as i32,
        width: v.width,
        height: v.height,
        num_frames: v.frames,
        fps: v.fps,
        data: v.data,
    }
}

fn counts(c: &ModuleCounts) -> pb::ModuleCounts {
    pb::ModuleCounts {
        computed: c.computed,
        reused: c.reused,
        predicted: c.predicted,
        skipped: c.skipped,
    }
}

/// A generation's stream item on the wire.
pub fn event(e: Result<Event, ServiceError>) -> Result<pb::GenerateEvent, Status> {
    use pb::generate_event::Event as Wire;
    let wire = match e? {
        Event::Started(s) => Wire::Started(started(*s)),
        Event::Step(s) => Wire::Step(step(s)),
        Event::Completed(c) => Wire::Completed(completed(c)),
    };
    Ok(pb::GenerateEvent { event: Some(wire) })
}

fn started(s: events::Started) -> pb::Started {
    let r = s.request;
    pb::Started {
        generation_id: s.generation_id,
        session_id: s.session_id,
        settings: Some(pb::ResolvedSettings {
            model: s.model,
            prompt: r.prompt,
            negative_prompt: r.negative_prompt.unwrap_or_default(),
            width: r.width as u32,
            height: r.height as u32,
            steps: r.steps as u32,
            guidance: r.guidance,
            true_cfg_scale: r.true_cfg_scale,
            seed: r.seed,
            cache: Some(cache::cache_config_to_wire(&s.cache)),
            device: s.device,
            dtype: s.dtype,
            num_frames: r.num_frames.unwrap_or(0) as u32,
            fps: s.video.map_or(0, |v| v.fps),
            use_dynamic_cfg: r.dynamic_cfg,
        }),
        setup_ms: s.setup_ms,
    }
}

fn step(s: events::Step) -> pb::Step {
    let c = s.cache;
    pb::Step {
        index: s.index,
        total: s.total,
        timestep: s.timestep,
        sigma: s.sigma,
        cache: Some(pb::CacheActivity {
            strategy: cache::cache_kind(c.strategy) as i32,
            blocks: Some(counts(&c.blocks)),
            attention: Some(counts(&c.attention)),
            full_compute: c.full_compute,
            strategy_step: c.strategy_step,
            cache_state_bytes: c.cache_state_bytes,
            strategy_switched: c.strategy_switched,
            cache_reset: c.cache_reset,
            modules: c.modules.map(|forwards| pb::ModuleDecisions {
                forwards: forwards.iter().map(forward_decisions).collect(),
            }),
        }),
        step_ms: s.step_ms,
        preview: s.preview.map(image),
    }
}

fn forward_decisions(f: &ForwardDecisions) -> pb::ForwardDecisions {
    let code = |d: Option<DecisionKind>| -> i32 {
        match d {
            None => pb::ModuleDecision::Unspecified,
            Some(DecisionKind::Computed) => pb::ModuleDecision::Computed,
            Some(DecisionKind::Reused) => pb::ModuleDecision::Reused,
            Some(DecisionKind::Predicted) => pb::ModuleDecision::Predicted,
            Some(DecisionKind::Skipped) => pb::ModuleDecision::Skipped,
        }
        .into()
    };
    pb::ForwardDecisions {
        rows: match f.rows {
            ForwardRows::Cond => pb::ForwardRows::Cond,
            ForwardRows::Uncond => pb::ForwardRows::Uncond,
            ForwardRows::BothCfg => pb::ForwardRows::Both,
        }
        .into(),
        forward: code(Some(f.forward)),
        blocks: f.blocks.iter().map(|b| code(Some(b.block))).collect(),
        attention: f.blocks.iter().map(|b| code(b.attention)).collect(),
        output_projection: code(f.output_projection),
    }
}

fn completed(c: events::Completed) -> pb::Completed {
    pb::Completed {
        generation_id: c.generation_id,
        image: Some(image(c.image)),
        total_ms: c.total_ms,
        denoise_ms: c.denoise_ms,
        decode_ms: c.decode_ms,
        steps: c.steps,
        full_compute_steps: c.full_compute_steps,
        cache_hit_ratio: c.cache_hit_ratio,
        estimated_flops_saved: c.estimated_flops_saved,
        estimated_flops_total: c.estimated_flops_total,
        calibrated_mag_ratios: c.calibrated_mag_ratios,
        video: c.video.map(video),
        frames: c.frames.into_iter().map(image).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_and_name_the_field() {
        let s: Status = ServiceError::invalid("width", "must be at least 16").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("`width`"));
        let s: Status = ServiceError::SessionNotFound("abc".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ServiceError::Model(ModelError::invalid_input("prompt", "too long")).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("`prompt`"));
        assert_eq!(
            event(Err(ServiceError::Cancelled)).unwrap_err().code(),
            Code::Cancelled
        );
    }
}
