//! Parity of the CogVideoX parts (schedulers, VAE, transformer) with diffusers, on the references
//! that `tests/parity/make_cogvideox_reference.py` and `make_cogvideox_transformer.py` write
//! (fp32, CPU).
//!
//! Data: `$DENOISED_PARITY_DATA/cogvideox` or `<repo>/tests/parity/data/cogvideox`; generate it
//! with `make parity-data`. Missing data fails the tests.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::max_abs_diff;
use denoised_server::dit::hooks::{
    BlockId, Branch, ForwardContext, StepStats, Tensors, TransformerHooks,
};
use denoised_server::dit::layout::LatentLayout;
use denoised_server::models::cogvideox::scheduler::{
    CogVideoXScheduler, CogVideoXSchedulerConfig, SchedulerKind, StepOutput,
};
use denoised_server::models::cogvideox::transformer::{CogVideoXTransformer, Positions};
use denoised_server::models::cogvideox::vae::{AutoencoderKLCogVideoX, Tiling};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |rust - python| for scheduler step outputs.
const STEP_TOLERANCE: f64 = 1e-5;

/// `$DENOISED_PARITY_DATA` or `<repo>/tests/parity/data`.
fn parity_root() -> PathBuf {
    std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/data"))
}

fn data_dir() -> PathBuf {
    let dir = parity_root().join("cogvideox");
    assert!(
        dir.join("manifest.json").is_file(),
        "parity data missing: no {}; run `make parity-data` (or `python \
         tests/parity/make_cogvideox_reference.py --out tests/parity/data/cogvideox`)",
        dir.join("manifest.json").display()
    );
    dir
}

fn manifest(dir: &Path) -> Value {
    let path = dir.join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference safetensors file, by tensor name.
struct Reference(HashMap<String, Tensor>);

impl Reference {
    fn read(path: &Path) -> Self {
        Self(
            Tensor::read_safetensors(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .into_iter()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> &Tensor {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("reference has no `{key}`"))
    }
}

/// The scheduler section of the manifest with its reference tensors.
struct SchedulerData {
    section: Value,
    reference: Reference,
}

impl SchedulerData {
    fn load() -> Self {
        let dir = data_dir();
        let section = manifest(&dir)["scheduler"].clone();
        let reference = Reference::read(&dir.join(section["reference"].as_str().unwrap()));
        Self { section, reference }
    }

    fn list(&self, key: &str) -> &[Value] {
        let list = self.section[key]
            .as_array()
            .unwrap_or_else(|| panic!("manifest: no scheduler `{key}` list"));
        assert!(!list.is_empty(), "manifest: empty scheduler `{key}`");
        list
    }

    fn scheduler(&self, config: &Value) -> CogVideoXScheduler {
        let config: CogVideoXSchedulerConfig = serde_json::from_value(config.clone()).unwrap();
        CogVideoXScheduler::new(config, Path::new("manifest.json")).unwrap()
    }

    /// A scheduler set to the case's step count, with the case's name.
    fn case_scheduler(&self, case: &Value) -> (String, CogVideoXScheduler) {
        let key = case["key"].as_str().unwrap().to_owned();
        let mut scheduler =
            self.scheduler(&self.section["configs"][case["config"].as_str().unwrap()]);
        scheduler
            .set_timesteps(case["steps"].as_u64().unwrap() as usize)
            .unwrap();
        (key, scheduler)
    }

    fn tensor(&self, key: &str, name: &str) -> &Tensor {
        self.reference.get(&format!("{key}.{name}"))
    }
}

fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64).flatten(0, -1)).unwrap()
}

fn assert_bit_equal(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.kind(), expected.kind(), "{what}: dtype");
    assert!(actual.equal(expected), "{what}: not bit-equal to diffusers");
}

#[test]
fn schedules_match_diffusers() {
    let data = SchedulerData::load();
    for (name, config) in data.section["configs"].as_object().unwrap() {
        let scheduler = data.scheduler(config);
        let expected = data.reference.get(&format!("{name}.alphas_cumprod"));
        let actual = scheduler.alphas_cumprod();
        // The dtype decides the step's arithmetic, so it must be diffusers' too.
        assert_eq!(
            actual.kind(),
            expected.kind(),
            "{name}: alphas_cumprod dtype"
        );
        println!(
            "{name}: alphas_cumprod max |Δ| = {:.3e}",
            max_abs_diff(actual, expected)
        );
        assert!(
            actual
                .to_kind(Kind::Float)
                .equal(&expected.to_kind(Kind::Float)),
            "{name}: alphas_cumprod differs from diffusers in float32"
        );
    }
    for case in data.list("cases") {
        let (key, scheduler) = data.case_scheduler(case);
        assert_eq!(
            scheduler.timesteps(),
            i64s(data.tensor(&key, "timesteps")),
            "{key}: timesteps"
        );
    }
    let mut checked = 0;
    for sweep in data.list("timestep_sweep") {
        let config = serde_json::json!({
            "_class_name": "CogVideoXDDIMScheduler",
            "timestep_spacing": sweep["timestep_spacing"],
            "steps_offset": sweep["steps_offset"],
        });
        let mut scheduler = data.scheduler(&config);
        let prefix = sweep["key_prefix"].as_str().unwrap();
        for steps in sweep["steps"].as_array().unwrap() {
            let steps = steps.as_u64().unwrap();
            let expected = i64s(data.reference.get(&format!("{prefix}_{steps}")));
            scheduler.set_timesteps(steps as usize).unwrap();
            assert_eq!(scheduler.timesteps(), expected, "{prefix}, {steps} steps");
            checked += 1;
        }
        for steps in sweep["out_of_range_steps"].as_array().unwrap() {
            let steps = steps.as_u64().unwrap() as usize;
            let err = scheduler.set_timesteps(steps).unwrap_err().to_string();
            assert!(
                err.contains("num_train_timesteps"),
                "{prefix}, {steps} steps: {err}"
            );
        }
    }
    println!("{checked} swept schedules identical");
}

/// Runs one case's denoising loop from its initial latents, as CogVideoXPipeline does, with the
/// case's fake model outputs and `draw_noise` for the DPM noise; checks every step's outputs
/// against diffusers' and returns the largest difference.
fn run_case(
    data: &SchedulerData,
    case: &Value,
    draw_noise: &mut dyn FnMut(usize) -> Tensor,
) -> f64 {
    let (key, scheduler) = data.case_scheduler(case);
    let mut latents = data.tensor(&key, "initial").shallow_clone();
    let mut old_pred_original_sample: Option<Tensor> = None;
    let mut worst = 0f64;
    for i in 0..scheduler.num_steps() {
        let model_output = data.tensor(&key, &format!("model_output{i}"));
        let StepOutput {
            prev_sample,
            pred_original_sample,
        } = scheduler.step(
            model_output,
            &latents,
            i,
            old_pred_original_sample.as_ref(),
            &mut || draw_noise(i),
        );
        for (name, actual) in [
            ("prev_sample", &prev_sample),
            ("pred_original_sample", &pred_original_sample),
        ] {
            let diff = max_abs_diff(actual, data.tensor(&key, &format!("{name}{i}")));
            assert!(
                diff <= STEP_TOLERANCE,
                "{key}, step {i}: {name} max |Δ| {diff:e} > {STEP_TOLERANCE:e}"
            );
            worst = worst.max(diff);
        }
        assert_eq!(prev_sample.kind(), Kind::Float, "{key}: prev_sample dtype");
        latents = prev_sample;
        old_pred_original_sample = Some(pred_original_sample);
    }
    println!(
        "{key}: {} steps, max |Δ| = {worst:.3e}",
        scheduler.num_steps()
    );
    worst
}

fn cases_of(data: &SchedulerData, kind: SchedulerKind) -> Vec<&Value> {
    let cases: Vec<&Value> = data
        .list("cases")
        .iter()
        .filter(|case| data.case_scheduler(case).1.kind() == kind)
        .collect();
    assert!(!cases.is_empty(), "no {kind:?} cases in the manifest");
    cases
}

#[test]
fn ddim_steps_match_diffusers() {
    let data = SchedulerData::load();
    for case in cases_of(&data, SchedulerKind::Ddim) {
        run_case(&data, case, &mut |i| {
            panic!("DDIM step {i} asked for noise")
        });
    }
}

#[test]
fn dpm_steps_match_diffusers() {
    let data = SchedulerData::load();
    for case in cases_of(&data, SchedulerKind::Dpm) {
        // Feed diffusers' own draws, in order.
        let key = case["key"].as_str().unwrap();
        let mut next = (0, 0); // (step, draw within the step)
        run_case(&data, case, &mut |i| {
            if next.0 != i {
                next = (i, 0);
            }
            let noise = data.tensor(key, &format!("noise{}_{}", i, next.1));
            next.1 += 1;
            noise.shallow_clone()
        });
    }
}

/// The DPM noise drawn from libtorch's seeded CPU generator in the documented order (initial
/// latents, then `noise_draws` per step) is diffusers' stream, bit for bit. The only test here
/// that uses the global generator, so parallel tests cannot interleave with its draws.
#[test]
fn dpm_noise_from_seeded_generator_matches_diffusers() {
    let data = SchedulerData::load();
    for case in cases_of(&data, SchedulerKind::Dpm) {
        let (key, scheduler) = data.case_scheduler(case);
        let shape: Vec<i64> = case["latent_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        tch::manual_seed(case["seed"].as_i64().unwrap());
        let initial = Tensor::randn(&shape, (Kind::Float, Device::Cpu));
        assert_bit_equal(
            &format!("{key}: initial latents"),
            &initial,
            data.tensor(&key, "initial"),
        );
        let mut drawn: Vec<(usize, Tensor)> = Vec::new();
        run_case(&data, case, &mut |i| {
            let noise = Tensor::randn(&shape, (Kind::Float, Device::Cpu));
            drawn.push((i, noise.shallow_clone()));
            noise
        });
        for i in 0..scheduler.num_steps() {
            let ours: Vec<&Tensor> = drawn
                .iter()
                .filter(|(s, _)| *s == i)
                .map(|(_, t)| t)
                .collect();
            let expected = data.tensor(&key, &format!("draws{i}")).int64_value(&[]) as usize;
            assert_eq!(ours.len(), expected, "{key}, step {i}: number of draws");
            assert_eq!(
                scheduler.noise_draws(i, i > 0),
                expected,
                "{key}, step {i}: noise_draws"
            );
            for (j, noise) in ours.iter().enumerate() {
                assert_bit_equal(
                    &format!("{key}, step {i}, draw {j}"),
                    noise,
                    data.tensor(&key, &format!("noise{i}_{j}")),
                );
            }
        }
        let counts: Vec<usize> = (0..scheduler.num_steps())
            .map(|i| scheduler.noise_draws(i, i > 0))
            .collect();
        println!("{key}: draws per step {counts:?}, all bit-equal to diffusers'");
    }
}

/// Largest accepted |rust - python| for VAE outputs.
const VAE_TOLERANCE: f64 = 1e-4;

/// The manifest's VAEs: (folder, manifest entry, reference tensors).
fn vaes() -> Vec<(PathBuf, Value, Reference)> {
    let dir = data_dir();
    let entries = manifest(&dir)["vae"]
        .as_array()
        .expect("manifest: no `vae` list")
        .clone();
    assert!(!entries.is_empty(), "manifest: empty `vae`");
    entries
        .into_iter()
        .map(|entry| {
            let reference = Reference::read(&dir.join(entry["reference"].as_str().unwrap()));
            (dir.join(entry["dir"].as_str().unwrap()), entry, reference)
        })
        .collect()
}

fn assert_vae_close(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let diff = max_abs_diff(actual, expected);
    println!("{what}: {:?}, max |Δ| = {diff:.3e}", actual.size());
    assert!(
        diff <= VAE_TOLERANCE,
        "{what}: max |Δ| {diff:e} > {VAE_TOLERANCE:e}"
    );
}

#[test]
fn vae_decode_matches_diffusers() {
    for (dir, entry, reference) in vaes() {
        let vae = AutoencoderKLCogVideoX::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let name = entry["name"].as_str().unwrap();
        for decode in entry["decodes"].as_array().unwrap() {
            let latent_frames = decode["latent_frames"].as_i64().unwrap();
            let video = vae.decode(reference.get(&format!("latent{latent_frames}")));
            assert_eq!(
                video.size()[2],
                decode["frames"].as_i64().unwrap(),
                "{name}: frames decoded from {latent_frames} latent frames"
            );
            assert_vae_close(
                &format!("{name}: decode of {latent_frames} latent frames"),
                &video,
                reference.get(&format!("decoded{latent_frames}")),
            );
        }
    }
}

#[test]
fn vae_encode_matches_diffusers() {
    for (dir, entry, reference) in vaes() {
        let vae = AutoencoderKLCogVideoX::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let name = entry["name"].as_str().unwrap();
        for encode in entry["encodes"].as_array().unwrap() {
            let frames = encode["frames"].as_i64().unwrap();
            let mean = vae.encode(reference.get(&format!("video{frames}")));
            assert_vae_close(
                &format!("{name}: encode of {frames} frames"),
                &mean,
                reference.get(&format!("mean{frames}")),
            );
        }
    }
}

/// diffusers' `enable_tiling` cases: the tiled decode matches, tiles exactly when diffusers did, and
/// differs from the untiled decode when it tiles (so the comparison exercises the tiling).
#[test]
fn vae_tiled_decode_matches_diffusers() {
    let (mut tiled_cases, mut untiled_cases) = (0, 0);
    for (dir, entry, reference) in vaes() {
        let vae = AutoencoderKLCogVideoX::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let name = entry["name"].as_str().unwrap();
        let cases = entry["tiled_decodes"].as_array().unwrap_or_else(|| {
            panic!("manifest: {name} has no `tiled_decodes`; regenerate with `make parity-data`")
        });
        for case in cases {
            let label = format!("{name}: tiled decode `{}`", case["name"].as_str().unwrap());
            let t = &case["tiling"];
            let tiling = Tiling {
                tile_sample_min_height: t["tile_sample_min_height"].as_i64().unwrap(),
                tile_sample_min_width: t["tile_sample_min_width"].as_i64().unwrap(),
                tile_overlap_factor_height: t["tile_overlap_factor_height"].as_f64().unwrap(),
                tile_overlap_factor_width: t["tile_overlap_factor_width"].as_f64().unwrap(),
            };
            if case["enable_tiling"].as_object().unwrap().is_empty() {
                assert_eq!(Tiling::defaults(vae.config()), tiling, "{label}: defaults");
            }
            let z = reference.get(case["latent"].as_str().unwrap());
            let (h, w) = (z.size()[3], z.size()[4]);
            let tiled = case["tiled"].as_bool().unwrap();
            assert_eq!(
                vae.uses_tiles(h, w, &tiling),
                tiled,
                "{label}: tiles or not"
            );
            let video = tch::no_grad(|| vae.decode_with(z, Some(&tiling))).unwrap();
            let expected = reference.get(case["decoded"].as_str().unwrap());
            assert_vae_close(&label, &video, expected);
            let untiled = tch::no_grad(|| vae.decode(z));
            if tiled {
                // diffusers' crops can make a tiled decode another size than the untiled one.
                let change = if untiled.size() == video.size() {
                    let diff = max_abs_diff(&untiled, &video);
                    assert!(
                        diff > 100.0 * VAE_TOLERANCE,
                        "{label}: tiling barely changed the decode (max |Δ| {diff:e})"
                    );
                    format!("max |Δ| {diff:.3e}")
                } else {
                    format!("shape {:?}", untiled.size())
                };
                println!("{label}: {} tiles; untiled decode: {change}", case["tiles"]);
                tiled_cases += 1;
            } else {
                assert!(video.equal(&untiled), "{label}: not the untiled decode");
                untiled_cases += 1;
            }
        }
    }
    assert!(
        tiled_cases >= 2 && untiled_cases >= 1,
        "manifest: too few tiled-decode cases"
    );
}

/// A copy of a VAE folder whose config.json is edited by `edit`.
fn edited_vae(dir: &Path, tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let out = std::env::temp_dir().join(format!("denoised-cogvideox-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for file in std::fs::read_dir(dir).unwrap() {
        let path = file.unwrap().path();
        std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    out
}

#[test]
fn vae_config_with_fewer_blocks_than_the_weights_fails_at_load() {
    for (dir, entry, _) in vaes() {
        let name = entry["name"].as_str().unwrap();
        let levels = entry["levels"].as_u64().unwrap() as usize;
        let fewer_levels = edited_vae(&dir, &format!("{name}-levels"), |config| {
            for key in ["block_out_channels", "down_block_types", "up_block_types"] {
                config[key].as_array_mut().unwrap().truncate(levels - 1);
            }
        });
        let fewer_layers = edited_vae(&dir, &format!("{name}-layers"), |config| {
            let layers = config["layers_per_block"].as_i64().unwrap();
            config["layers_per_block"] = Value::from(layers - 1);
        });
        for (folder, key) in [
            (&fewer_levels, "`block_out_channels`"),
            (&fewer_layers, "`layers_per_block`"),
        ] {
            let layers = serde_json::from_str::<Value>(
                &std::fs::read_to_string(folder.join("config.json")).unwrap(),
            )
            .unwrap()["layers_per_block"]
                .as_i64()
                .unwrap();
            let result = AutoencoderKLCogVideoX::load(folder, Device::Cpu, Kind::Float);
            // layers_per_block 0 is rejected as a bad value, which names the key too.
            let err = result.err().unwrap_or_else(|| {
                panic!("{name}: a config with fewer blocks ({key}, layers {layers}) loaded")
            });
            let err = err.to_string();
            println!("{name}: {err}");
            assert!(
                err.contains("config.json") && err.contains(key),
                "{name}: {err}"
            );
            std::fs::remove_dir_all(folder).unwrap();
        }
    }
}

// ---- transformer ----------------------------------------------------------------------------

/// Largest accepted |rust − diffusers| of a transformer forward (and each block's output).
const TRANSFORMER_TOLERANCE: f64 = 1e-4;

fn transformer_data_dir() -> PathBuf {
    let dir = parity_root().join("cogvideox_transformer");
    assert!(
        dir.join("manifest.json").is_file(),
        "parity data missing: no {}; run `make parity-data` (or `python \
         tests/parity/make_cogvideox_transformer.py --out tests/parity/data/cogvideox_transformer`)",
        dir.join("manifest.json").display()
    );
    dir
}

/// Keeps every computed block's `(hidden, text)` outputs, in call order.
#[derive(Default)]
struct BlockRecorder {
    outputs: Vec<(String, Tensor, Tensor)>,
}

impl TransformerHooks for BlockRecorder {
    fn after_block(&mut self, id: &BlockId, _input: &Tensors, output: &Tensors) {
        let text = id
            .streams
            .text
            .expect("CogVideoX blocks carry a text stream");
        self.outputs.push((
            id.path.clone(),
            output[id.streams.hidden].shallow_clone(),
            output[text].shallow_clone(),
        ));
    }
}

#[test]
fn transformer_forward_matches_diffusers() {
    let dir = transformer_data_dir();
    let manifest = manifest(&dir);
    let models = manifest["models"].as_array().expect("manifest: no models");
    assert_eq!(models.len(), 3, "2b-, 5b- and 1.5-style models");
    for model in models {
        let name = model["name"].as_str().unwrap();
        let transformer = CogVideoXTransformer::load(
            &dir.join(model["dir"].as_str().unwrap()),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in model["cases"].as_array().unwrap() {
            let label = format!("{name}.{}", case["name"].as_str().unwrap());
            let r = Reference::read(&dir.join(case["reference"].as_str().unwrap()));
            let size = |key: &str| case[key].as_i64().unwrap();
            let positions = transformer
                .positions(
                    (size("frames"), size("height"), size("width")),
                    size("text_tokens"),
                )
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            // The rotary tables are the pipeline's, bit for bit up to f32 rounding.
            if let Positions::Rope(rope) = &positions {
                let d = max_abs_diff(&rope.cos, r.get("rope.cos"))
                    .max(max_abs_diff(&rope.sin, r.get("rope.sin")));
                assert!(d <= 1e-6, "{label}: rotary tables differ by {d:e}");
            }
            let ctx = ForwardContext {
                step: 0,
                num_steps: 1,
                timestep: 981.0,
                branch: Branch::Cond,
                batched_cfg: true,
                layout: Arc::new(VideoLayout),
            };
            let mut recorder = BlockRecorder::default();
            let mut stats = StepStats::default();
            let out = tch::no_grad(|| {
                transformer.forward(
                    r.get("hidden_states"),
                    r.get("encoder_hidden_states"),
                    r.get("timestep"),
                    &positions,
                    &ctx,
                    &mut recorder,
                    &mut stats,
                )
            });
            let layers = model["num_layers"].as_u64().unwrap() as usize;
            assert_eq!(recorder.outputs.len(), layers, "{label}: blocks reported");
            let mut worst_block = 0f64;
            for (i, (path, hidden, text)) in recorder.outputs.iter().enumerate() {
                assert_eq!(path, &format!("transformer_blocks.{i}"));
                let d = max_abs_diff(hidden, r.get(&format!("block{i}.hidden")))
                    .max(max_abs_diff(text, r.get(&format!("block{i}.encoder"))));
                assert!(
                    d <= TRANSFORMER_TOLERANCE,
                    "{label}: {path} differs by {d:e}"
                );
                worst_block = worst_block.max(d);
            }
            let d = max_abs_diff(&out, r.get("output"));
            println!(
                "transformer {label}: output max|Δ| = {d:.3e}, blocks max|Δ| = {worst_block:.3e}"
            );
            assert!(
                d <= TRANSFORMER_TOLERANCE,
                "{label}: output differs by {d:e}"
            );
            assert_eq!(out.size(), r.get("output").size());
            assert!(stats.full_compute() && stats.attention.computed as usize == layers);
        }
    }
}

#[test]
fn transformer_refuses_what_it_cannot_run() {
    let dir = transformer_data_dir();
    let t = CogVideoXTransformer::load(&dir.join("sincos_2b"), Device::Cpu, Kind::Float).unwrap();
    // The sin-cos table is laid out for max_text_seq_length text tokens only.
    let err = t.positions((3, 6, 10), 5).unwrap_err().to_string();
    assert!(err.contains("`max_sequence_length`"), "{err}");
    let err = t.positions((3, 5, 10), 7).unwrap_err().to_string();
    assert!(err.contains("patch size"), "{err}");
    // A config with fewer blocks than the weights.
    let scratch = std::env::temp_dir().join(format!("denoised-cogvideox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(dir.join("sincos_2b").join(f), scratch.join(f)).unwrap();
    }
    let path = scratch.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_layers"] = 1.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = CogVideoXTransformer::load(&scratch, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        err.contains("num_layers") && err.contains("config.json"),
        "{err}"
    );
}

/// The video transformer's output is already the latent grid `[B, F, C, H, W]`.
#[derive(Debug)]
struct VideoLayout;

impl LatentLayout for VideoLayout {
    fn to_grid(&self, tokens: &Tensor) -> Tensor {
        tokens.shallow_clone()
    }
    fn to_tokens(&self, grid: &Tensor) -> Tensor {
        grid.shallow_clone()
    }
}
