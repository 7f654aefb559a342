//! Cache strategies against no cache on one model, through the engine's own step loop (no gRPC):
//! wall time, speed-up, PSNR and max |Δ| of the final image vs. no cache, the estimated fraction
//! of transformer FLOPs skipped, and the peak bytes the cache held. Prints a Markdown table.
//!
//! `cargo run --release -p denoised-server --example cache_bench -- MODEL_DIR [steps] [size]
//! [max_sequence_length] [device]`
//!
//! MagCache needs magnitude ratios for the model and step count: the bench first runs a
//! calibration generation (as a user would through the API) and uses the ratios it returns.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use denoised_proto::v1 as pb;
use denoised_server::api::convert::cache::cache_config;
use denoised_server::cache::CacheConfig;
use denoised_server::dit::pipeline::AnyPipeline;
use denoised_server::dit::request::GenerationRequest;
use denoised_server::engine::device::{parse_device, parse_dtype};
use denoised_server::engine::run::Denoise;
use denoised_server::models::load_pipeline;
use pb::cache_config::Strategy;

const PROMPTS: [&str; 4] = [
    "a red circle at the top left on a blue background",
    "a yellow square in the center on a black background",
    "a green triangle at the bottom right on a white background",
    "a blue circle at the bottom left on a yellow background",
];

struct Run {
    rgb: Vec<u8>,
    time: Duration,
    flops_total: f64,
    flops_saved: f64,
    peak_state_bytes: u64,
    calibrated: Option<Vec<f32>>,
}

fn generate(pipeline: &dyn AnyPipeline, params: &GenerationRequest, config: &CacheConfig) -> Run {
    let started = Instant::now();
    let mut run = Denoise::start(pipeline, params, config.clone()).expect("generation starts");
    let mut peak = 0;
    while !run.progress(pipeline).is_done() {
        let report = run.step(pipeline).expect("step");
        peak = peak.max(report.state_bytes);
    }
    let frames = pipeline.decode(run.generation());
    let totals = run.totals();
    Run {
        rgb: frames.frames.into_iter().next().expect("one image"),
        time: started.elapsed(),
        flops_total: totals.flops_total,
        flops_saved: totals.flops_saved,
        peak_state_bytes: peak,
        calibrated: run.strategy().calibrated_mag_ratios(),
    }
}

/// The process's peak resident memory (`VmHWM`), as Linux reports it.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn psnr_and_max_delta(a: &[u8], b: &[u8]) -> (f64, u8) {
    let mut mse = 0.0;
    let mut max = 0u8;
    for (&x, &y) in a.iter().zip(b) {
        let d = x.abs_diff(y);
        max = max.max(d);
        mse += (d as f64).powi(2);
    }
    mse /= a.len() as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    };
    (psnr, max)
}

fn config(strategy: Strategy) -> CacheConfig {
    cache_config(
        Some(&pb::CacheConfig {
            strategy: Some(strategy),
        }),
        "cache",
    )
    .expect("valid config")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model: PathBuf = args
        .next()
        .expect("usage: cache_bench MODEL_DIR [steps] [size] [max_seq] [device]")
        .into();
    let steps: usize = args.next().map_or(28, |s| s.parse().expect("steps"));
    let size: usize = args.next().map_or(64, |s| s.parse().expect("size"));
    let max_sequence_length: usize = args
        .next()
        .map_or(32, |s| s.parse().expect("max_sequence_length"));
    let device = parse_device(&args.next().unwrap_or_else(|| "auto".into())).expect("device");
    let kind = parse_dtype("auto", device).expect("dtype");
    let _no_grad = tch::no_grad_guard();
    let loaded = Instant::now();
    let pipeline = load_pipeline(&model, device, kind).expect("model loads");
    let pipeline = pipeline.as_ref();
    println!(
        "model {} loaded in {:?} on {device:?} ({kind:?}), peak RSS {}",
        model.display(),
        loaded.elapsed(),
        peak_rss()
    );

    let params = |prompt: &str, seed: u64| GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        width: size,
        height: size,
        steps,
        guidance: 3.5,
        true_cfg_scale: 1.0,
        seed,
        max_sequence_length,
        num_frames: None,
        dynamic_cfg: false,
    };
    // Warm-up (allocator, first kernels), then MagCache calibration on the first prompt.
    generate(pipeline, &params(PROMPTS[0], 0), &CacheConfig::None);
    let calibration = generate(
        pipeline,
        &params(PROMPTS[0], 0),
        &config(Strategy::MagCache(pb::MagCache {
            calibrate: true,
            ..Default::default()
        })),
    );
    let mag_ratios = calibration.calibrated.expect("calibration returns ratios");

    let strategies: Vec<(&str, CacheConfig)> = vec![
        ("none", CacheConfig::None),
        (
            "pab (defaults)",
            config(Strategy::PyramidAttentionBroadcast(Default::default())),
        ),
        (
            "fastercache (defaults)",
            config(Strategy::FasterCache(Default::default())),
        ),
        (
            "taylorseer (defaults)",
            config(Strategy::TaylorSeer(Default::default())),
        ),
        (
            "taylorseer lite",
            config(Strategy::TaylorSeer(pb::TaylorSeer {
                use_lite_mode: Some(true),
                ..Default::default()
            })),
        ),
        (
            "fbc (threshold 0.05)",
            config(Strategy::FirstBlockCache(Default::default())),
        ),
        (
            "fbc (threshold 0.2)",
            config(Strategy::FirstBlockCache(pb::FirstBlockCache {
                threshold: Some(0.2),
            })),
        ),
        (
            "magcache (calibrated, defaults)",
            config(Strategy::MagCache(pb::MagCache {
                mag_ratios: mag_ratios.clone(),
                num_inference_steps: Some(steps as u32),
                ..Default::default()
            })),
        ),
    ];

    // Strategies run interleaved, prompt by prompt, `REPEATS` times; each time is the fastest of
    // its repeats, which keeps other load on the machine out of the comparison.
    const REPEATS: usize = 3;
    let mut runs: Vec<Vec<Run>> = strategies.iter().map(|_| Vec::new()).collect();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let mut best: Vec<Option<Run>> = strategies.iter().map(|_| None).collect();
        for _ in 0..REPEATS {
            for ((_, cfg), slot) in strategies.iter().zip(best.iter_mut()) {
                let run = generate(pipeline, &params(prompt, i as u64), cfg);
                if slot.as_ref().is_none_or(|b| run.time < b.time) {
                    *slot = Some(run);
                }
            }
        }
        for (all, run) in runs.iter_mut().zip(best) {
            all.push(run.expect("at least one repeat"));
        }
    }
    let baseline = &runs[0];
    let base_time: Duration = baseline.iter().map(|r| r.time).sum();
    println!(
        "\n{size}x{size}, {steps} steps, {} prompts, {device:?}\n",
        PROMPTS.len()
    );
    println!("| strategy | wall time | speed-up | PSNR vs none (dB) | max abs diff | transformer compute skipped | peak cache memory |");
    println!("|---|---|---|---|---|---|---|");
    for ((name, _), runs) in strategies.iter().zip(&runs) {
        let time: Duration = runs.iter().map(|r| r.time).sum();
        let (mut psnr_sum, mut max_delta) = (0.0, 0u8);
        for (run, base) in runs.iter().zip(baseline) {
            let (psnr, max) = psnr_and_max_delta(&run.rgb, &base.rgb);
            psnr_sum += psnr.min(99.0);
            max_delta = max_delta.max(max);
        }
        let total: f64 = runs.iter().map(|r| r.flops_total).sum();
        let saved: f64 = runs.iter().map(|r| r.flops_saved).sum();
        let peak = runs.iter().map(|r| r.peak_state_bytes).max().unwrap_or(0);
        println!(
            "| {name} | {:.0} ms | {:.2}x | {:.1} | {max_delta} | {:.0}% | {:.1} KiB |",
            time.as_secs_f64() * 1000.0 / runs.len() as f64,
            base_time.as_secs_f64() / time.as_secs_f64(),
            psnr_sum / runs.len() as f64,
            100.0 * saved / total.max(1.0),
            peak as f64 / 1024.0,
        );
    }
    println!("\nmagcache ratios (calibrated): {mag_ratios:?}");
    println!("peak RSS of the whole run: {}", peak_rss());
}
