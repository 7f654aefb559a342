//! Turns a `GenerateRequest` into the domain request, or an `INVALID_ARGUMENT` that names the
//! field. Defaults come from the model's card; bounds from it and the limits in the config.
use denoised_proto::v1 as pb;

use super::convert::image_format;
use crate::config::Limits;
use crate::dit::pipeline::ModelCard;
use crate::dit::request::{
    GenerationRequest, ImageFormat, PreviewKind, PreviewPlan, VideoFormat, VideoPlan,
};
use crate::engine::ServedModel;
use crate::error::{ServiceError, ServiceResult};

pub struct ResolvedRequest {
    pub request: GenerationRequest,
    pub preview: PreviewPlan,
    pub record_modules: bool,
    pub output_format: ImageFormat,
    /// Video models only.
    pub video: Option<VideoPlan>,
}

pub fn resolve_generate(
    req: &pb::GenerateRequest,
    served: &ServedModel,
    limits: &Limits,
) -> ServiceResult<ResolvedRequest> {
    let model = &served.card;
    for (field, text) in [
        ("prompt", &req.prompt),
        ("negative_prompt", &req.negative_prompt),
    ] {
        if text.chars().count() > limits.max_prompt_chars {
            return Err(ServiceError::invalid(
                field,
                format!("longer than {} characters", limits.max_prompt_chars),
            ));
        }
    }
    // Every family served is text-conditioned.
    if req.class_label.is_some() {
        return Err(ServiceError::invalid(
            "class_label",
            format!(
                "model `{}` is text-conditioned; give a prompt instead",
                served.name
            ),
        ));
    }
    let width = size(req.width, model.default_width, "width", model, limits)?;
    let height = size(req.height, model.default_height, "height", model, limits)?;
    let steps = if req.steps == 0 {
        model.default_steps
    } else {
        req.steps
    };
    let max_steps = limits.max_steps.min(model.steps.1);
    if steps > max_steps {
        return Err(ServiceError::invalid(
            "steps",
            format!("must be between 1 and {max_steps}"),
        ));
    }
    let guidance = req.guidance.unwrap_or(model.default_guidance);
    check_scale(guidance, "guidance", limits)?;
    let true_cfg_scale = req.true_cfg_scale.unwrap_or(1.0);
    check_scale(true_cfg_scale, "true_cfg_scale", limits)?;
    if true_cfg_scale > 1.0 && !model.supports_true_cfg {
        return Err(ServiceError::invalid(
            "true_cfg_scale",
            format!("model `{}` does not support true CFG", served.name),
        ));
    }
    let preview = req.preview.unwrap_or_default();
    let kind = match pb::PreviewMode::try_from(preview.mode) {
        Ok(pb::PreviewMode::Unspecified | pb::PreviewMode::None) => None,
        Ok(pb::PreviewMode::LatentRgb) => Some(PreviewKind::LatentRgb),
        Ok(pb::PreviewMode::FullDecode) => Some(PreviewKind::FullDecode),
        Err(_) => {
            return Err(ServiceError::invalid(
                "preview.mode",
                format!("unknown value {}", preview.mode),
            ))
        }
    };
    let preview_format = image_format(preview.format, "preview.format")?;
    if preview.max_edge > limits.max_image_edge * 2 {
        return Err(ServiceError::invalid(
            "preview.max_edge",
            format!("at most {}", limits.max_image_edge * 2),
        ));
    }
    let output_format = image_format(req.output_format, "output_format")?;
    let (num_frames, video) = video(req, served, (width, height), limits)?;
    let negative_prompt = (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone());
    Ok(ResolvedRequest {
        request: GenerationRequest {
            prompt: req.prompt.clone(),
            negative_prompt,
            width: width as usize,
            height: height as usize,
            steps: steps as usize,
            guidance,
            true_cfg_scale,
            seed: req.seed.unwrap_or_else(random_seed),
            max_sequence_length: model.max_sequence_length,
            num_frames,
            dynamic_cfg: req.use_dynamic_cfg.unwrap_or(false),
        },
        preview: PreviewPlan {
            kind,
            every_n_steps: preview.every_n_steps,
            format: preview_format,
            max_edge: preview.max_edge,
        },
        record_modules: req.record_module_decisions,
        output_format,
        video,
    })
}

/// The frame count and output plan of a video model; image models take none of the video fields.
fn video(
    req: &pb::GenerateRequest,
    served: &ServedModel,
    (width, height): (u32, u32),
    limits: &Limits,
) -> ServiceResult<(Option<usize>, Option<VideoPlan>)> {
    let Some(card) = served.card.video else {
        let makes_images = format!("model `{}` makes images", served.name);
        for (field, set) in [
            ("num_frames", req.num_frames > 1),
            ("fps", req.fps != 0),
            ("use_dynamic_cfg", req.use_dynamic_cfg == Some(true)),
            ("return_frames", req.return_frames),
        ] {
            if set {
                return Err(ServiceError::invalid(field, makes_images));
            }
        }
        return Ok((None, None));
    };
    let frames = if req.num_frames == 0 {
        card.default_frames
    } else {
        req.num_frames
    };
    let max = card.max_frames.min(limits.max_video_frames);
    let step = card.frame_step.max(1);
    if frames > max || (frames - 1) % step != 0 {
        return Err(ServiceError::invalid(
            "num_frames",
            format!(
                "must be 1 + {step}·k frames (counts the model returns exactly), at most {max}; \
                 got {frames}"
            ),
        ));
    }
    let pixels = u64::from(frames) * u64::from(width) * u64::from(height);
    if pixels > limits.max_video_pixels {
        return Err(ServiceError::ResourceExhausted(format!(
            "`num_frames` × `width` × `height` = {frames} × {width} × {height} exceeds this server's \
             limit of {} pixels per video",
            limits.max_video_pixels
        )));
    }
    let format = match pb::VideoFormat::try_from(req.video_format) {
        Ok(pb::VideoFormat::Unspecified | pb::VideoFormat::Mp4) => VideoFormat::Mp4,
        Ok(pb::VideoFormat::Gif) => VideoFormat::Gif,
        Err(_) => {
            return Err(ServiceError::invalid(
                "video_format",
                format!("unknown value {}", req.video_format),
            ))
        }
    };
    let fps = if req.fps == 0 {
        card.default_fps
    } else {
        req.fps
    };
    let max_fps = format.max_fps();
    if fps > max_fps {
        return Err(ServiceError::invalid(
            "fps",
            format!("must be between 1 and {max_fps} for {format:?}"),
        ));
    }
    Ok((
        Some(frames as usize),
        Some(VideoPlan {
            fps,
            format,
            return_frames: req.return_frames,
        }),
    ))
}

/// 0 means the model default; otherwise within the model's range, rounded down to its size
/// multiple as diffusers does.
fn size(
    value: u32,
    default: u32,
    field: &str,
    model: &ModelCard,
    limits: &Limits,
) -> ServiceResult<u32> {
    let value = if value == 0 { default } else { value };
    let multiple = model.size_multiple.max(1);
    let (min, max) = (
        model.size.0.max(multiple),
        model.size.1.min(limits.max_image_edge),
    );
    if value < min || value > max {
        return Err(ServiceError::invalid(
            field,
            format!("must be between {min} and {max} pixels"),
        ));
    }
    Ok(value / multiple * multiple)
}

fn check_scale(value: f32, field: &str, limits: &Limits) -> ServiceResult<()> {
    if value.is_finite() && (0.0..=limits.max_guidance).contains(&value) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            field,
            format!("must be between 0 and {}", limits.max_guidance),
        ))
    }
}

fn random_seed() -> u64 {
    // 63 bits keep the seed positive for clients that read it as a signed integer.
    (uuid::Uuid::new_v4().as_u128() as u64) >> 1
}

#[cfg(test)]
pub(super) mod tests {
    use tch::{Device, Kind};

    use super::*;

    pub(in crate::api) fn model() -> ServedModel {
        ServedModel {
            name: "m".into(),
            card: ModelCard {
                family: "flux",
                variant: "flux-dev".into(),
                default_width: 64,
                default_height: 64,
                size: (16, 1024),
                size_multiple: 16,
                default_steps: 4,
                steps: (1, 1000),
                default_guidance: 3.5,
                guidance: (0.0, 100.0),
                guidance_embeds: true,
                supports_true_cfg: true,
                num_blocks: 2,
                max_sequence_length: 32,
                video: None,
                device: Device::Cpu,
                kind: Kind::Float,
            },
            device: "cpu".into(),
            dtype: "float32".into(),
            supported_caches: vec![],
        }
    }

    pub(in crate::api) fn video_model() -> ServedModel {
        let mut m = model();
        m.card.video = Some(crate::dit::pipeline::VideoCard {
            default_frames: 9,
            max_frames: 253,
            frame_step: 4,
            default_fps: 8,
        });
        m
    }

    fn field_of(req: pb::GenerateRequest) -> String {
        field_of_model(req, &model())
    }

    fn field_of_model(req: pb::GenerateRequest, model: &ServedModel) -> String {
        match resolve_generate(&req, model, &Limits::default()) {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!(
                "expected InvalidArgument, got {:?}",
                other.map(|r| r.request)
            ),
        }
    }

    #[test]
    fn defaults_and_rounding() {
        let r = resolve_generate(
            &pb::GenerateRequest {
                width: 100,
                seed: Some(7),
                preview: Some(pb::PreviewOptions {
                    mode: pb::PreviewMode::LatentRgb as i32,
                    every_n_steps: 2,
                    format: pb::ImageFormat::Jpeg as i32,
                    max_edge: 128,
                }),
                ..Default::default()
            },
            &model(),
            &Limits::default(),
        )
        .unwrap();
        let p = r.request;
        assert_eq!((p.width, p.height, p.steps, p.seed), (96, 64, 4, 7));
        assert_eq!((p.guidance, p.true_cfg_scale), (3.5, 1.0));
        assert_eq!(p.max_sequence_length, 32);
        assert_eq!(r.output_format, ImageFormat::Png);
        assert_eq!(
            r.preview,
            PreviewPlan {
                kind: Some(PreviewKind::LatentRgb),
                every_n_steps: 2,
                format: ImageFormat::Jpeg,
                max_edge: 128,
            }
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let req = |f: fn(&mut pb::GenerateRequest)| {
            let mut r = pb::GenerateRequest::default();
            f(&mut r);
            r
        };
        assert_eq!(field_of(req(|r| r.width = 8)), "width");
        assert_eq!(field_of(req(|r| r.height = 100_000)), "height");
        assert_eq!(field_of(req(|r| r.steps = 10_000)), "steps");
        assert_eq!(field_of(req(|r| r.guidance = Some(-1.0))), "guidance");
        assert_eq!(field_of(req(|r| r.guidance = Some(f32::NAN))), "guidance");
        assert_eq!(
            field_of(req(|r| r.true_cfg_scale = Some(1e9))),
            "true_cfg_scale"
        );
        assert_eq!(field_of(req(|r| r.class_label = Some(3))), "class_label");
        assert_eq!(field_of(req(|r| r.prompt = "x".repeat(100_000))), "prompt");
        assert_eq!(
            field_of(req(|r| r.preview = Some(pb::PreviewOptions {
                mode: 99,
                ..Default::default()
            }))),
            "preview.mode"
        );
        assert_eq!(
            field_of(req(|r| r.preview = Some(pb::PreviewOptions {
                format: 7,
                ..Default::default()
            }))),
            "preview.format"
        );
        assert_eq!(field_of(req(|r| r.output_format = 42)), "output_format");
        // Image models take no video fields.
        assert_eq!(field_of(req(|r| r.num_frames = 9)), "num_frames");
        assert_eq!(field_of(req(|r| r.fps = 8)), "fps");
        assert_eq!(
            field_of(req(|r| r.use_dynamic_cfg = Some(true))),
            "use_dynamic_cfg"
        );
    }

    #[test]
    fn video_fields_resolve_and_are_bounded() {
        let video = video_model();
        let r =
            resolve_generate(&pb::GenerateRequest::default(), &video, &Limits::default()).unwrap();
        assert_eq!(r.request.num_frames, Some(9));
        assert_eq!(
            r.video,
            Some(VideoPlan {
                fps: 8,
                format: VideoFormat::Mp4,
                return_frames: false
            })
        );
        let req = |f: fn(&mut pb::GenerateRequest)| {
            let mut r = pb::GenerateRequest::default();
            f(&mut r);
            r
        };
        assert_eq!(
            field_of_model(req(|r| r.num_frames = 10), &video),
            "num_frames"
        );
        assert_eq!(
            field_of_model(req(|r| r.num_frames = 257), &video),
            "num_frames"
        );
        assert_eq!(field_of_model(req(|r| r.fps = 1000), &video), "fps");
        assert_eq!(
            field_of_model(req(|r| r.video_format = 9), &video),
            "video_format"
        );
        // Frames × pixels over the limit: resource exhausted, naming the fields.
        let limits = Limits {
            max_video_pixels: 64 * 64 * 5,
            ..Limits::default()
        };
        match resolve_generate(&req(|r| r.num_frames = 9), &video, &limits) {
            Err(ServiceError::ResourceExhausted(m)) => assert!(m.contains("`num_frames`"), "{m}"),
            other => panic!(
                "expected ResourceExhausted, got {:?}",
                other.map(|r| r.request)
            ),
        }
    }
}
