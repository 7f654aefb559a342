//! Parity manifests' `cache` objects (the server's API field names, ranges as `[min, max]`) as
//! validated cache configs, through the server's own wire conversion.
use denoised_proto::v1 as pb;
use denoised_server::api::convert::cache::cache_config as wire_cache_config;
use denoised_server::cache::CacheConfig;
use denoised_server::config::Limits;
use serde_json::Value;

/// The API config for a manifest `cache` object, validated and defaulted by the server's own code.
pub fn cache_config(spec: &Value) -> CacheConfig {
    let obj = spec.as_object().expect("cache spec is an object");
    let kind = obj["kind"].as_str().expect("cache spec has a `kind`");
    let u32_ = |key: &str| obj.get(key).map(|v| v.as_u64().unwrap() as u32);
    let f32_ = |key: &str| obj.get(key).map(|v| v.as_f64().unwrap() as f32);
    let bool_ = |key: &str| obj.get(key).map(|v| v.as_bool().unwrap());
    let range = |key: &str| {
        obj.get(key).map(|v| pb::FloatRange {
            min: v[0].as_f64().unwrap() as f32,
            max: v[1].as_f64().unwrap() as f32,
        })
    };
    let list = |key: &str| -> Vec<String> {
        obj.get(key).map_or_else(Vec::new, |v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect()
        })
    };
    let known: &[&str] = match kind {
        "none" => &[],
        "pyramid_attention_broadcast" => &[
            "spatial_attention_block_skip_range",
            "spatial_attention_timestep_skip_range",
        ],
        "faster_cache" => &[
            "spatial_attention_block_skip_range",
            "spatial_attention_timestep_skip_range",
            "attention_weight",
            "is_guidance_distilled",
            "unconditional_batch_skip_range",
            "unconditional_batch_timestep_skip_range",
            "low_frequency_weight_update_timestep_range",
            "high_frequency_weight_update_timestep_range",
            "alpha_low_frequency",
            "alpha_high_frequency",
        ],
        "taylor_seer" => &[
            "cache_interval",
            "disable_cache_before_step",
            "disable_cache_after_step",
            "max_order",
            "taylor_factors_dtype",
            "use_lite_mode",
            "cache_identifiers",
            "skip_predict_identifiers",
        ],
        "first_block_cache" => &["threshold"],
        "mag_cache" => &[
            "threshold",
            "max_skip_steps",
            "retention_ratio",
            "num_inference_steps",
            "mag_ratios",
            "calibrate",
        ],
        other => panic!("unknown cache kind `{other}`"),
    };
    for key in obj.keys().filter(|k| *k != "kind") {
        assert!(
            known.contains(&key.as_str()),
            "cache spec: `{key}` is not handled for {kind}"
        );
    }
    use pb::cache_config::Strategy;
    let strategy = match kind {
        "none" => Strategy::None(pb::NoCache {}),
        "pyramid_attention_broadcast" => {
            Strategy::PyramidAttentionBroadcast(pb::PyramidAttentionBroadcast {
                spatial_attention_block_skip_range: u32_("spatial_attention_block_skip_range"),
                spatial_attention_timestep_skip_range: range(
                    "spatial_attention_timestep_skip_range",
                ),
                ..Default::default()
            })
        }
        "faster_cache" => Strategy::FasterCache(pb::FasterCache {
            spatial_attention_block_skip_range: u32_("spatial_attention_block_skip_range"),
            spatial_attention_timestep_skip_range: range("spatial_attention_timestep_skip_range"),
            attention_weight: obj.get("attention_weight").map(|w| pb::AttentionWeight {
                weight: Some(match w.get("linear") {
                    Some(l) => pb::attention_weight::Weight::Linear(pb::FloatRange {
                        min: l[0].as_f64().unwrap() as f32,
                        max: l[1].as_f64().unwrap() as f32,
                    }),
                    None => pb::attention_weight::Weight::Constant(w.as_f64().unwrap() as f32),
                }),
            }),
            is_guidance_distilled: bool_("is_guidance_distilled"),
            unconditional_batch_skip_range: u32_("unconditional_batch_skip_range"),
            unconditional_batch_timestep_skip_range: range(
                "unconditional_batch_timestep_skip_range",
            ),
            low_frequency_weight_update_timestep_range: range(
                "low_frequency_weight_update_timestep_range",
            ),
            high_frequency_weight_update_timestep_range: range(
                "high_frequency_weight_update_timestep_range",
            ),
            alpha_low_frequency: f32_("alpha_low_frequency"),
            alpha_high_frequency: f32_("alpha_high_frequency"),
            ..Default::default()
        }),
        "taylor_seer" => Strategy::TaylorSeer(pb::TaylorSeer {
            cache_interval: u32_("cache_interval"),
            disable_cache_before_step: u32_("disable_cache_before_step"),
            disable_cache_after_step: u32_("disable_cache_after_step"),
            max_order: u32_("max_order"),
            taylor_factors_dtype: match obj.get("taylor_factors_dtype").and_then(Value::as_str) {
                None => pb::FactorDtype::Unspecified,
                Some("float32") => pb::FactorDtype::Float32,
                Some("bfloat16") => pb::FactorDtype::Bfloat16,
                Some("float16") => pb::FactorDtype::Float16,
                Some(other) => panic!("unknown factor dtype `{other}`"),
            } as i32,
            use_lite_mode: bool_("use_lite_mode"),
            cache_identifiers: list("cache_identifiers"),
            skip_predict_identifiers: list("skip_predict_identifiers"),
        }),
        "first_block_cache" => Strategy::FirstBlockCache(pb::FirstBlockCache {
            threshold: f32_("threshold"),
        }),
        _ => Strategy::MagCache(pb::MagCache {
            threshold: f32_("threshold"),
            max_skip_steps: u32_("max_skip_steps"),
            retention_ratio: f32_("retention_ratio"),
            num_inference_steps: u32_("num_inference_steps"),
            mag_ratios: obj
                .get("mag_ratios")
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .unwrap_or_default(),
            calibrate: bool_("calibrate").unwrap_or(false),
        }),
    };
    let config = pb::CacheConfig {
        strategy: Some(strategy),
    };
    wire_cache_config(Some(&config), "cache", &Limits::default())
        .unwrap_or_else(|e| panic!("cache spec {spec}: {e}"))
}

/// Largest accepted difference of a calibrated magnitude ratio.
const RATIO_TOLERANCE: f64 = 1e-5;

/// What a cache case must show besides parity, given how much the cache changed the final latents
/// against no cache: a calibration run (MagCache) reports diffusers' ratios and changes nothing; a
/// documented no-op (`expect_no_change`) changes nothing; every other case was chosen so that the
/// cache changes the output.
pub fn outcome_failures(
    name: &str,
    case: &Value,
    calibrated: Option<&[f32]>,
    change: f64,
) -> Vec<String> {
    let mut failures = Vec::new();
    let no_change = case["expect_no_change"].as_bool().unwrap_or(false);
    match case.get("calibrated_mag_ratios").filter(|r| !r.is_null()) {
        Some(expected) => {
            let expected: Vec<f64> = serde_json::from_value(expected.clone()).unwrap();
            let got = calibrated.unwrap_or_default();
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            println!("{name}: calibrated ratios {got:?}, max|Δ| = {worst:.3e}");
            if got.len() != expected.len() || worst > RATIO_TOLERANCE {
                failures.push(format!(
                    "{name}: calibrated ratios {got:?}, diffusers {expected:?}"
                ));
            }
            if change != 0.0 {
                failures.push(format!(
                    "{name}: calibration changed the output by {change:e}"
                ));
            }
        }
        None if no_change && change != 0.0 => {
            failures.push(format!("{name}: expected no change, got {change:e}"))
        }
        None if !no_change && change < 1e-3 => failures.push(format!(
            "{name}: the cache changed the output by only {change:e}"
        )),
        None => {}
    }
    failures
}
