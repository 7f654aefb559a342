//! Property tests over what a client can send: request validation and cache-config conversion
//! never panic, refuse bad values by naming a field, and whatever they accept builds within the
//! limits (a fixed budget of cases per run).
use denoised_proto::v1 as pb;
use pb::cache_config::Strategy as Wire;
use proptest::prelude::*;

use super::convert::cache::cache_config;
use super::validate::resolve_generate;
use super::validate::tests::{model, video_model};
use crate::cache::build_strategy;
use crate::config::Limits;
use crate::error::ServiceError;

/// Mostly plausible values, sometimes anything.
fn size() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..2100, any::<u32>()]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![-2.0f32..1100.0, any::<f32>()]
}

fn enum_code() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..4, any::<i32>()]
}

fn range() -> impl Strategy<Value = Option<pb::FloatRange>> {
    proptest::option::of((float(), float()).prop_map(|(min, max)| pb::FloatRange { min, max }))
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r"transformer_blocks\.\d+\.attn".to_owned()),
        "[a-z_.\\\\d+*()\\[\\]{}|0-9]{0,40}",
        any::<String>(),
    ]
}

fn generate_request() -> impl Strategy<Value = pb::GenerateRequest> {
    let text = prop_oneof!["[a-z ]{0,40}", any::<String>()];
    let preview = proptest::option::of((enum_code(), size(), enum_code(), size()).prop_map(
        |(mode, every_n_steps, format, max_edge)| pb::PreviewOptions {
            mode,
            every_n_steps,
            format,
            max_edge,
        },
    ));
    (
        (text.clone(), text, size(), size(), size()),
        (
            proptest::option::of(float()),
            proptest::option::of(float()),
            proptest::option::of(any::<u64>()),
            preview,
        ),
        (
            enum_code(),
            size(),
            size(),
            any::<Option<bool>>(),
            enum_code(),
        ),
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (prompt, negative_prompt, width, height, steps),
                (guidance, true_cfg_scale, seed, preview),
                (output_format, num_frames, fps, use_dynamic_cfg, video_format),
                (return_frames, record_module_decisions),
            )| pb::GenerateRequest {
                prompt,
                negative_prompt,
                width,
                height,
                steps,
                guidance,
                true_cfg_scale,
                seed,
                preview,
                output_format,
                num_frames,
                fps,
                use_dynamic_cfg,
                video_format,
                return_frames,
                record_module_decisions,
                ..Default::default()
            },
        )
}

fn cache() -> impl Strategy<Value = pb::CacheConfig> {
    let skip = || proptest::option::of(size());
    let pab =
        (skip(), skip(), skip(), range(), range(), range()).prop_map(|(s, t, c, sr, tr, cr)| {
            Wire::PyramidAttentionBroadcast(pb::PyramidAttentionBroadcast {
                spatial_attention_block_skip_range: s,
                temporal_attention_block_skip_range: t,
                cross_attention_block_skip_range: c,
                spatial_attention_timestep_skip_range: sr,
                temporal_attention_timestep_skip_range: tr,
                cross_attention_timestep_skip_range: cr,
            })
        });
    let weight = proptest::option::of(prop_oneof![
        float().prop_map(pb::attention_weight::Weight::Constant),
        (float(), float()).prop_map(|(min, max)| pb::attention_weight::Weight::Linear(
            pb::FloatRange { min, max }
        )),
    ])
    .prop_map(|weight| weight.map(|w| pb::AttentionWeight { weight: Some(w) }));
    let faster = (
        (skip(), skip(), range(), range(), range(), range()),
        (
            proptest::option::of(float()),
            proptest::option::of(float()),
            skip(),
            range(),
        ),
        (weight, any::<Option<bool>>()),
    )
        .prop_map(
            |((s, t, sr, tr, lo, hi), (al, ah, u, ur), (w, distilled))| {
                Wire::FasterCache(pb::FasterCache {
                    spatial_attention_block_skip_range: s,
                    temporal_attention_block_skip_range: t,
                    spatial_attention_timestep_skip_range: sr,
                    temporal_attention_timestep_skip_range: tr,
                    low_frequency_weight_update_timestep_range: lo,
                    high_frequency_weight_update_timestep_range: hi,
                    alpha_low_frequency: al,
                    alpha_high_frequency: ah,
                    unconditional_batch_skip_range: u,
                    unconditional_batch_timestep_skip_range: ur,
                    attention_weight: w,
                    is_guidance_distilled: distilled,
                })
            },
        );
    let taylor = (
        (skip(), skip(), skip(), skip(), enum_code()),
        (
            proptest::collection::vec(pattern(), 0..4),
            proptest::collection::vec(pattern(), 0..4),
            any::<Option<bool>>(),
        ),
    )
        .prop_map(
            |((ci, before, after, order, dtype), (skip_ids, cache_ids, lite))| {
                Wire::TaylorSeer(pb::TaylorSeer {
                    cache_interval: ci,
                    disable_cache_before_step: before,
                    disable_cache_after_step: after,
                    max_order: order,
                    taylor_factors_dtype: dtype,
                    skip_predict_identifiers: skip_ids,
                    cache_identifiers: cache_ids,
                    use_lite_mode: lite,
                })
            },
        );
    let fbc = proptest::option::of(float())
        .prop_map(|threshold| Wire::FirstBlockCache(pb::FirstBlockCache { threshold }));
    let mag = (
        proptest::option::of(float()),
        skip(),
        proptest::option::of(float()),
        skip(),
        proptest::collection::vec(float(), 0..40),
        any::<bool>(),
    )
        .prop_map(
            |(threshold, max_skip, retention, steps, ratios, calibrate)| {
                Wire::MagCache(pb::MagCache {
                    threshold,
                    max_skip_steps: max_skip,
                    retention_ratio: retention,
                    num_inference_steps: steps,
                    mag_ratios: ratios,
                    calibrate,
                })
            },
        );
    proptest::option::of(prop_oneof![
        Just(Wire::None(pb::NoCache {})),
        pab,
        faster,
        taylor,
        fbc,
        mag
    ])
    .prop_map(|strategy| pb::CacheConfig { strategy })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn generate_requests_resolve_within_limits_or_name_a_field(
        req in generate_request(),
        video in any::<bool>(),
    ) {
        let served = if video { video_model() } else { model() };
        let limits = Limits::default();
        match resolve_generate(&req, &served, &limits) {
            Ok(r) => {
                let (card, g) = (&served.card, &r.request);
                let m = card.size_multiple as usize;
                prop_assert!(g.width % m == 0 && g.height % m == 0);
                prop_assert!(g.width <= limits.max_image_edge as usize);
                prop_assert!(g.height <= limits.max_image_edge as usize);
                prop_assert!(g.steps >= 1 && g.steps <= limits.max_steps as usize);
                prop_assert!(g.guidance.is_finite() && g.true_cfg_scale.is_finite());
                prop_assert!(g.prompt.chars().count() <= limits.max_prompt_chars);
                if let Some(frames) = g.num_frames {
                    prop_assert!(video && frames as u32 <= limits.max_video_frames);
                }
            }
            Err(ServiceError::InvalidArgument { field, message }) => {
                prop_assert!(!field.is_empty() && !message.is_empty());
                prop_assert!(field.len() < 100, "field {field}");
            }
            Err(ServiceError::ResourceExhausted(message)) => prop_assert!(!message.is_empty()),
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn cache_configs_convert_or_name_a_field_and_build_within_limits(
        config in cache(),
        steps in 1usize..60,
    ) {
        match cache_config(Some(&config), "cache", &Limits::default()) {
            Ok(c) => {
                // What was accepted builds, with state bounded by the limits.
                let resolved = c.for_generation(steps);
                let started = std::time::Instant::now();
                let built = build_strategy(&resolved, steps);
                prop_assert!(built.is_ok(), "{resolved:?}: {:?}", built.err());
                prop_assert!(started.elapsed() < std::time::Duration::from_millis(200));
            }
            Err(ServiceError::InvalidArgument { field, .. }) => {
                prop_assert!(field.starts_with("cache."), "field {field}");
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}
