//! Parity of the whole CogVideoX pipeline, with and without each cache strategy, with diffusers'
//! `CogVideoXPipeline` on the tiny random pipelines `tests/parity/make_cogvideox_pipeline_reference.py`
//! writes (fp32, CPU), through the engine's own step loop ([`Denoise`], as the server runs it):
//! initial noise bit for bit, latents after every step and final latents within 1e-4, the decoded
//! video within one 8-bit level, and for caches the per-step numbers of computed blocks and
//! attention modules (and, for FasterCache, the steps whose unconditional half was skipped).
//!
//! Data: `$DENOISED_PARITY_DATA/cogvideox_pipeline` or
//! `<repo>/tests/parity/data/cogvideox_pipeline`; generate it with `make parity-data`. Missing
//! data fails the tests. Run with `--nocapture` to see the measured differences.
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
use denoised_server::engine::run::Denoise;
use denoised_server::models::load_pipeline;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |rust − diffusers| of latents.
const LATENT_TOLERANCE: f64 = 1e-4;
/// Largest accepted difference of an 8-bit video channel.
const VIDEO_TOLERANCE: f64 = 1.0;

fn data_dir() -> PathBuf {
    let root = std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/data"));
    let dir = root.join("cogvideox_pipeline");
    assert!(
        dir.join("manifest.json").is_file(),
        "parity data missing: no {}; run `make parity-data` (or `python \
         tests/parity/make_cogvideox_pipeline_reference.py --out tests/parity/data/cogvideox_pipeline`)",
        dir.join("manifest.json").display()
    );
    dir
}

fn manifest() -> Value {
    let path = data_dir().join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reference(case: &Value) -> HashMap<String, Tensor> {
    let path = data_dir().join(case["reference"].as_str().unwrap());
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference has no `{key}`"))
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
        guidance: num("guidance_scale") as f32,
        true_cfg_scale: 1.0,
        seed: case["seed"].as_u64().unwrap(),
        max_sequence_length: num("max_sequence_length") as usize,
        num_frames: Some(num("num_frames") as usize),
        dynamic_cfg: case["use_dynamic_cfg"].as_bool().unwrap(),
    }
}

/// What one generation did.
struct Run {
    noise: Tensor,
    /// Latents after each step.
    steps: Vec<Tensor>,
    /// Per step: computed blocks and attention modules, and the CFG halves computed.
    decisions: Vec<[u32; 2]>,
    halves: Vec<u32>,
    calibrated: Option<Vec<f32>>,
    run: Denoise,
}

fn generate(pipeline: &dyn AnyPipeline, case: &Value, cache: CacheConfig) -> Run {
    let mut run = Denoise::start(pipeline, &request(case), cache)
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    let noise = pipeline.latents(run.generation());
    let (mut steps, mut decisions, mut halves) = (Vec::new(), Vec::new(), Vec::new());
    while !run.progress(pipeline).is_done() {
        let report = run.step(pipeline).unwrap();
        let s = report.stats;
        decisions.push([s.blocks.computed, s.attention.computed]);
        halves.push(s.forwards.computed);
        steps.push(pipeline.latents(run.generation()));
    }
    Run {
        noise,
        steps,
        decisions,
        halves,
        calibrated: run.strategy().calibrated_mag_ratios(),
        run,
    }
}

/// Every pipeline, loaded once.
fn pipelines() -> HashMap<String, Box<dyn AnyPipeline>> {
    manifest()["models"]
        .as_array()
        .expect("manifest: no models")
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap().to_owned();
            let dir = data_dir().join(m["dir"].as_str().unwrap());
            let pipeline = load_pipeline(&dir, Device::Cpu, Kind::Float)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, pipeline)
        })
        .collect()
}

fn cases(cached: bool, prefixes: &[&str]) -> Vec<Value> {
    let cases: Vec<Value> = manifest()["cases"]
        .as_array()
        .expect("manifest: no cases")
        .iter()
        .filter(|c| c["cache"].is_null() != cached)
        .filter(|c| {
            prefixes.is_empty()
                || prefixes
                    .iter()
                    .any(|p| c["name"].as_str().unwrap().starts_with(p))
        })
        .cloned()
        .collect();
    assert!(!cases.is_empty(), "no case for {prefixes:?}");
    cases
}

#[test]
fn pipeline_matches_diffusers() {
    let _guard = tch::no_grad_guard();
    let pipelines = pipelines();
    for case in cases(false, &[]) {
        let name = case["name"].as_str().unwrap();
        let pipeline = pipelines[case["model"].as_str().unwrap()].as_ref();
        let r = reference(&case);
        let run = generate(pipeline, &case, CacheConfig::None);
        // The seeded noise is exactly torch.Generator("cpu").manual_seed(seed)'s.
        assert_eq!(
            max_abs_diff(&run.noise, get(&r, "noise")),
            0.0,
            "{name}: initial noise"
        );
        let mut worst = 0f64;
        for (i, latents) in run.steps.iter().enumerate() {
            let d = max_abs_diff(latents, get(&r, &format!("step{i}")));
            assert!(
                d <= LATENT_TOLERANCE,
                "{name}: latents after step {i} differ by {d:e}"
            );
            worst = worst.max(d);
        }
        let latents_diff = max_abs_diff(&run.steps[run.steps.len() - 1], get(&r, "latents"));
        let video = pipeline.decode(run.run.generation());
        let expected = get(&r, "video"); // [F, H, W, 3] u8
        let (f, h, w, _) = expected.size4().unwrap();
        assert_eq!(
            (
                video.frames.len() as i64,
                video.height as i64,
                video.width as i64
            ),
            (f, h, w),
            "{name}: video shape"
        );
        let ours = Tensor::from_slice(&video.frames.concat()).view([f, h, w, 3]);
        let video_diff = max_abs_diff(&ours, expected);
        println!(
            "pipeline {name}: final latents max|Δ| = {latents_diff:.3e} (worst step {worst:.3e}), \
             video max|Δ| = {video_diff} levels over {f} frames"
        );
        assert!(latents_diff <= LATENT_TOLERANCE, "{name}: final latents");
        assert!(
            video_diff <= VIDEO_TOLERANCE,
            "{name}: video differs by {video_diff}"
        );
        // CFG runs both halves in one forward; without it, one.
        let cfg = case["guidance_scale"].as_f64().unwrap() > 1.0;
        assert!(run.halves.iter().all(|&h| h == 1 + cfg as u32), "{name}");
    }
}

/// Runs the cache cases starting with one of `prefixes`; all must match diffusers.
fn check_caches(prefixes: &[&str]) {
    let _guard = tch::no_grad_guard();
    let pipelines = pipelines();
    let mut failures = Vec::new();
    for case in cases(true, prefixes) {
        let name = case["name"].as_str().unwrap();
        let pipeline = pipelines[case["model"].as_str().unwrap()].as_ref();
        let r = reference(&case);
        let run = generate(pipeline, &case, cache_config(&case["cache"]));
        let uncached = generate(pipeline, &case, CacheConfig::None);
        let last = &run.steps[run.steps.len() - 1];
        let diff = max_abs_diff(last, get(&r, "latents"));
        let change = max_abs_diff(last, &uncached.steps[uncached.steps.len() - 1]);
        println!(
            "{name}: max|Δ| vs diffusers = {diff:.3e}; the cache changed the latents by \
             {change:.3e} (diffusers: {:.3e}); halves computed per step {:?}",
            case["uncached_change"].as_f64().unwrap_or(f64::NAN),
            run.halves
        );
        if diff > LATENT_TOLERANCE {
            failures.push(format!("{name}: final latents differ by {diff:e}"));
        }
        let expected: Vec<[u32; 2]> = serde_json::from_value(case["decisions"].clone()).unwrap();
        if run.decisions != expected {
            failures.push(format!(
                "{name}: [blocks, attention] computed per step {:?}, diffusers {expected:?}",
                run.decisions
            ));
        }
        let batches: Vec<u32> = serde_json::from_value(case["batch_per_step"].clone()).unwrap();
        if run.halves != batches {
            failures.push(format!(
                "{name}: CFG halves computed per step {:?}, diffusers ran batches {batches:?}",
                run.halves
            ));
        }
        failures.extend(cache_spec::outcome_failures(
            name,
            &case,
            run.calibrated.as_deref(),
            change,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn pyramid_attention_broadcast_matches_diffusers() {
    check_caches(&["pab_"]);
}

#[test]
fn faster_cache_skips_the_unconditional_half_as_diffusers() {
    check_caches(&["faster_cache_"]);
}

#[test]
fn first_block_and_mag_cache_match_diffusers() {
    check_caches(&["fbc", "mag_"]);
}

#[test]
fn taylor_seer_matches_diffusers() {
    check_caches(&["taylor_seer_"]);
}

#[test]
fn vae_tiling_is_a_video_option() {
    let tiled = denoised_server::models::LoadOptions { vae_tiling: true };
    let dir = data_dir().join("tiny_2b");
    // Frames within one tile decode exactly as untiled (diffusers tiles only larger latents).
    let plain = load_pipeline(&dir, Device::Cpu, Kind::Float).unwrap();
    let with_tiling =
        denoised_server::models::load_pipeline_with(&dir, Device::Cpu, Kind::Float, tiled).unwrap();
    let case = cases(false, &["2b_ddim"]).remove(0);
    let _guard = tch::no_grad_guard();
    let a = generate(plain.as_ref(), &case, CacheConfig::None);
    let b = generate(with_tiling.as_ref(), &case, CacheConfig::None);
    assert_eq!(
        plain.decode(a.run.generation()),
        with_tiling.decode(b.run.generation())
    );
    // FLUX has no tiled decode: the option is refused naming it.
    let flux = data_dir().join("../schnell_like");
    let err = denoised_server::models::load_pipeline_with(&flux, Device::Cpu, Kind::Float, tiled)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("vae_tiling"), "{err}");
}
