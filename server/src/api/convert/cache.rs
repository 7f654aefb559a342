//! Cache strategy configurations on the wire ↔ the validated domain configs: diffusers 0.42.1's
//! defaults are resolved here, and every bad field is refused naming its path.
use denoised_proto::v1 as pb;
use pb::cache_config::Strategy;

use crate::cache::config::{
    AttentionWeight, FactorDtype, FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
    PyramidAttentionBroadcastConfig, TaylorSeerConfig, TimestepRange,
};
use crate::cache::taylor_seer::fullmatch;
use crate::cache::{CacheConfig, CacheKind};
use crate::config::Limits;
use crate::error::{ServiceError, ServiceResult};

pub fn cache_kind(kind: CacheKind) -> pb::CacheKind {
    match kind {
        CacheKind::None => pb::CacheKind::None,
        CacheKind::PyramidAttentionBroadcast => pb::CacheKind::PyramidAttentionBroadcast,
        CacheKind::FasterCache => pb::CacheKind::FasterCache,
        CacheKind::TaylorSeer => pb::CacheKind::TaylorSeer,
        CacheKind::FirstBlockCache => pb::CacheKind::FirstBlockCache,
        CacheKind::MagCache => pb::CacheKind::MagCache,
    }
}

/// Validates an API config. `field` is the request's path to it (e.g. `cache`), used to
/// name the offending field in errors. A missing config or strategy means no cache. Size-like
/// fields are bounded by `limits`, since strategies allocate and compile from them on the
/// engine thread.
pub fn cache_config(
    config: Option<&pb::CacheConfig>,
    field: &str,
    limits: &Limits,
) -> ServiceResult<CacheConfig> {
    let Some(strategy) = config.and_then(|c| c.strategy.as_ref()) else {
        return Ok(CacheConfig::None);
    };
    Ok(match strategy {
        Strategy::None(_) => CacheConfig::None,
        Strategy::PyramidAttentionBroadcast(p) => {
            let f = |name: &str| format!("{field}.pyramid_attention_broadcast.{name}");
            let default_range = TimestepRange::new(100.0, 800.0);
            let mut c = PyramidAttentionBroadcastConfig {
                spatial_attention_block_skip_range: skip_range(
                    p.spatial_attention_block_skip_range,
                    &f("spatial_attention_block_skip_range"),
                )?,
                temporal_attention_block_skip_range: skip_range(
                    p.temporal_attention_block_skip_range,
                    &f("temporal_attention_block_skip_range"),
                )?,
                cross_attention_block_skip_range: skip_range(
                    p.cross_attention_block_skip_range,
                    &f("cross_attention_block_skip_range"),
                )?,
                spatial_attention_timestep_skip_range: range(
                    p.spatial_attention_timestep_skip_range,
                    default_range,
                    &f("spatial_attention_timestep_skip_range"),
                )?,
                temporal_attention_timestep_skip_range: range(
                    p.temporal_attention_timestep_skip_range,
                    default_range,
                    &f("temporal_attention_timestep_skip_range"),
                )?,
                cross_attention_timestep_skip_range: range(
                    p.cross_attention_timestep_skip_range,
                    default_range,
                    &f("cross_attention_timestep_skip_range"),
                )?,
            };
            // diffusers: with no skip range at all, spatial attention is broadcast every 2nd call.
            if c.spatial_attention_block_skip_range.is_none()
                && c.temporal_attention_block_skip_range.is_none()
                && c.cross_attention_block_skip_range.is_none()
            {
                c.spatial_attention_block_skip_range = Some(2);
            }
            CacheConfig::PyramidAttentionBroadcast(c)
        }
        Strategy::FasterCache(p) => {
            let f = |name: &str| format!("{field}.faster_cache.{name}");
            let attention_weight = match p.attention_weight.as_ref().and_then(|w| w.weight.as_ref())
            {
                None => AttentionWeight::Constant(0.5),
                Some(pb::attention_weight::Weight::Constant(w)) => AttentionWeight::Constant(
                    finite_non_negative(*w, &f("attention_weight.constant"))?,
                ),
                Some(pb::attention_weight::Weight::Linear(r)) => AttentionWeight::Linear {
                    start: finite_non_negative(r.min, &f("attention_weight.linear.min"))?,
                    end: finite_non_negative(r.max, &f("attention_weight.linear.max"))?,
                },
            };
            CacheConfig::FasterCache(FasterCacheConfig {
                spatial_attention_block_skip_range: skip_range(
                    p.spatial_attention_block_skip_range,
                    &f("spatial_attention_block_skip_range"),
                )?
                .unwrap_or(2),
                temporal_attention_block_skip_range: skip_range(
                    p.temporal_attention_block_skip_range,
                    &f("temporal_attention_block_skip_range"),
                )?,
                spatial_attention_timestep_skip_range: range(
                    p.spatial_attention_timestep_skip_range,
                    TimestepRange::new(-1.0, 681.0),
                    &f("spatial_attention_timestep_skip_range"),
                )?,
                temporal_attention_timestep_skip_range: range(
                    p.temporal_attention_timestep_skip_range,
                    TimestepRange::new(-1.0, 681.0),
                    &f("temporal_attention_timestep_skip_range"),
                )?,
                low_frequency_weight_update_timestep_range: range(
                    p.low_frequency_weight_update_timestep_range,
                    TimestepRange::new(99.0, 901.0),
                    &f("low_frequency_weight_update_timestep_range"),
                )?,
                high_frequency_weight_update_timestep_range: range(
                    p.high_frequency_weight_update_timestep_range,
                    TimestepRange::new(-1.0, 301.0),
                    &f("high_frequency_weight_update_timestep_range"),
                )?,
                alpha_low_frequency: positive(
                    p.alpha_low_frequency.unwrap_or(1.1),
                    &f("alpha_low_frequency"),
                )?,
                alpha_high_frequency: positive(
                    p.alpha_high_frequency.unwrap_or(1.1),
                    &f("alpha_high_frequency"),
                )?,
                unconditional_batch_skip_range: skip_range(
                    p.unconditional_batch_skip_range,
                    &f("unconditional_batch_skip_range"),
                )?
                .unwrap_or(5),
                unconditional_batch_timestep_skip_range: range(
                    p.unconditional_batch_timestep_skip_range,
                    TimestepRange::new(-1.0, 641.0),
                    &f("unconditional_batch_timestep_skip_range"),
                )?,
                attention_weight,
                is_guidance_distilled: p.is_guidance_distilled.unwrap_or(false),
            })
        }
        Strategy::TaylorSeer(p) => {
            let f = |name: &str| format!("{field}.taylor_seer.{name}");
            let cache_interval = p.cache_interval.unwrap_or(5);
            if cache_interval == 0 {
                return Err(ServiceError::invalid(
                    f("cache_interval"),
                    "must be at least 1",
                ));
            }
            let max_order = p.max_order.unwrap_or(1);
            if max_order > 4 {
                return Err(ServiceError::invalid(
                    f("max_order"),
                    "must be between 0 and 4",
                ));
            }
            let before = p.disable_cache_before_step.unwrap_or(3);
            if let Some(after) = p.disable_cache_after_step {
                if after <= before {
                    return Err(ServiceError::invalid(
                        f("disable_cache_after_step"),
                        "must be greater than disable_cache_before_step",
                    ));
                }
            }
            for (name, patterns) in [
                ("skip_predict_identifiers", &p.skip_predict_identifiers),
                ("cache_identifiers", &p.cache_identifiers),
            ] {
                if patterns.len() > limits.max_cache_patterns {
                    return Err(ServiceError::invalid(
                        f(name),
                        format!(
                            "{} patterns; at most {} (limits.max_cache_patterns)",
                            patterns.len(),
                            limits.max_cache_patterns
                        ),
                    ));
                }
                for (i, pattern) in patterns.iter().enumerate() {
                    let field = format!("{}[{i}]", f(name));
                    if pattern.len() > limits.max_cache_pattern_bytes {
                        return Err(ServiceError::invalid(
                            field,
                            format!(
                                "{} bytes; at most {} (limits.max_cache_pattern_bytes)",
                                pattern.len(),
                                limits.max_cache_pattern_bytes
                            ),
                        ));
                    }
                    fullmatch(pattern, &field)?;
                }
            }
            let taylor_factors_dtype = match pb::FactorDtype::try_from(p.taylor_factors_dtype) {
                Ok(pb::FactorDtype::Unspecified | pb::FactorDtype::Bfloat16) => {
                    FactorDtype::BFloat16
                }
                Ok(pb::FactorDtype::Float16) => FactorDtype::Float16,
                Ok(pb::FactorDtype::Float32) => FactorDtype::Float32,
                Err(_) => {
                    return Err(ServiceError::invalid(
                        f("taylor_factors_dtype"),
                        "unknown dtype",
                    ))
                }
            };
            CacheConfig::TaylorSeer(TaylorSeerConfig {
                cache_interval,
                disable_cache_before_step: before,
                disable_cache_after_step: p.disable_cache_after_step,
                max_order,
                taylor_factors_dtype,
                skip_predict_identifiers: p.skip_predict_identifiers.clone(),
                cache_identifiers: p.cache_identifiers.clone(),
                use_lite_mode: p.use_lite_mode.unwrap_or(false),
            })
        }
        Strategy::FirstBlockCache(p) => CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
            threshold: finite_non_negative(
                p.threshold.unwrap_or(0.05),
                &format!("{field}.first_block_cache.threshold"),
            )?,
        }),
        Strategy::MagCache(p) => {
            let f = |name: &str| format!("{field}.mag_cache.{name}");
            let retention_ratio = p.retention_ratio.unwrap_or(0.2);
            if !(0.0..=1.0).contains(&retention_ratio) {
                return Err(ServiceError::invalid(
                    f("retention_ratio"),
                    "must be between 0 and 1",
                ));
            }
            // Unset: the generation's step count, resolved when a generation starts (diffusers'
            // constructor default, 28, would resample the ratios for any other step count).
            let num_inference_steps = p.num_inference_steps;
            // The ratios are resampled to this many steps when a generation starts.
            if num_inference_steps.is_some_and(|n| n == 0 || n > limits.max_steps) {
                return Err(ServiceError::invalid(
                    f("num_inference_steps"),
                    format!(
                        "must be between 1 and {} (limits.max_steps)",
                        limits.max_steps
                    ),
                ));
            }
            if p.mag_ratios.len() > limits.max_steps as usize {
                return Err(ServiceError::invalid(
                    f("mag_ratios"),
                    format!(
                        "{} ratios; at most one per step, {} (limits.max_steps)",
                        p.mag_ratios.len(),
                        limits.max_steps
                    ),
                ));
            }
            if p.mag_ratios.is_empty() && !p.calibrate {
                return Err(ServiceError::invalid(
                    f("mag_ratios"),
                    "required unless calibrate is set (run a calibration generation to obtain them)",
                ));
            }
            for (i, r) in p.mag_ratios.iter().enumerate() {
                if !r.is_finite() || *r <= 0.0 {
                    return Err(ServiceError::invalid(
                        format!("{}[{i}]", f("mag_ratios")),
                        "must be positive",
                    ));
                }
            }
            CacheConfig::MagCache(MagCacheConfig {
                threshold: finite_non_negative(p.threshold.unwrap_or(0.06), &f("threshold"))?,
                max_skip_steps: p.max_skip_steps.unwrap_or(3),
                retention_ratio,
                num_inference_steps,
                mag_ratios: p.mag_ratios.clone(),
                calibrate: p.calibrate,
            })
        }
    })
}

/// The fully resolved config, as reported back to clients.
pub fn cache_config_to_wire(config: &CacheConfig) -> pb::CacheConfig {
    let r = |t: TimestepRange| {
        Some(pb::FloatRange {
            min: t.min,
            max: t.max,
        })
    };
    let strategy = match config {
        CacheConfig::None => Strategy::None(pb::NoCache {}),
        CacheConfig::PyramidAttentionBroadcast(c) => {
            Strategy::PyramidAttentionBroadcast(pb::PyramidAttentionBroadcast {
                spatial_attention_block_skip_range: c.spatial_attention_block_skip_range,
                temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
                cross_attention_block_skip_range: c.cross_attention_block_skip_range,
                spatial_attention_timestep_skip_range: r(c.spatial_attention_timestep_skip_range),
                temporal_attention_timestep_skip_range: r(c.temporal_attention_timestep_skip_range),
                cross_attention_timestep_skip_range: r(c.cross_attention_timestep_skip_range),
            })
        }
        CacheConfig::FasterCache(c) => Strategy::FasterCache(pb::FasterCache {
            spatial_attention_block_skip_range: Some(c.spatial_attention_block_skip_range),
            temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
            spatial_attention_timestep_skip_range: r(c.spatial_attention_timestep_skip_range),
            temporal_attention_timestep_skip_range: r(c.temporal_attention_timestep_skip_range),
            low_frequency_weight_update_timestep_range: r(
                c.low_frequency_weight_update_timestep_range
            ),
            high_frequency_weight_update_timestep_range: r(
                c.high_frequency_weight_update_timestep_range
            ),
            alpha_low_frequency: Some(c.alpha_low_frequency),
            alpha_high_frequency: Some(c.alpha_high_frequency),
            unconditional_batch_skip_range: Some(c.unconditional_batch_skip_range),
            unconditional_batch_timestep_skip_range: r(c.unconditional_batch_timestep_skip_range),
            attention_weight: Some(pb::AttentionWeight {
                weight: Some(match c.attention_weight {
                    AttentionWeight::Constant(w) => pb::attention_weight::Weight::Constant(w),
                    AttentionWeight::Linear { start, end } => {
                        pb::attention_weight::Weight::Linear(pb::FloatRange {
                            min: start,
                            max: end,
                        })
                    }
                }),
            }),
            is_guidance_distilled: Some(c.is_guidance_distilled),
        }),
        CacheConfig::TaylorSeer(c) => Strategy::TaylorSeer(pb::TaylorSeer {
            cache_interval: Some(c.cache_interval),
            disable_cache_before_step: Some(c.disable_cache_before_step),
            disable_cache_after_step: c.disable_cache_after_step,
            max_order: Some(c.max_order),
            taylor_factors_dtype: match c.taylor_factors_dtype {
                FactorDtype::BFloat16 => pb::FactorDtype::Bfloat16,
                FactorDtype::Float16 => pb::FactorDtype::Float16,
                FactorDtype::Float32 => pb::FactorDtype::Float32,
            } as i32,
            skip_predict_identifiers: c.skip_predict_identifiers.clone(),
            cache_identifiers: c.cache_identifiers.clone(),
            use_lite_mode: Some(c.use_lite_mode),
        }),
        CacheConfig::FirstBlockCache(c) => Strategy::FirstBlockCache(pb::FirstBlockCache {
            threshold: Some(c.threshold),
        }),
        CacheConfig::MagCache(c) => Strategy::MagCache(pb::MagCache {
            threshold: Some(c.threshold),
            max_skip_steps: Some(c.max_skip_steps),
            retention_ratio: Some(c.retention_ratio),
            num_inference_steps: c.num_inference_steps,
            mag_ratios: c.mag_ratios.clone(),
            calibrate: c.calibrate,
        }),
    };
    pb::CacheConfig {
        strategy: Some(strategy),
    }
}

fn skip_range(value: Option<u32>, field: &str) -> ServiceResult<Option<u32>> {
    match value {
        Some(0) => Err(ServiceError::invalid(field, "must be at least 1")),
        v => Ok(v),
    }
}

fn range(
    value: Option<pb::FloatRange>,
    default: TimestepRange,
    field: &str,
) -> ServiceResult<TimestepRange> {
    let Some(r) = value else { return Ok(default) };
    if !r.min.is_finite() || !r.max.is_finite() || r.min >= r.max {
        return Err(ServiceError::invalid(field, "needs finite min < max"));
    }
    Ok(TimestepRange::new(r.min, r.max))
}

fn finite_non_negative(v: f32, field: &str) -> ServiceResult<f32> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(ServiceError::invalid(field, "must be a finite number >= 0"))
    }
}

fn positive(v: f32, field: &str) -> ServiceResult<f32> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(ServiceError::invalid(field, "must be a finite number > 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(strategy: Strategy) -> pb::CacheConfig {
        pb::CacheConfig {
            strategy: Some(strategy),
        }
    }

    fn invalid_field(c: pb::CacheConfig) -> String {
        match cache_config(Some(&c), "cache", &Limits::default()) {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn missing_means_none_and_defaults_resolve() {
        assert_eq!(
            cache_config(None, "cache", &Limits::default()).unwrap(),
            CacheConfig::None
        );
        let pab = cache_config(
            Some(&cfg(
                Strategy::PyramidAttentionBroadcast(Default::default()),
            )),
            "cache",
            &Limits::default(),
        )
        .unwrap();
        let CacheConfig::PyramidAttentionBroadcast(p) = &pab else {
            panic!()
        };
        assert_eq!(p.spatial_attention_block_skip_range, Some(2));
        assert_eq!(
            p.spatial_attention_timestep_skip_range,
            TimestepRange::new(100.0, 800.0)
        );
        // Resolved configs survive a round trip through the API unchanged.
        assert_eq!(
            cache_config(
                Some(&cache_config_to_wire(&pab)),
                "cache",
                &Limits::default()
            )
            .unwrap(),
            pab
        );
        let ts = cache_config(
            Some(&cfg(Strategy::TaylorSeer(Default::default()))),
            "cache",
            &Limits::default(),
        )
        .unwrap();
        let CacheConfig::TaylorSeer(t) = &ts else {
            panic!()
        };
        assert_eq!(
            (t.cache_interval, t.disable_cache_before_step, t.max_order),
            (5, 3, 1)
        );
        assert_eq!(
            cache_config(
                Some(&cache_config_to_wire(&ts)),
                "cache",
                &Limits::default()
            )
            .unwrap(),
            ts
        );
    }

    #[test]
    fn size_like_fields_are_bounded_by_the_limits() {
        let mag = |steps: Option<u32>, ratios: usize| {
            cfg(Strategy::MagCache(pb::MagCache {
                mag_ratios: vec![1.0; ratios],
                num_inference_steps: steps,
                ..Default::default()
            }))
        };
        // Once allocated ~16 GiB on the engine thread.
        assert_eq!(
            invalid_field(mag(Some(u32::MAX), 1)),
            "cache.mag_cache.num_inference_steps"
        );
        assert_eq!(invalid_field(mag(None, 1001)), "cache.mag_cache.mag_ratios");
        let limits = Limits::default();
        assert!(cache_config(Some(&mag(Some(1000), 1000)), "cache", &limits).is_ok());
        let taylor = |patterns: Vec<String>| {
            cfg(Strategy::TaylorSeer(pb::TaylorSeer {
                cache_identifiers: patterns,
                ..Default::default()
            }))
        };
        assert_eq!(
            invalid_field(taylor(vec!["attn".into(); 65])),
            "cache.taylor_seer.cache_identifiers"
        );
        assert_eq!(
            invalid_field(taylor(vec!["a".repeat(257)])),
            "cache.taylor_seer.cache_identifiers[0]"
        );
        // Short, but huge once compiled.
        assert_eq!(
            invalid_field(taylor(vec!["a{1000}{1000}".into()])),
            "cache.taylor_seer.cache_identifiers[0]"
        );
        assert!(cache_config(Some(&taylor(vec!["attn".into(); 64])), "cache", &limits).is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(
            invalid_field(cfg(Strategy::TaylorSeer(pb::TaylorSeer {
                cache_interval: Some(0),
                ..Default::default()
            }))),
            "cache.taylor_seer.cache_interval"
        );
        assert_eq!(
            invalid_field(cfg(Strategy::FirstBlockCache(pb::FirstBlockCache {
                threshold: Some(f32::NAN)
            }))),
            "cache.first_block_cache.threshold"
        );
        assert_eq!(
            invalid_field(cfg(Strategy::MagCache(pb::MagCache::default()))),
            "cache.mag_cache.mag_ratios"
        );
        assert_eq!(
            invalid_field(cfg(Strategy::FasterCache(pb::FasterCache {
                spatial_attention_timestep_skip_range: Some(pb::FloatRange { min: 5.0, max: 1.0 }),
                ..Default::default()
            }))),
            "cache.faster_cache.spatial_attention_timestep_skip_range"
        );
        assert_eq!(
            invalid_field(cfg(Strategy::TaylorSeer(pb::TaylorSeer {
                cache_identifiers: vec!["(".into()],
                ..Default::default()
            }))),
            "cache.taylor_seer.cache_identifiers[0]"
        );
    }
}

#[cfg(test)]
mod strategy_tests {
    use super::*;
    use crate::cache::{build_strategy, FLUX_MAG_RATIOS};

    #[test]
    fn every_kind_builds_with_empty_state_from_its_wire_defaults() {
        let mut configs: Vec<CacheConfig> = [
            Strategy::None(pb::NoCache {}),
            Strategy::PyramidAttentionBroadcast(Default::default()),
            Strategy::FasterCache(Default::default()),
            Strategy::TaylorSeer(Default::default()),
            Strategy::FirstBlockCache(Default::default()),
        ]
        .into_iter()
        .map(|s| {
            cache_config(
                Some(&pb::CacheConfig { strategy: Some(s) }),
                "cache",
                &Limits::default(),
            )
            .unwrap()
        })
        .collect();
        let mag = Strategy::MagCache(pb::MagCache {
            mag_ratios: FLUX_MAG_RATIOS.to_vec(),
            ..Default::default()
        });
        configs.push(
            cache_config(
                Some(&pb::CacheConfig {
                    strategy: Some(mag),
                }),
                "cache",
                &Limits::default(),
            )
            .unwrap(),
        );
        for config in &configs {
            let strategy = build_strategy(config, 8).unwrap();
            assert_eq!(strategy.kind(), config.kind());
            assert_eq!(strategy.state_bytes(), 0);
            assert_eq!(
                cache_kind(strategy.kind()) as i32,
                cache_config_to_wire(config)
                    .strategy
                    .map_or(0, |s| match s {
                        Strategy::None(_) => pb::CacheKind::None,
                        Strategy::PyramidAttentionBroadcast(_) =>
                            pb::CacheKind::PyramidAttentionBroadcast,
                        Strategy::FasterCache(_) => pb::CacheKind::FasterCache,
                        Strategy::TaylorSeer(_) => pb::CacheKind::TaylorSeer,
                        Strategy::FirstBlockCache(_) => pb::CacheKind::FirstBlockCache,
                        Strategy::MagCache(_) => pb::CacheKind::MagCache,
                    } as i32)
            );
        }
        assert_eq!(CacheKind::ALL.len(), configs.len());
    }
}
