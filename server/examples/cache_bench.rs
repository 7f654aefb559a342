//! Cache strategies against no cache on one model, through the engine's own step loop (no gRPC):
//! wall time, speed-up, PSNR and max |Δ| of the final image (every frame of a video) vs. no cache,
//! the estimated fraction of transformer FLOPs skipped, the fractions of attention calls and of
//! unconditional CFG halves not computed, and the peak bytes the cache held. Prints a Markdown
//! table.
//!
//! `cargo run --release -p denoised-server --example cache_bench -- MODEL_DIR [steps] [size]
//! [max_sequence_length] [device] [--repeats N]`
//!
//! Strategies run in interleaved rounds (every strategy on a prompt, then the next prompt, then
//! the next round; `--repeats` rounds, default 5 for images and 2 for videos); times and
//! speed-ups are medians over prompt x round with their interquartile range.
//!
//! Image models (FLUX) run every strategy with its defaults on four prompts; video models
//! (CogVideoX, at their default size and frame count unless `size` is given) run the diffusers
//! guide's CogVideoX configurations of PAB and FasterCache on one prompt, as they are slower.
//!
//! MagCache needs magnitude ratios for the model and step count: the bench first runs a
//! calibration generation (as a user would through the API) and uses the ratios it returns.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use denoised_proto::v1 as pb;
use denoised_server::api::convert::cache::cache_config;
use denoised_server::cache::CacheConfig;
use denoised_server::config::Limits;
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
    /// Every frame's RGB8 pixels, concatenated.
    rgb: Vec<u8>,
    time: Duration,
    flops_total: f64,
    flops_saved: f64,
    /// Attention calls, and those not computed.
    attention: (u32, u32),
    /// CFG halves (forwards), and those rebuilt instead of computed.
    forwards: (u32, u32),
    peak_state_bytes: u64,
    calibrated: Option<Vec<f32>>,
}

fn generate(pipeline: &dyn AnyPipeline, params: &GenerationRequest, config: &CacheConfig) -> Run {
    let started = Instant::now();
    let mut run = Denoise::start(pipeline, params, config.clone()).expect("generation starts");
    let (mut peak, mut attention, mut forwards) = (0, (0, 0), (0, 0));
    while !run.progress(pipeline).is_done() {
        let report = run.step(pipeline).expect("step");
        peak = peak.max(report.state_bytes);
        let s = report.stats;
        attention.0 += s.attention.total();
        attention.1 += s.attention.not_computed();
        forwards.0 += s.forwards.total();
        forwards.1 += s.forwards.not_computed();
    }
    let frames = pipeline.decode(run.generation());
    let totals = run.totals();
    Run {
        rgb: frames.frames.concat(),
        time: started.elapsed(),
        flops_total: totals.flops_total,
        flops_saved: totals.flops_saved,
        attention,
        forwards,
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

/// 25th percentile, median and 75th percentile (linear interpolation).
fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let x = q * (v.len() - 1) as f64;
        let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
    };
    (at(0.25), at(0.5), at(0.75))
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
        &Limits::default(),
    )
    .expect("valid config")
}

/// The share `part / whole` in percent.
fn percent((whole, part): (u32, u32)) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// Every strategy with its defaults (MagCache with ratios from a calibration run first, as a user
/// would obtain them through the API).
fn image_strategies(
    pipeline: &dyn AnyPipeline,
    calibration: &GenerationRequest,
    steps: usize,
) -> Vec<(&'static str, CacheConfig)> {
    let calibrated = generate(
        pipeline,
        calibration,
        &config(Strategy::MagCache(pb::MagCache {
            calibrate: true,
            ..Default::default()
        })),
    );
    let mag_ratios = calibrated.calibrated.expect("calibration returns ratios");
    println!("magcache ratios (calibrated): {mag_ratios:?}");
    vec![
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
                mag_ratios,
                num_inference_steps: Some(steps as u32),
                ..Default::default()
            })),
        ),
    ]
}

/// The diffusers caching guide's CogVideoX configurations.
fn video_strategies() -> Vec<(&'static str, CacheConfig)> {
    let range = |min: f32, max: f32| Some(pb::FloatRange { min, max });
    vec![
        ("none", CacheConfig::None),
        (
            "pab (guide: 2, (100, 800))",
            config(Strategy::PyramidAttentionBroadcast(
                pb::PyramidAttentionBroadcast {
                    spatial_attention_block_skip_range: Some(2),
                    spatial_attention_timestep_skip_range: range(100.0, 800.0),
                    ..Default::default()
                },
            )),
        ),
        (
            "fastercache (guide: 2, (-1, 681), w 0.3, uncond 5, (-1, 781))",
            config(Strategy::FasterCache(pb::FasterCache {
                spatial_attention_block_skip_range: Some(2),
                spatial_attention_timestep_skip_range: range(-1.0, 681.0),
                attention_weight: Some(pb::AttentionWeight {
                    weight: Some(pb::attention_weight::Weight::Constant(0.3)),
                }),
                unconditional_batch_skip_range: Some(5),
                unconditional_batch_timestep_skip_range: range(-1.0, 781.0),
                ..Default::default()
            })),
        ),
    ]
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: Option<usize> = args.iter().position(|a| a == "--repeats").map(|i| {
        let n = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--repeats N");
        args.drain(i..i + 2);
        n
    });
    let mut args = args.into_iter();
    let model: PathBuf = args
        .next()
        .expect("usage: cache_bench MODEL_DIR [steps] [size] [max_seq] [device] [--repeats N]")
        .into();
    let steps: Option<usize> = args.next().map(|s| s.parse().expect("steps"));
    let size: Option<usize> = args.next().map(|s| s.parse().expect("size"));
    let max_sequence_length: Option<usize> =
        args.next().map(|s| s.parse().expect("max_sequence_length"));
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
    let card = pipeline.card().clone();
    // denoised.json's serving defaults, as the server applies them.
    let defaults: serde_json::Value = std::fs::read_to_string(model.join("denoised.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let default =
        |key: &str, card: u32| defaults[key].as_u64().map_or(card as usize, |v| v as usize);
    let video = card.video;
    let steps = steps.unwrap_or_else(|| match video {
        Some(_) => default("steps", card.default_steps),
        None => 28,
    });
    let (width, height) = match (size, video) {
        (Some(s), _) => (s, s),
        (None, Some(_)) => (
            default("width", card.default_width),
            default("height", card.default_height),
        ),
        (None, None) => (64, 64),
    };
    let max_sequence_length = max_sequence_length.unwrap_or(match video {
        Some(_) => card.max_sequence_length,
        None => 32,
    });
    let prompts: &[&str] = if video.is_some() {
        &PROMPTS[..1]
    } else {
        &PROMPTS
    };
    let params = |prompt: &str, seed: u64| GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        width,
        height,
        steps,
        guidance: if video.is_some() { 6.0 } else { 3.5 },
        true_cfg_scale: 1.0,
        seed,
        max_sequence_length,
        num_frames: video.map(|v| v.default_frames as usize),
        dynamic_cfg: false,
    };
    let repeats = repeats
        .unwrap_or(if video.is_some() { 2 } else { 5 })
        .max(1);
    // Warm-up (allocator, first kernels).
    generate(pipeline, &params(prompts[0], 0), &CacheConfig::None);
    let strategies = match video {
        Some(_) => video_strategies(),
        None => image_strategies(pipeline, &params(PROMPTS[0], 0), steps),
    };
    // Rounds interleave the strategies (A B C … per prompt, then again), so that load from other
    // processes and thermal drift fall on every strategy alike; each (prompt, round) pair gives
    // one speed-up ratio against no cache, and the table reports medians with their spread.
    let mut runs: Vec<Vec<Run>> = strategies.iter().map(|_| Vec::new()).collect();
    let mut times: Vec<Vec<Vec<Duration>>> = strategies
        .iter()
        .map(|_| vec![Vec::new(); prompts.len()])
        .collect();
    for round in 0..repeats {
        for (i, prompt) in prompts.iter().enumerate() {
            for (s, (_, cfg)) in strategies.iter().enumerate() {
                let run = generate(pipeline, &params(prompt, i as u64), cfg);
                times[s][i].push(run.time);
                if round == 0 {
                    runs[s].push(run);
                }
            }
        }
    }
    let baseline = &runs[0];
    let frames = video.map_or(String::new(), |v| format!(", {} frames", v.default_frames));
    println!(
        "\n{width}x{height}{frames}, {steps} steps, {} prompt(s) x {repeats} interleaved rounds, \
         {device:?}; time and speed-up: median (25th-75th percentile) over prompt x round\n",
        prompts.len()
    );
    println!("| strategy | time per generation | speed-up | PSNR vs none (dB) | max abs diff | transformer compute skipped (= cache_hit_ratio) | attention not computed | uncond halves rebuilt | peak cache memory |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (s, ((name, _), runs)) in strategies.iter().zip(&runs).enumerate() {
        let ms: Vec<f64> = times[s]
            .iter()
            .flatten()
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        let ratios: Vec<f64> = times[s]
            .iter()
            .zip(&times[0])
            .flat_map(|(mine, base)| {
                mine.iter()
                    .zip(base)
                    .map(|(m, b)| b.as_secs_f64() / m.as_secs_f64())
            })
            .collect();
        let (t, r) = (quartiles(ms), quartiles(ratios));
        let (mut psnr_sum, mut max_delta) = (0.0, 0u8);
        for (run, base) in runs.iter().zip(baseline) {
            let (psnr, max) = psnr_and_max_delta(&run.rgb, &base.rgb);
            psnr_sum += psnr.min(99.0);
            max_delta = max_delta.max(max);
        }
        let total: f64 = runs.iter().map(|r| r.flops_total).sum();
        let saved: f64 = runs.iter().map(|r| r.flops_saved).sum();
        let peak = runs.iter().map(|r| r.peak_state_bytes).max().unwrap_or(0);
        let sum = |f: fn(&Run) -> (u32, u32)| {
            runs.iter()
                .map(f)
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        // Unconditional halves are half of all CFG halves: report them against that half.
        let (halves, rebuilt) = sum(|r| r.forwards);
        println!(
            "| {name} | {:.1} ms ({:.1}-{:.1}) | {:.2}x ({:.2}-{:.2}) | {:.1} | {max_delta} | {:.0}% | {:.0}% | {:.0}% | {:.1} KiB |",
            t.1, t.0, t.2,
            r.1, r.0, r.2,
            psnr_sum / runs.len() as f64,
            100.0 * saved / total.max(1.0),
            percent(sum(|r| r.attention)),
            percent((halves / 2, rebuilt)),
            peak as f64 / 1024.0,
        );
    }
    println!("peak RSS of the whole run: {}", peak_rss());
}
