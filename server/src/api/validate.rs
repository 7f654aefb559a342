//! Turns a `GenerateRequest` into the domain request, or an `INVALID_ARGUMENT` that names the
//! field. Defaults come from the model's card; bounds from it and the limits in the config.
use denoised_proto::v1 as pb;

use super::convert::image_format;
use crate::config::Limits;
use crate::dit::pipeline::ModelCard;
use crate::dit::request::{GenerationRequest, ImageFormat, PreviewKind, PreviewPlan};
use crate::engine::ServedModel;
use crate::error::{ServiceError, ServiceResult};

pub struct ResolvedRequest {
    pub request: GenerationRequest,
    pub preview: PreviewPlan,
    pub output_format: ImageFormat,
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
            num_frames: None,
            dynamic_cfg: false,
        },
        preview: PreviewPlan {
            kind,
            every_n_steps: preview.every_n_steps,
            format: preview_format,
            max_edge: preview.max_edge,
        },
        output_format,
    })
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
mod tests {
    use tch::{Device, Kind};

    use super::*;

    fn model() -> ServedModel {
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

    fn field_of(req: pb::GenerateRequest) -> String {
        match resolve_generate(&req, &model(), &Limits::default()) {
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
    }
}
