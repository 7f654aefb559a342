//! Parity of the step caches with diffusers' own (`enable_cache`), through the engine's own step
//! loop ([`Denoise`], as the server runs it) on the tiny random pipelines (fp32, CPU): final
//! latents within 1e-4 and, per step, the same numbers of computed blocks and attention modules. Cases come from `tests/parity/make_cache_reference.py`
//! (diffusers' docs/tests configs and others; switches and resets between steps; MagCache
//! calibration). Where the server's documented semantics differ from diffusers, the manifest's
//! `reference` says what a case is compared with instead: per-branch PAB / FasterCache state under
//! true CFG against diffusers' code arranged to follow ours (`per_branch`); FasterCache's
//! unconditional reuse with sequential CFG, which diffusers cannot run, only against a Python
//! re-implementation of our own algorithm (`self_consistency`: a self-consistency check, not
//! parity; the batched-CFG unconditional skip is compared with diffusers itself on CogVideoX in
//! `parity_cogvideox_pipeline.rs`).
//! Every case also checks the accounting: the hit ratio is the saved share of the estimated FLOPs,
//! above 0 whenever the cache left a module unrun, and 0 without a cache.
//!
//! Data: `$DENOISED_PARITY_DATA/cache` or `<repo>/tests/parity/data/cache`; generate it with
//! `make parity-data`. Missing data fails the tests. Run with `--nocapture` to see, per case, the
//! difference to diffusers and how much the cache changed the output against no cache.
#[path = "common/cache_spec.rs"]
mod cache_spec;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cache_spec::cache_config;
use common::max_abs_diff;
use denoised_server::cache::CacheConfig;
use denoised_server::dit::pipeline::AnyPipeline;
use denoised_server::dit::request::GenerationRequest;
use denoised_server::engine::run::{CacheChange, Denoise, Totals};
use denoised_server::models::load_pipeline;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |rust − diffusers| of the final latents.
const TOLERANCE: f64 = 1e-4;

fn data_dir() -> PathBuf {
    std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/data"))
}

/// The cache cases whose name starts with one of `prefixes`.
fn cases(prefixes: &[&str]) -> Vec<Value> {
    let path = data_dir().join("cache").join("manifest.json");
    assert!(
        path.is_file(),
        "cache parity data missing: no {}; run `make parity-data` \
         (or `python tests/parity/make_cache_reference.py --data tests/parity/data`)",
        path.display()
    );
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases: Vec<Value> = manifest["cases"]
        .as_array()
        .expect("cache manifest: no `cases`")
        .iter()
        .filter(|c| {
            prefixes
                .iter()
                .any(|p| c["name"].as_str().unwrap().starts_with(p))
        })
        .cloned()
        .collect();
    assert!(
        !cases.is_empty(),
        "{}: no case starts with {prefixes:?}",
        path.display()
    );
    cases
}

fn request(case: &Value) -> GenerationRequest {
    let num = |key: &str| {
        case[key]
            .as_f64()
            .unwrap_or_else(|| panic!("case has no `{key}`"))
    };
    GenerationRequest {
        prompt: case["prompt"].as_str().unwrap().to_owned(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_owned),
        width: num("width") as usize,
        height: num("height") as usize,
        steps: num("steps") as usize,
        guidance: num("guidance") as f32,
        true_cfg_scale: num("true_cfg_scale") as f32,
        seed: case["seed"].as_u64().unwrap(),
        max_sequence_length: num("max_sequence_length") as usize,
        num_frames: None,
        dynamic_cfg: false,
    }
}

/// What one generation did.
struct Run {
    latents: Tensor,
    /// Per step: computed blocks and attention modules, over the step's CFG forwards.
    decisions: Vec<[u32; 2]>,
    /// Forwards, blocks and attention modules that did not run, over all steps.
    not_run: u32,
    totals: Totals,
    calibrated: Option<Vec<f32>>,
}

/// Runs a case's generation: with its cache (switched / reset before the steps the case names, as
/// a client's SetCacheStrategy / ResetCache takes effect in the engine), or with none at all.
fn generate(pipeline: &dyn AnyPipeline, case: &Value, cached: bool) -> Run {
    let initial = if cached {
        cache_config(&case["cache"])
    } else {
        CacheConfig::None
    };
    let mut changes: Vec<(usize, CacheChange)> = Vec::new();
    if cached {
        if let Some(switch) = case.get("switch").filter(|s| !s.is_null()) {
            changes.push((
                switch["step"].as_u64().unwrap() as usize,
                CacheChange::Switch(cache_config(&switch["cache"])),
            ));
        }
        if let Some(step) = case.get("reset").and_then(Value::as_u64) {
            changes.push((step as usize, CacheChange::Reset));
        }
    }
    let mut run = Denoise::start(pipeline, &request(case), initial).unwrap();
    let (mut decisions, mut not_run) = (Vec::new(), 0);
    while !run.progress(pipeline).is_done() {
        let step = run.progress(pipeline).step_index;
        if let Some((_, change)) = changes.iter().find(|(at, _)| *at == step) {
            run.change_cache(change.clone()).unwrap();
        }
        let report = run.step(pipeline).unwrap();
        let s = &report.stats;
        decisions.push([s.blocks.computed, s.attention.computed]);
        not_run += s.forwards.not_computed() + s.blocks.not_computed() + s.attention.not_computed();
    }
    Run {
        latents: pipeline.latents(run.generation()),
        decisions,
        not_run,
        totals: *run.totals(),
        calibrated: run.strategy().calibrated_mag_ratios(),
    }
}

/// What a case's output is compared with, as the test output names it.
fn reference_label(case: &Value) -> &str {
    match case["reference"].as_str().unwrap_or("diffusers") {
        "per_branch" => "diffusers, arranged per CFG branch",
        "self_consistency" => {
            "SELF-CONSISTENCY CHECK, not diffusers: the reference re-implements our own algorithm \
             in Python; the batched-CFG uncond skip is checked against diffusers on CogVideoX"
        }
        other => other,
    }
}

/// Runs every case starting with one of `prefixes`; all must match their reference.
fn check(prefixes: &[&str]) {
    let _guard = tch::no_grad_guard();
    let mut pipelines: HashMap<String, Box<dyn AnyPipeline>> = HashMap::new();
    let mut failures = Vec::new();
    for case in cases(prefixes) {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let pipeline = pipelines.entry(model.to_owned()).or_insert_with(|| {
            load_pipeline(&data_dir().join(model), Device::Cpu, Kind::Float)
                .unwrap_or_else(|e| panic!("{model}: {e}"))
        });
        let run = generate(pipeline.as_ref(), &case, true);
        let uncached = generate(pipeline.as_ref(), &case, false);
        let path = data_dir()
            .join("cache")
            .join(case["output"].as_str().unwrap());
        let expected = Tensor::read_safetensors(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .find(|(k, _)| k == "latents")
            .unwrap_or_else(|| panic!("{}: no `latents`", path.display()))
            .1;
        let diff = max_abs_diff(&run.latents, &expected);
        let change = max_abs_diff(&run.latents, &uncached.latents);
        let reference = reference_label(&case);
        println!(
            "{name} ({reference}): max|Δ| vs reference = {diff:.3e}; \
             cache changed the latents by {change:.3e} (reference: {:.3e})",
            case["uncached_change"].as_f64().unwrap_or(f64::NAN)
        );
        if diff > TOLERANCE {
            failures.push(format!("{name}: final latents differ by {diff:e}"));
        }
        let expected_decisions: Vec<[u32; 2]> =
            serde_json::from_value(case["decisions"].clone()).unwrap();
        if run.decisions != expected_decisions {
            failures.push(format!(
                "{name}: [blocks, attention] computed per step {:?}, \
                 reference {expected_decisions:?}",
                run.decisions
            ));
        }
        failures.extend(cache_spec::outcome_failures(
            name,
            &case,
            run.calibrated.as_deref(),
            change,
        ));
        failures.extend(accounting_failures(name, &run, &uncached));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The hit ratio is the saved share of the estimated FLOPs: above 0 whenever the cache left a
/// module unrun (also when it only reused or predicted attention), 0 without a cache.
fn accounting_failures(name: &str, run: &Run, uncached: &Run) -> Vec<String> {
    let (t, u) = (&run.totals, &uncached.totals);
    let ratio = t.cache_hit_ratio();
    println!(
        "{name}: cache hit ratio {ratio:.4} (FLOPs saved {:.4e} of {:.4e}; {} modules not run)",
        t.flops_saved, t.flops_total, run.not_run
    );
    let mut failures = Vec::new();
    if ratio != (t.flops_saved / t.flops_total) as f32 {
        failures.push(format!(
            "{name}: hit ratio {ratio} is not FLOPs saved / total"
        ));
    }
    if (run.not_run > 0) != (ratio > 0.0) {
        failures.push(format!(
            "{name}: hit ratio {ratio} with {} modules not run",
            run.not_run
        ));
    }
    if (u.cache_hit_ratio(), u.flops_saved, uncached.not_run) != (0.0, 0.0, 0) {
        failures.push(format!(
            "{name}: without a cache, hit ratio {} and {:e} FLOPs saved",
            u.cache_hit_ratio(),
            u.flops_saved
        ));
    }
    if u.flops_total != t.flops_total {
        failures.push(format!(
            "{name}: FLOPs in total {:e} with the cache, {:e} without",
            t.flops_total, u.flops_total
        ));
    }
    failures
}

#[test]
fn pyramid_attention_broadcast_matches_diffusers() {
    check(&["pab_"]);
}

#[test]
fn faster_cache_matches_diffusers() {
    check(&["faster_cache_"]);
}

#[test]
fn taylor_seer_matches_diffusers() {
    check(&["taylor_seer_"]);
}

#[test]
fn first_block_cache_matches_diffusers() {
    check(&["fbc_"]);
}

#[test]
fn mag_cache_matches_diffusers() {
    check(&["mag_"]);
}

#[test]
fn switches_and_resets_match_diffusers() {
    check(&["switch_", "reset_"]);
}

/// MagCache without `num_inference_steps` runs for the generation's step count: on an 8-step
/// generation the ratios are not resampled (to diffusers' constructor default, 28), so it decides
/// as with an explicit 8, and the config the generation reports says 8. Mid-generation switches
/// resolve it the same way.
#[test]
fn mag_cache_defaults_to_the_generations_step_count() {
    let _guard = tch::no_grad_guard();
    let case = cases(&["mag_tests_flat"]).remove(0);
    let pipeline = load_pipeline(
        &data_dir().join(case["model"].as_str().unwrap()),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let pipeline = pipeline.as_ref();
    let request = GenerationRequest {
        steps: 8,
        ..request(&case)
    };
    let mag = |steps: Option<u32>| {
        let mut spec = serde_json::json!({"kind": "mag_cache", "mag_ratios": vec![1.0; 8]});
        if let Some(n) = steps {
            spec["num_inference_steps"] = n.into();
        }
        cache_config(&spec)
    };
    let run = |config: CacheConfig| {
        let mut run = Denoise::start(pipeline, &request, config).unwrap();
        let mut blocks = Vec::new();
        while !run.progress(pipeline).is_done() {
            blocks.push(run.step(pipeline).unwrap().stats.blocks.computed);
        }
        (blocks, run.config().clone())
    };
    let (unset, reported) = run(mag(None));
    assert_eq!(unset, run(mag(Some(8))).0);
    // The default makes a difference: 28 retains 6 steps, not 2, and skips from the 7th.
    assert_ne!(unset, run(mag(Some(28))).0);
    let CacheConfig::MagCache(reported) = reported else {
        panic!("{reported:?}")
    };
    assert_eq!(reported.num_inference_steps, Some(8));

    let mut switched = Denoise::start(pipeline, &request, CacheConfig::None).unwrap();
    switched
        .change_cache(CacheChange::Switch(mag(None)))
        .unwrap();
    let CacheConfig::MagCache(c) = switched.config() else {
        panic!("{:?}", switched.config())
    };
    assert_eq!(c.num_inference_steps, Some(8));
}
