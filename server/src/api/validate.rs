//! Turns a `GenerateRequest` into resolved pipeline parameters, or an `INVALID_ARGUMENT` that
//! names the field. Defaults come from the model; bounds from the limits in the config.
use denoised_proto::v1 as pb;

use crate::config::Limits;
use crate::error::{ServiceError, ServiceResult};
use crate::pipeline::flux::GenerateParams;

pub struct ResolvedRequest {
    pub params: GenerateParams,
    pub preview: pb::PreviewOptions,
    pub output_format: pb::ImageFormat,
}

pub fn resolve_generate(
    req: &pb::GenerateRequest,
    model: &pb::ModelInfo,
    max_sequence_length: usize,
    limits: &Limits,
) -> ServiceResult<ResolvedRequest> {
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
    if req.class_label.is_some() && model.conditioning != pb::Conditioning::ClassLabel as i32 {
        return Err(ServiceError::invalid(
            "class_label",
            format!(
                "model `{}` is text-conditioned; give a prompt instead",
                model.name
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
    let max_steps = limits
        .max_steps
        .min(model.steps.map_or(u32::MAX, |r| r.max));
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
            format!("model `{}` does not support true CFG", model.name),
        ));
    }
    let preview = req.preview.unwrap_or_default();
    let mode = pb::PreviewMode::try_from(preview.mode).map_err(|_| {
        ServiceError::invalid("preview.mode", format!("unknown value {}", preview.mode))
    })?;
    pb::ImageFormat::try_from(preview.format).map_err(|_| {
        ServiceError::invalid(
            "preview.format",
            format!("unknown value {}", preview.format),
        )
    })?;
    if preview.max_edge > limits.max_image_edge * 2 {
        return Err(ServiceError::invalid(
            "preview.max_edge",
            format!("at most {}", limits.max_image_edge * 2),
        ));
    }
    let output_format = pb::ImageFormat::try_from(req.output_format).map_err(|_| {
        ServiceError::invalid(
            "output_format",
            format!("unknown value {}", req.output_format),
        )
    })?;
    let negative_prompt = (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone());
    Ok(ResolvedRequest {
        params: GenerateParams {
            prompt: req.prompt.clone(),
            negative_prompt,
            width: width as usize,
            height: height as usize,
            steps: steps as usize,
            guidance,
            true_cfg_scale,
            seed: req.seed.unwrap_or_else(random_seed),
            max_sequence_length,
        },
        preview: pb::PreviewOptions {
            mode: mode as i32,
            ..preview
        },
        output_format: match output_format {
            pb::ImageFormat::Jpeg => pb::ImageFormat::Jpeg,
            _ => pb::ImageFormat::Png,
        },
    })
}

/// 0 means the model default; otherwise within the model's range, rounded down to its size
/// multiple as diffusers does.
fn size(
    value: u32,
    default: u32,
    field: &str,
    model: &pb::ModelInfo,
    limits: &Limits,
) -> ServiceResult<u32> {
    let value = if value == 0 { default } else { value };
    let multiple = model.size_multiple.max(1);
    let (min, max) = model.size.map_or((multiple, limits.max_image_edge), |r| {
        (r.min.max(multiple), r.max.min(limits.max_image_edge))
    });
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
    use super::*;

    fn model() -> pb::ModelInfo {
        pb::ModelInfo {
            name: "m".into(),
            conditioning: pb::Conditioning::Text as i32,
            default_width: 64,
            default_height: 64,
            size: Some(pb::Range { min: 16, max: 1024 }),
            size_multiple: 16,
            default_steps: 4,
            steps: Some(pb::Range { min: 1, max: 1000 }),
            default_guidance: 3.5,
            supports_true_cfg: true,
            ..Default::default()
        }
    }

    fn field_of(req: pb::GenerateRequest) -> String {
        match resolve_generate(&req, &model(), 32, &Limits::default()) {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!(
                "expected InvalidArgument, got {:?}",
                other.map(|r| r.params)
            ),
        }
    }

    #[test]
    fn defaults_and_rounding() {
        let r = resolve_generate(
            &pb::GenerateRequest {
                width: 100,
                seed: Some(7),
                ..Default::default()
            },
            &model(),
            32,
            &Limits::default(),
        )
        .unwrap();
        let p = r.params;
        assert_eq!((p.width, p.height, p.steps, p.seed), (96, 64, 4, 7));
        assert_eq!(p.guidance, 3.5);
        assert_eq!(p.true_cfg_scale, 1.0);
        assert_eq!(r.output_format, pb::ImageFormat::Png);
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
        assert_eq!(field_of(req(|r| r.output_format = 42)), "output_format");
    }
}
