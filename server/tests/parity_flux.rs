//! Parity of the FLUX transformer, scheduler and whole pipeline with diffusers, on the tiny random
//! pipelines `tests/parity/make_reference.py` writes (fp32, CPU); plus hook routing and load errors.
//!
//! Data: `$DENOISED_PARITY_DATA` or `<repo>/tests/parity/data`; generate it with
//! `make parity-data`. Missing data fails the tests. Run with `--nocapture` to see the measured
//! differences.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::max_abs_diff;
use std::sync::Arc;

use denoised_server::cache::CacheConfig;
use denoised_server::dit::hooks::{
    AttentionId, BlockId, Branch, Decision, ForwardContext, StepStats, Tensors, TransformerHooks,
};
use denoised_server::dit::pipeline::{AnyPipeline, Pipeline};
use denoised_server::dit::request::{GenerationRequest, PreviewKind};
use denoised_server::engine::run::Denoise;
use denoised_server::error::ServiceError;
use denoised_server::models::flux::config::FluxTransformerConfig;
use denoised_server::models::flux::packing::FluxLayout;
use denoised_server::models::flux::pipeline::FluxPipeline;
use denoised_server::models::flux::transformer::{
    attention_macs, block_macs, BlockKind, FluxTransformer,
};
use denoised_server::models::scheduler::{FlowMatchEulerDiscreteScheduler, SchedulerConfig};
use denoised_server::models::ModelError;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |rust − diffusers| for a transformer forward and for latents.
const LATENT_TOLERANCE: f64 = 1e-4;
/// Largest accepted difference of an 8-bit image channel.
const IMAGE_TOLERANCE: f64 = 1.0;

fn data_dir() -> PathBuf {
    let dir = std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/data"));
    assert!(
        dir.join("manifest.json").is_file(),
        "parity data missing: no {}; run `make parity-data` \
         (or `python tests/parity/make_reference.py --out tests/parity/data`)",
        dir.join("manifest.json").display()
    );
    dir
}

fn manifest() -> Value {
    let path = data_dir().join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn read_reference(name: &str) -> HashMap<String, Tensor> {
    let path = data_dir().join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn get<'a>(reference: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    reference
        .get(key)
        .unwrap_or_else(|| panic!("reference has no `{key}`"))
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a string in {v}"))
}

fn usize_field(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a number in {v}")) as usize
}

fn f64_field(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a number in {v}"))
}

fn models() -> Vec<Value> {
    manifest()["models"]
        .as_array()
        .expect("manifest: no `models`")
        .clone()
}

fn model_dir(model: &Value) -> PathBuf {
    data_dir().join(str_field(model, "dir"))
}

/// Keeps every computed block output (hidden and text streams), in call order.
#[derive(Default)]
struct BlockRecorder {
    outputs: Vec<(BlockId, Tensor, Tensor)>,
}

impl TransformerHooks for BlockRecorder {
    fn after_block(&mut self, id: &BlockId, _input: &Tensors, output: &Tensors) {
        let text = id.streams.text.expect("FLUX blocks declare a text stream");
        self.outputs.push((
            id.clone(),
            output[id.streams.hidden].shallow_clone(),
            output[text].shallow_clone(),
        ));
    }
}

fn test_context() -> ForwardContext {
    ForwardContext {
        step: 0,
        num_steps: 1,
        timestep: 730.0,
        branch: Branch::Cond,
        batched_cfg: false,
        layout: Arc::new(FluxLayout { h: 6, w: 10 }),
    }
}

/// Runs the transformer on the inputs of a `<model>.forward.safetensors` reference.
fn forward_reference(
    transformer: &FluxTransformer,
    reference: &HashMap<String, Tensor>,
    hooks: &mut dyn TransformerHooks,
    stats: &mut StepStats,
) -> Tensor {
    tch::no_grad(|| {
        transformer.forward(
            get(reference, "hidden_states"),
            get(reference, "encoder_hidden_states"),
            get(reference, "pooled_projections"),
            get(reference, "timestep"),
            reference.get("guidance"),
            get(reference, "img_ids"),
            get(reference, "txt_ids"),
            &test_context(),
            hooks,
            stats,
        )
    })
}

#[test]
fn transformer_forward_matches_diffusers() {
    for model in models() {
        let name = str_field(&model, "name");
        let transformer = FluxTransformer::load(
            &model_dir(&model).join("transformer"),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let reference = read_reference(str_field(&model, "forward_reference"));
        let mut recorder = BlockRecorder::default();
        let mut stats = StepStats::default();
        let out = forward_reference(&transformer, &reference, &mut recorder, &mut stats);

        let num_blocks =
            usize_field(&model, "num_layers") + usize_field(&model, "num_single_layers");
        assert_eq!(
            recorder.outputs.len(),
            num_blocks,
            "{name}: blocks reported"
        );
        let mut worst_block = 0f64;
        for (flat, (id, hidden, encoder)) in recorder.outputs.iter().enumerate() {
            assert_eq!(id.index, flat);
            let d = max_abs_diff(hidden, get(&reference, &format!("block{flat}.hidden"))).max(
                max_abs_diff(encoder, get(&reference, &format!("block{flat}.encoder"))),
            );
            assert!(
                d <= LATENT_TOLERANCE,
                "{name}: {} differs by {d:e}",
                id.path
            );
            worst_block = worst_block.max(d);
        }
        let d = max_abs_diff(&out, get(&reference, "output"));
        println!("transformer forward {name}: output max|Δ| = {d:.3e}, blocks max|Δ| = {worst_block:.3e}");
        assert!(d <= LATENT_TOLERANCE, "{name}: output differs by {d:e}");
        assert!(stats.full_compute());
        assert_eq!(stats.blocks.computed as usize, num_blocks);
    }
}

#[test]
fn scheduler_matches_diffusers() {
    let manifest = manifest();
    let section = &manifest["scheduler"];
    let reference = read_reference(str_field(section, "reference"));
    let cases = section["cases"]
        .as_array()
        .expect("manifest: no scheduler cases");
    for case in cases {
        let key = str_field(case, "key");
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(config, Path::new(key)).unwrap();
        let mu = scheduler.config().mu(usize_field(case, "image_seq_len"));
        assert_eq!(mu, f64_field(case, "mu"), "{key}: mu");
        scheduler
            .set_timesteps(usize_field(case, "steps"), Some(mu))
            .unwrap();
        for (what, ours) in [
            ("sigmas", scheduler.sigmas()),
            ("timesteps", scheduler.timesteps()),
        ] {
            let expected: Vec<f32> =
                Vec::try_from(get(&reference, &format!("{key}.{what}"))).unwrap();
            assert_eq!(ours, expected.as_slice(), "{key}: {what}");
        }
    }
    println!(
        "scheduler: {} schedules bit-identical to diffusers",
        cases.len()
    );
}

#[test]
fn pipeline_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["cases"].as_array().expect("manifest: no `cases`");
    for model in models() {
        let name = str_field(&model, "name");
        let pipeline = FluxPipeline::load(&model_dir(&model), Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in cases.iter().filter(|c| c["model"] == model["name"]) {
            check_case(&pipeline, case);
        }
    }
}

/// One generation through the engine's step loop without a cache, as the server runs it.
fn check_case(pipeline: &FluxPipeline, case: &Value) {
    let name = str_field(case, "name");
    let reference = read_reference(str_field(case, "reference"));
    let params = GenerationRequest {
        prompt: str_field(case, "prompt").to_owned(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_owned),
        width: usize_field(case, "width"),
        height: usize_field(case, "height"),
        steps: usize_field(case, "steps"),
        guidance: f64_field(case, "guidance") as f32,
        true_cfg_scale: f64_field(case, "true_cfg_scale") as f32,
        seed: case["seed"].as_u64().unwrap(),
        max_sequence_length: usize_field(case, "max_sequence_length"),
        num_frames: None,
        dynamic_cfg: false,
    };
    let dyn_pipeline: &dyn AnyPipeline = pipeline;
    let mut run = Denoise::start(dyn_pipeline, &params, CacheConfig::None)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let latents = |run: &Denoise| dyn_pipeline.latents(run.generation());
    // The seeded noise must be exactly torch.Generator("cpu").manual_seed(seed)'s.
    assert_eq!(
        max_abs_diff(&latents(&run), get(&reference, "noise")),
        0.0,
        "{name}: initial noise"
    );
    let mut worst_step = 0f64;
    while !run.progress(dyn_pipeline).is_done() {
        let report = run.step(dyn_pipeline).unwrap();
        let (out, stats) = (report.output, report.stats);
        let forwards = if params.true_cfg_scale > 1.0 && params.negative_prompt.is_some() {
            2
        } else {
            1
        };
        assert_eq!(
            stats.forwards.computed, forwards,
            "{name}: forwards in step {}",
            out.index
        );
        let d = max_abs_diff(
            &latents(&run),
            get(&reference, &format!("step{}", out.index)),
        );
        assert!(
            d <= LATENT_TOLERANCE,
            "{name}: latents after step {} differ by {d:e}",
            out.index
        );
        worst_step = worst_step.max(d);
    }
    assert_eq!(run.progress(dyn_pipeline).step_index, params.steps);
    let latents_diff = max_abs_diff(&latents(&run), get(&reference, "latents"));

    let frames = dyn_pipeline.decode(run.generation());
    let (w, h, rgb) = (frames.width, frames.height, &frames.frames[0]);
    assert_eq!(
        (w as usize, h as usize),
        (
            usize_field(case, "image_width"),
            usize_field(case, "image_height")
        ),
        "{name}: image size"
    );
    let ours = Tensor::from_slice(rgb).view([h as i64, w as i64, 3]);
    let image_diff = max_abs_diff(&ours, get(&reference, "image"));
    println!(
        "pipeline {name}: final latents max|Δ| = {latents_diff:.3e} (worst step {worst_step:.3e}), \
         image max|Δ| = {image_diff} levels"
    );
    assert!(
        latents_diff <= LATENT_TOLERANCE,
        "{name}: final latents differ by {latents_diff:e}"
    );
    assert!(
        image_diff <= IMAGE_TOLERANCE,
        "{name}: image differs by {image_diff} levels"
    );
    // Previews: the decoded prediction at image size; the latent projection at latent size.
    let full = dyn_pipeline.preview(run.generation(), PreviewKind::FullDecode);
    assert_eq!(
        (full.width, full.height),
        (w, h),
        "{name}: full preview size"
    );
    let vae_scale = Pipeline::card(pipeline).size_multiple / 2;
    let latent = dyn_pipeline.preview(run.generation(), PreviewKind::LatentRgb);
    assert_eq!(
        (latent.width, latent.height),
        (w / vae_scale, h / vae_scale),
        "{name}: latent preview size"
    );
}

/// Records every hook call; optionally answers with canned decisions.
#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
    /// Returned by `before_forward` instead of computing.
    forward_output: Option<Tensor>,
    /// Skip every block (pass its input through).
    skip_blocks: bool,
    /// Every attention output computed, by module path.
    attention: HashMap<String, Tensors>,
    /// Reuse those instead of computing attention.
    reuse_attention: bool,
}

impl TransformerHooks for Recorder {
    fn before_forward(&mut self, ctx: &ForwardContext) -> Decision<Tensor> {
        self.calls.push(format!("before_forward {:?}", ctx.branch));
        match &self.forward_output {
            Some(t) => Decision::Reuse(t.shallow_clone()),
            None => Decision::Compute,
        }
    }
    fn after_forward(&mut self, _ctx: &ForwardContext, _output: &Tensor) {
        self.calls.push("after_forward".into());
    }
    fn before_block(&mut self, id: &BlockId, input: &Tensors) -> Decision<Tensors> {
        self.calls
            .push(format!("before_block {} {}", id.index, id.path));
        if self.skip_blocks {
            Decision::Skip(input.shallow_clone())
        } else {
            Decision::Compute
        }
    }
    fn after_block(&mut self, id: &BlockId, _input: &Tensors, output: &Tensors) {
        assert_eq!(output.len(), 2, "{}: [text, image] streams", id.path);
        self.calls.push(format!("after_block {}", id.index));
    }
    fn before_attention(&mut self, id: &AttentionId) -> Decision<Tensors> {
        self.calls.push(format!(
            "before_attention {} {:?} {}",
            id.path, id.role, id.index
        ));
        if self.reuse_attention {
            Decision::Reuse(self.attention[&id.path].shallow_clone())
        } else {
            Decision::Compute
        }
    }
    fn after_attention(&mut self, id: &AttentionId, output: &Tensors) {
        // Joint attention returns image and text parts; single-stream attention one tensor.
        let joint = id.path.starts_with("transformer_blocks.");
        assert_eq!(output.len(), if joint { 2 } else { 1 }, "{}", id.path);
        self.calls.push(format!("after_attention {}", id.path));
        self.attention
            .insert(id.path.clone(), output.shallow_clone());
    }
    fn before_output_projection(&mut self) -> Decision<Tensor> {
        self.calls.push("before_output_projection".into());
        Decision::Compute
    }
    fn after_output_projection(&mut self, _output: &Tensor) {
        self.calls.push("after_output_projection".into());
    }
}

#[test]
fn hooks_see_every_module_in_order() {
    let model = &models()[0];
    let transformer = FluxTransformer::load(
        &model_dir(model).join("transformer"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let reference = read_reference(str_field(model, "forward_reference"));
    let n = transformer.num_blocks();
    let dual = transformer.config().num_layers;

    // Full compute: forward, then each block with its attention inside, then the projection.
    let mut full = Recorder::default();
    let mut stats = StepStats::default();
    let full_out = forward_reference(&transformer, &reference, &mut full, &mut stats);
    assert_eq!(full_out.size(), get(&reference, "output").size());
    assert_eq!(stats.macs_not_run, 0.0);
    let mut expected = vec!["before_forward Cond".to_owned()];
    for i in 0..n {
        let block = if i < dual {
            format!("transformer_blocks.{i}")
        } else {
            format!("single_transformer_blocks.{}", i - dual)
        };
        expected.push(format!("before_block {i} {block}"));
        expected.push(format!("before_attention {block}.attn Spatial {i}"));
        expected.push(format!("after_attention {block}.attn"));
        expected.push(format!("after_block {i}"));
    }
    expected.extend(
        [
            "before_output_projection",
            "after_output_projection",
            "after_forward",
        ]
        .map(String::from),
    );
    assert_eq!(full.calls, expected);
    assert_eq!(
        (
            stats.forwards.computed,
            stats.blocks.computed,
            stats.attention.computed,
            stats.output_projection.computed
        ),
        (1, n as u32, n as u32, 1)
    );

    // Skipped blocks run no attention and are tallied as skipped.
    let mut rec = Recorder {
        skip_blocks: true,
        ..Recorder::default()
    };
    let mut stats = StepStats::default();
    let out = forward_reference(&transformer, &reference, &mut rec, &mut stats);
    assert_eq!(out.size(), get(&reference, "output").size());
    assert!(!rec
        .calls
        .iter()
        .any(|c| c.starts_with("before_attention") || c.starts_with("after_block")));
    assert_eq!(
        (stats.blocks.skipped, stats.attention.total()),
        (n as u32, 0)
    );
    assert!(!stats.full_compute());
    // Each skipped block is costed by its kind at the forward's shapes.
    let c = transformer.config();
    let hidden = get(&reference, "hidden_states").size();
    let (batch, l_img) = (hidden[0] as f64, hidden[1]);
    let l_txt = get(&reference, "encoder_hidden_states").size()[1];
    let per_kind = |cost: fn(&FluxTransformerConfig, BlockKind, i64, i64) -> f64| {
        batch
            * (dual as f64 * cost(c, BlockKind::Dual, l_img, l_txt)
                + (n - dual) as f64 * cost(c, BlockKind::Single, l_img, l_txt))
    };
    assert_eq!(stats.macs_not_run, per_kind(block_macs));

    // Reused attention is costed by its block's kind (single blocks have no output projection).
    let mut rec = Recorder {
        reuse_attention: true,
        attention: std::mem::take(&mut full.attention),
        ..Recorder::default()
    };
    let mut stats = StepStats::default();
    let reused = forward_reference(&transformer, &reference, &mut rec, &mut stats);
    assert_eq!(max_abs_diff(&reused, &full_out), 0.0);
    assert_eq!(
        (stats.blocks.computed, stats.attention.reused),
        (n as u32, n as u32)
    );
    assert_eq!(stats.macs_not_run, per_kind(attention_macs));

    // A reused forward returns the supplied tensor and runs nothing.
    let canned = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
    let mut rec = Recorder {
        forward_output: Some(canned.shallow_clone()),
        ..Recorder::default()
    };
    let mut stats = StepStats::default();
    let out = forward_reference(&transformer, &reference, &mut rec, &mut stats);
    assert_eq!(out, canned);
    assert_eq!(rec.calls, ["before_forward Cond"]);
    assert_eq!((stats.forwards.reused, stats.blocks.total()), (1, 0));

    // Per-block compute estimate: grows with the token count, quadratically through attention.
    let c = transformer.config();
    let small = block_macs(c, BlockKind::Dual, 16, 8);
    let large = block_macs(c, BlockKind::Dual, 64, 8);
    assert!(large > 2.5 * small && block_macs(c, BlockKind::Single, 16, 8) > 0.0);
}

#[test]
fn true_cfg_runs_both_branches_through_the_hooks() {
    let manifest = manifest();
    let case = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["negative_prompt"].is_string())
        .expect("a true-CFG case")
        .clone();
    let model = models()
        .into_iter()
        .find(|m| m["name"] == case["model"])
        .unwrap();
    let pipeline = FluxPipeline::load(&model_dir(&model), Device::Cpu, Kind::Float).unwrap();
    let params = GenerationRequest {
        prompt: "a cat".into(),
        negative_prompt: Some("a dog".into()),
        width: 16,
        height: 16,
        steps: 2,
        guidance: 3.5,
        true_cfg_scale: 2.0,
        seed: 5,
        max_sequence_length: 8,
        num_frames: None,
        dynamic_cfg: false,
    };
    let mut gen = Pipeline::prepare(&pipeline, &params).unwrap();
    let mut rec = Recorder::default();
    let mut stats = StepStats::default();
    let out = Pipeline::step(&pipeline, &mut gen, &mut rec, &mut stats);
    assert_eq!((out.index, out.total, out.sigma), (0, 2, 1.0));
    let branches: Vec<&String> = rec
        .calls
        .iter()
        .filter(|c| c.starts_with("before_forward"))
        .collect();
    assert_eq!(branches, ["before_forward Cond", "before_forward Uncond"]);
    assert_eq!(stats.forwards.computed, 2);

    // Invalid requests name the field.
    for (params, field) in [
        (
            GenerationRequest {
                width: 2,
                ..params.clone()
            },
            "width",
        ),
        (
            GenerationRequest {
                steps: 0,
                ..params.clone()
            },
            "steps",
        ),
        (
            GenerationRequest {
                max_sequence_length: 513,
                ..params.clone()
            },
            "max_sequence_length",
        ),
        (
            GenerationRequest {
                guidance: f32::NAN,
                ..params.clone()
            },
            "guidance",
        ),
    ] {
        let err = Pipeline::prepare(&pipeline, &params)
            .err()
            .expect("invalid params accepted")
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
}

// ---- broken model folders -------------------------------------------------------------------

/// A scratch copy of a folder, removed on drop.
struct TempCopy(PathBuf);

impl TempCopy {
    fn of(src: &Path, name: &str) -> Self {
        let dst = std::env::temp_dir().join(format!(
            "denoised-parity-flux-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dst);
        copy_dir(src, &dst);
        Self(dst)
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Rewrites a safetensors file through `edit`.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// The single-file (unsharded) guidance model.
fn unsharded_model() -> PathBuf {
    let model = models()
        .into_iter()
        .find(|m| m["sharded"] == false && m["guidance_embeds"] == true)
        .expect("an unsharded model with guidance embeds");
    model_dir(&model)
}

/// The server's load error for a folder.
fn load_error(dir: &Path) -> String {
    match denoised_server::models::load_pipeline(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded despite being broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not name `{part}`: {err}");
    }
}

#[test]
fn broken_folders_fail_at_load_naming_file_and_key() {
    let src = unsharded_model();
    let weights = "transformer/diffusion_pytorch_model.safetensors";

    let missing = TempCopy::of(&src, "missing-tensor");
    let name = "transformer_blocks.1.attn.norm_added_k.weight";
    edit_safetensors(&missing.0.join(weights), |t| t.retain(|(n, _)| n != name));
    assert_names(&load_error(&missing.0), &[weights, name, "missing"]);

    let misshaped = TempCopy::of(&src, "misshaped-tensor");
    let name = "single_transformer_blocks.0.proj_mlp.weight";
    edit_safetensors(&misshaped.0.join(weights), |t| {
        let entry = t.iter_mut().find(|(n, _)| n == name).unwrap();
        entry.1 = entry.1.narrow(0, 0, 3).contiguous();
    });
    assert_names(&load_error(&misshaped.0), &[weights, name, "shape"]);

    let unknown = TempCopy::of(&src, "unknown-class");
    edit_json(&unknown.0.join("transformer/config.json"), |c| {
        c["_class_name"] = "SD3Transformer2DModel".into();
    });
    assert_names(
        &load_error(&unknown.0),
        &["transformer/config.json", "SD3Transformer2DModel"],
    );

    let bad_value = TempCopy::of(&src, "bad-config-value");
    edit_json(&bad_value.0.join("transformer/config.json"), |c| {
        c["axes_dims_rope"] = serde_json::json!([2, 2, 2]);
    });
    assert_names(
        &load_error(&bad_value.0),
        &["transformer/config.json", "axes_dims_rope"],
    );

    let fewer_layers = TempCopy::of(&src, "fewer-layers");
    edit_json(&fewer_layers.0.join("transformer/config.json"), |c| {
        c["num_layers"] = 1.into();
    });
    assert_names(
        &load_error(&fewer_layers.0),
        &["transformer/config.json", "num_layers"],
    );

    let pipeline_class = TempCopy::of(&src, "pipeline-class");
    edit_json(&pipeline_class.0.join("model_index.json"), |c| {
        c["_class_name"] = "StableDiffusion3Pipeline".into();
    });
    assert_names(
        &load_error(&pipeline_class.0),
        &["model_index.json", "StableDiffusion3Pipeline"],
    );

    let scheduler = TempCopy::of(&src, "scheduler-option");
    edit_json(&scheduler.0.join("scheduler/scheduler_config.json"), |c| {
        c["use_karras_sigmas"] = true.into();
    });
    assert_names(
        &load_error(&scheduler.0),
        &["scheduler_config.json", "use_karras_sigmas"],
    );
}

/// A prompt the tokenizer refuses is the caller's input: `INVALID_ARGUMENT` naming the field, not
/// an internal error (a tokenizer failure used to panic inside the prompt encoding).
#[test]
fn a_prompt_the_tokenizer_refuses_is_an_invalid_argument() {
    // A T5 tokenizer without an unknown token refuses characters outside its vocabulary.
    let model = TempCopy::of(&unsharded_model(), "tokenizer-without-unk");
    edit_json(&model.0.join("tokenizer_2/tokenizer.json"), |t| {
        t["model"]["unk_id"] = Value::Null;
    });
    let pipeline = denoised_server::models::load_pipeline(&model.0, Device::Cpu, Kind::Float)
        .expect("the model loads");
    let pipeline = pipeline.as_ref();
    let request = GenerationRequest {
        prompt: "a cat".into(),
        negative_prompt: Some("a dog".into()),
        width: 16,
        height: 16,
        steps: 1,
        guidance: 3.5,
        true_cfg_scale: 2.0,
        seed: 0,
        max_sequence_length: 8,
        num_frames: None,
        dynamic_cfg: false,
    };
    assert!(Denoise::start(pipeline, &request, CacheConfig::None).is_ok());
    let snowman = "a ☃".to_owned();
    for (request, field) in [
        (
            GenerationRequest {
                prompt: snowman.clone(),
                ..request.clone()
            },
            "prompt",
        ),
        (
            GenerationRequest {
                negative_prompt: Some(snowman.clone()),
                ..request.clone()
            },
            "negative_prompt",
        ),
    ] {
        let err = Denoise::start(pipeline, &request, CacheConfig::None)
            .err()
            .expect("a refused prompt was accepted");
        assert!(
            matches!(&err, ServiceError::Model(ModelError::InvalidInput { field: f, .. }) if f == field),
            "{err:?}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains(&format!("`{field}`")),
            "{}",
            status.message()
        );
    }
}
