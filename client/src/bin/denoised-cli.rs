//! `denoised-cli`: list models and sessions, manage a session, and run generations with a
//! progress bar.
//! A thin shell over `denoised_client`; it only parses arguments and formats output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use denoised_client::{
    CacheConfig, Client, Completed, Event, GenerateRequest, GenerationStream, ImageFormat,
    Modality, ModelInfo, Preview, Session, SessionInfo, Started, StepEvent, TraceParent,
    VideoFormat,
};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "denoised-cli",
    version,
    about = "Client for the denoised diffusion server"
)]
struct Cli {
    /// Server address.
    #[arg(
        long,
        global = true,
        env = "DENOISED_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// W3C traceparent to continue the caller's trace on the server.
    #[arg(long, global = true, env = "TRACEPARENT")]
    traceparent: Option<TraceParent>,
    /// Deadline in seconds for non-streaming calls (0: none).
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the served models.
    Models,
    /// List the open sessions.
    Sessions,
    /// Create, show, change, cancel or close one session (from any shell, also while it
    /// generates).
    Session(SessionArgs),
    /// Generate an image, or a video with a video model.
    Generate(Box<GenerateArgs>),
}

#[derive(Args)]
struct SessionArgs {
    /// Print a JSON object instead of one line of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SessionCommand,
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Create a session and print its id (`S=$(denoised-cli session create --model default)`).
    Create {
        /// Model the session runs.
        #[arg(long)]
        model: String,
        /// Initial cache strategy, in the syntax of `generate --cache`.
        #[arg(long, default_value = "none")]
        cache: CacheConfig,
        /// Close the session after this many idle seconds (default: the server's).
        #[arg(long, value_name = "SECONDS")]
        idle_timeout: Option<u64>,
        /// A label shown with the session (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Show a session.
    Get { id: String },
    /// Replace the cache strategy; a running generation switches at its next step.
    SetCache {
        id: String,
        /// The new strategy, in the syntax of `generate --cache`.
        #[arg(long)]
        cache: CacheConfig,
    },
    /// Drop the cached state; a running generation computes its next step fully.
    Reset { id: String },
    /// Stop the session's running generation at its next step.
    Cancel { id: String },
    /// Close the session, stopping a running generation and freeing its cache.
    Close { id: String },
}

fn parse_label(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {arg:?}")),
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Model to run (on an ephemeral session).
    #[arg(long, required_unless_present = "session")]
    model: Option<String>,
    /// Run in this existing session instead, with its cache strategy.
    #[arg(long, conflicts_with_all = ["model", "cache"])]
    session: Option<String>,
    /// Prompt (may be empty for class-conditional models).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Negative prompt (true CFG, with --true-cfg-scale > 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Class label for class-conditional models.
    #[arg(long)]
    class_label: Option<u32>,
    /// Width in pixels (default: the model's).
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels (default: the model's).
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps (default: the model's).
    #[arg(long)]
    steps: Option<u32>,
    /// Embedded guidance scale (CogVideoX: the classifier-free guidance scale).
    #[arg(long)]
    guidance: Option<f32>,
    /// True CFG scale.
    #[arg(long)]
    true_cfg_scale: Option<f32>,
    /// Noise seed (default: random, printed in the summary).
    #[arg(long)]
    seed: Option<u64>,
    /// Cache strategy, e.g. `taylorseer:cache_interval=5,max_order=1`, `fbc:threshold=0.12`,
    /// `pab`, `fastercache`, `magcache:mag_ratios=1.0/1.02/...`, `none`.
    #[arg(long, default_value = "none")]
    cache: CacheConfig,
    /// Intermediate previews (default: latent when --preview-dir is given, else none).
    #[arg(long, value_enum)]
    preview: Option<PreviewArg>,
    /// A preview every N steps (the last step always gets one).
    #[arg(long, default_value_t = 1)]
    preview_every: u32,
    /// Directory for previews (`step-NNN.jpg`).
    #[arg(long)]
    preview_dir: Option<PathBuf>,
    /// Output file; the extension selects the format: `.png`, `.jpg` or `.jpeg` for image
    /// models, `.mp4` or `.gif` for video models (default: out.png; for video models out.mp4,
    /// or out.gif with --video-format gif).
    #[arg(long, visible_alias = "output")]
    out: Option<PathBuf>,
    /// Video models: frames to generate, 1 + k·step (default: the model's; see `models`).
    #[arg(long)]
    frames: Option<u32>,
    /// Video models: frame rate of the video (default: the model's).
    #[arg(long)]
    fps: Option<u32>,
    /// Video models: dynamic classifier-free guidance (CogVideoX).
    #[arg(long)]
    dynamic_cfg: bool,
    /// Video models: container of the video (default: from the --out extension, else mp4).
    #[arg(long, value_enum)]
    video_format: Option<VideoFormatArg>,
    /// Video models: also write every frame to this directory (`frame_0000.png`, ...).
    #[arg(long)]
    frames_dir: Option<PathBuf>,
    /// Print one JSON object with the summary instead of text and a progress bar.
    #[arg(long)]
    json: bool,
    /// Also print every step as it arrives, one line each (with --json, one JSON object per
    /// line before the summary's).
    #[arg(long)]
    events: bool,
    /// With --events: also print each transformer call's per-block decisions (C computed,
    /// R reused, P predicted, S skipped, `.` not run).
    #[arg(long)]
    module_decisions: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PreviewArg {
    /// Cheap latent-to-RGB projection.
    Latent,
    /// Full VAE decode (costly).
    Full,
    /// No previews.
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VideoFormatArg {
    /// MP4 (H.264).
    Mp4,
    /// Looping animated GIF.
    Gif,
}

impl From<VideoFormatArg> for VideoFormat {
    fn from(arg: VideoFormatArg) -> Self {
        match arg {
            VideoFormatArg::Mp4 => VideoFormat::Mp4,
            VideoFormatArg::Gif => VideoFormat::Gif,
        }
    }
}

/// Errors print as one line (the error and its causes), without anyhow's multi-line report or
/// its backtrace under `RUST_BACKTRACE`: the CLI's users need the message, not its origin.
#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the line already
/// ends with (wrappers that repeat their source's message), newlines flattened.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = Client::connect(cli.server.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", cli.server))?;
    if cli.timeout > 0 {
        client = client.with_timeout(Duration::from_secs(cli.timeout));
    }
    if let Some(traceparent) = cli.traceparent {
        client = client.with_traceparent(move || Some(traceparent));
    }
    match cli.command {
        Command::Models => print_models(&client.list_models().await?),
        Command::Sessions => print_sessions(&client.list_sessions().await?),
        Command::Session(args) => session_command(&client, args).await?,
        Command::Generate(args) => generate(&client, *args).await?,
    }
    Ok(())
}

/// What `--out` receives.
#[derive(Clone, Copy)]
enum Output {
    Image(ImageFormat),
    Video(VideoFormat),
}

/// The output path and format: from the model's modality, `--out`'s extension and
/// `--video-format`, checked before the generation runs rather than after.
fn output(
    model: &ModelInfo,
    out: Option<PathBuf>,
    video_format: Option<VideoFormat>,
) -> anyhow::Result<(PathBuf, Output)> {
    let extension = out
        .as_deref()
        .and_then(|p| p.extension())
        .and_then(|e| e.to_str());
    let shown = || {
        out.as_deref()
            .map_or(String::new(), |p| p.display().to_string())
    };
    if model.modality == Modality::Video {
        let from_extension = extension
            .map(|ext| {
                VideoFormat::from_extension(ext).with_context(|| {
                    format!(
                        "--out {}: model `{}` makes videos; use .mp4 or .gif",
                        shown(),
                        model.name
                    )
                })
            })
            .transpose()?;
        let format = match (video_format, from_extension) {
            (Some(flag), Some(ext)) if flag != ext => {
                bail!("--video-format {flag} does not match --out {}", shown())
            }
            (flag, ext) => flag.or(ext).unwrap_or_default(),
        };
        let out = out.unwrap_or_else(|| PathBuf::from(format!("out.{}", format.extension())));
        return Ok((out, Output::Video(format)));
    }
    // Servers ignore video_format for image models, so say so rather than drop it silently.
    if video_format.is_some() {
        bail!("--video-format: model `{}` makes images", model.name);
    }
    let format = extension
        .map_or(Some(ImageFormat::Png), ImageFormat::from_extension)
        .with_context(|| format!("--out {}: use .png, .jpg or .jpeg", shown()))?;
    Ok((
        out.unwrap_or_else(|| "out.png".into()),
        Output::Image(format),
    ))
}

/// The served model a generation runs on: `--model`, or the model of `--session`.
async fn model_info(
    client: &Client,
    model: Option<&str>,
    session: Option<&Session>,
) -> anyhow::Result<ModelInfo> {
    let name = match (session, model) {
        (Some(session), _) => session.info().await?.model,
        (None, Some(model)) => model.to_owned(),
        (None, None) => unreachable!("clap requires --model or --session"),
    };
    let models = client.list_models().await?;
    models
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .with_context(|| {
            let served: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            format!(
                "the server has no model `{name}` (it serves: {})",
                served.join(", ")
            )
        })
}

async fn generate(client: &Client, args: GenerateArgs) -> anyhow::Result<()> {
    let session = args.session.map(|id| client.session(id));
    let model = model_info(client, args.model.as_deref(), session.as_ref()).await?;
    let (out, output) = output(&model, args.out, args.video_format.map(Into::into))?;
    let preview_mode = args.preview.unwrap_or(if args.preview_dir.is_some() {
        PreviewArg::Latent
    } else {
        PreviewArg::None
    });
    let preview = match preview_mode {
        PreviewArg::None => None,
        PreviewArg::Latent => Some(Preview::latent_rgb()),
        PreviewArg::Full => Some(Preview::full_decode()),
    };
    let preview_dir = match (&preview, &args.preview_dir) {
        (Some(_), None) => bail!("--preview needs --preview-dir to write the previews to"),
        (Some(_), Some(dir)) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Some(dir.as_path())
        }
        (None, _) => None,
    };
    if let Some(dir) = &args.frames_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let mut request = GenerateRequest::new(args.prompt);
    match output {
        Output::Image(format) => request = request.output_format(format),
        Output::Video(format) => request = request.video_format(format),
    }
    if let Some(p) = args.negative_prompt {
        request = request.negative_prompt(p);
    }
    if let Some(label) = args.class_label {
        request = request.class_label(label);
    }
    if let Some(w) = args.width {
        request = request.width(w);
    }
    if let Some(h) = args.height {
        request = request.height(h);
    }
    if let Some(steps) = args.steps {
        request = request.steps(steps);
    }
    if let Some(g) = args.guidance {
        request = request.guidance(g);
    }
    if let Some(s) = args.true_cfg_scale {
        request = request.true_cfg_scale(s);
    }
    if let Some(seed) = args.seed {
        request = request.seed(seed);
    }
    if let Some(preview) = preview {
        request = request.preview(preview.every(args.preview_every).jpeg());
    }
    if let Some(frames) = args.frames {
        request = request.num_frames(frames);
    }
    if let Some(fps) = args.fps {
        request = request.fps(fps);
    }
    if args.dynamic_cfg {
        request = request.use_dynamic_cfg(true);
    }
    if args.frames_dir.is_some() {
        request = request.return_frames(true);
    }
    if args.module_decisions {
        request = request.record_module_decisions(true);
    }

    let wall = Instant::now();
    let stream = match &session {
        Some(session) => session.generate(request).await?,
        None => {
            client
                .generate_once(&model.name, args.cache, request)
                .await?
        }
    };

    let progress = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} steps  {msg}")
            .expect("valid template"),
    );
    let events = match (args.events, args.json) {
        (false, _) => Events::Off,
        (true, false) => Events::Text,
        (true, true) => Events::Json,
    };
    let run = tokio::select! {
        run = drive(stream, &progress, preview_dir, events) => run?,
        _ = tokio::signal::ctrl_c() => {
            progress.abandon_with_message("interrupted");
            // An ephemeral session ends with the dropped stream; a named one must be told.
            if let Some(session) = &session {
                session.cancel().await?;
            }
            bail!("interrupted");
        }
    };
    progress.finish_and_clear();
    let c = &run.completed;
    match output {
        Output::Image(_) => c.image.save(&out),
        Output::Video(_) => c
            .video
            .as_ref()
            .with_context(|| format!("the server sent no video for model `{}`", model.name))?
            .save(&out),
    }
    .with_context(|| format!("cannot write {}", out.display()))?;
    let frames = match &args.frames_dir {
        Some(dir) => c
            .save_frames(dir)
            .with_context(|| format!("cannot write the frames to {}", dir.display()))?
            .len(),
        None => 0,
    };
    let files = Files {
        out: &out,
        previews: preview_dir,
        frames_dir: args.frames_dir.as_deref(),
        frames,
    };
    print_summary(&run, &model, &files, wall.elapsed(), args.json);
    Ok(())
}

/// Where a generation's results were written.
struct Files<'a> {
    out: &'a Path,
    previews: Option<&'a Path>,
    frames_dir: Option<&'a Path>,
    frames: usize,
}

/// What a finished generation stream produced.
struct Run {
    started: Started,
    completed: Completed,
    previews: u32,
}

/// How `generate --events` prints the steps.
#[derive(Clone, Copy)]
enum Events {
    Off,
    Text,
    Json,
}

async fn drive(
    mut stream: GenerationStream,
    progress: &ProgressBar,
    preview_dir: Option<&Path>,
    events: Events,
) -> anyhow::Result<Run> {
    let mut started = None;
    let mut previews = 0;
    while let Some(event) = stream.next().await {
        match event? {
            Event::Started(s) => {
                progress.set_length(s.settings.steps.into());
                started = Some(s);
            }
            Event::Step(step) => {
                print_step(&step, progress, events);
                progress.set_length(step.total.into());
                progress.set_position((step.index + 1).into());
                progress.set_message(step.cache.to_string());
                if let (Some(preview), Some(dir)) = (step.preview, preview_dir) {
                    let path = dir.join(format!(
                        "step-{:03}.{}",
                        step.index,
                        preview.format.extension()
                    ));
                    preview
                        .save(&path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    previews += 1;
                }
            }
            Event::Completed(completed) => {
                let started = started.context("the server sent Completed before Started")?;
                return Ok(Run {
                    started,
                    completed,
                    previews,
                });
            }
        }
    }
    bail!("the generation stream ended without a result")
}

fn print_step(step: &StepEvent, progress: &ProgressBar, events: Events) {
    let line = match events {
        Events::Off => return,
        Events::Text => {
            let mut line = format!(
                "step {}/{}: {} ({:.1} ms)",
                step.index + 1,
                step.total,
                step.cache,
                step.step_time.as_secs_f64() * 1e3
            );
            for forward in step.cache.modules.iter().flatten() {
                line.push_str(&format!("\n  {forward}"));
            }
            line
        }
        Events::Json => {
            let c = &step.cache;
            serde_json::json!({
                "event": "step",
                "index": step.index,
                "total": step.total,
                "timestep": step.timestep,
                "sigma": step.sigma,
                "strategy": c.strategy.name(),
                "full_compute": c.full_compute,
                "strategy_step": c.strategy_step,
                "strategy_switched": c.strategy_switched,
                "cache_reset": c.cache_reset,
                "blocks_computed": c.blocks.computed,
                "blocks_total": c.blocks.total(),
                "cache_state_bytes": c.cache_state_bytes,
                "step_ms": step.step_time.as_secs_f64() * 1e3,
                "modules": c.modules.as_ref().map(|m| {
                    m.iter().map(ToString::to_string).collect::<Vec<_>>()
                }),
            })
            .to_string()
        }
    };
    // Above the progress bar, when there is one.
    progress.suspend(|| println!("{line}"));
}

fn print_summary(run: &Run, model: &ModelInfo, files: &Files, wall: Duration, json: bool) {
    let (s, c) = (&run.started.settings, &run.completed);
    // What --out received: the video of a video model, else the image.
    let (width, height, format) = match &c.video {
        Some(v) => (v.width, v.height, v.format.to_string()),
        None => (c.image.width, c.image.height, c.image.format.to_string()),
    };
    if json {
        let summary = serde_json::json!({
            "output": files.out.display().to_string(),
            "model": s.model,
            "modality": model.modality.name(),
            "session_id": run.started.session_id,
            "generation_id": c.generation_id,
            "width": width,
            "height": height,
            "format": format,
            "num_frames": c.video.as_ref().map(|v| v.num_frames),
            "fps": c.video.as_ref().map(|v| v.fps),
            "use_dynamic_cfg": s.use_dynamic_cfg,
            "frames": files.frames,
            "frames_dir": files.frames_dir.map(|dir| dir.display().to_string()),
            "seed": s.seed,
            "steps": c.steps,
            "cache": s.cache.to_string(),
            "full_compute_steps": c.full_compute_steps,
            "cache_hit_ratio": c.cache_hit_ratio,
            "estimated_flops_saved": c.estimated_flops_saved,
            "estimated_flops_total": c.estimated_flops_total,
            "wall_ms": wall.as_secs_f64() * 1e3,
            "setup_ms": run.started.setup_time.as_secs_f64() * 1e3,
            "total_ms": c.total_time.as_secs_f64() * 1e3,
            "denoise_ms": c.denoise_time.as_secs_f64() * 1e3,
            "decode_ms": c.decode_time.as_secs_f64() * 1e3,
            "previews": run.previews,
            "preview_dir": files.previews.map(|dir| dir.display().to_string()),
            "calibrated_mag_ratios": c.calibrated_mag_ratios,
        });
        println!("{summary}");
        return;
    }
    let frames = c.video.as_ref().map_or(String::new(), |v| {
        format!(
            ", {} frames at {} fps, {:.2} s",
            v.num_frames,
            v.fps,
            v.duration().as_secs_f64()
        )
    });
    println!(
        "wrote {} ({width}x{height} {format}{frames})",
        files.out.display()
    );
    println!(
        "model {}, seed {}, {} steps, cache {}{}",
        s.model,
        s.seed,
        c.steps,
        s.cache,
        if s.use_dynamic_cfg {
            ", dynamic CFG"
        } else {
            ""
        }
    );
    println!(
        "wall time {:.2} s (server {:.2} s: setup {:.2} s, denoise {:.2} s, decode {:.2} s)",
        wall.as_secs_f64(),
        c.total_time.as_secs_f64(),
        run.started.setup_time.as_secs_f64(),
        c.denoise_time.as_secs_f64(),
        c.decode_time.as_secs_f64()
    );
    println!(
        "full-compute steps {}/{}, cache hit ratio {:.1}%",
        c.full_compute_steps,
        c.steps,
        100.0 * c.cache_hit_ratio
    );
    println!(
        "estimated FLOPs saved {:.3e} of {:.3e} ({:.1}%)",
        c.estimated_flops_saved,
        c.estimated_flops_total,
        100.0 * c.flops_saved_fraction()
    );
    if let Some(dir) = files.previews {
        println!("{} previews in {}", run.previews, dir.display());
    }
    if let Some(dir) = files.frames_dir {
        println!("{} frames in {}", files.frames, dir.display());
    }
    if !c.calibrated_mag_ratios.is_empty() {
        let ratios: Vec<String> = c.calibrated_mag_ratios.iter().map(f32::to_string).collect();
        println!("calibrated mag_ratios={}", ratios.join("/"));
    }
}

fn print_models(models: &[ModelInfo]) {
    let rows = models
        .iter()
        .map(|m| {
            let caches: Vec<&str> = m.supported_caches.iter().map(|k| k.name()).collect();
            // Video models: default frames (allowed range, 1 + step·k) and default frame rate.
            let frames = m.video.as_ref().map_or("-".to_owned(), |v| {
                format!(
                    "{} ({}..={}, 1+{}k) {} fps",
                    v.default_num_frames,
                    v.num_frames.start(),
                    v.num_frames.end(),
                    v.num_frames_step,
                    v.default_fps
                )
            });
            vec![
                m.name.clone(),
                format!("{}/{}", m.family, m.variant),
                m.modality.name().to_owned(),
                format!(
                    "{}x{} ({}..={}, /{})",
                    m.default_width,
                    m.default_height,
                    m.size.start(),
                    m.size.end(),
                    m.size_multiple
                ),
                frames,
                format!(
                    "{} ({}..={})",
                    m.default_steps,
                    m.steps.start(),
                    m.steps.end()
                ),
                format!(
                    "{} ({}..={})",
                    m.default_guidance,
                    m.guidance.start(),
                    m.guidance.end()
                ),
                format!("{} {}", m.dtype, m.device),
                m.num_blocks.to_string(),
                caches.join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "MODEL",
            "TYPE",
            "SIZE",
            "FRAMES",
            "STEPS",
            "GUIDANCE",
            "DTYPE/DEVICE",
            "BLOCKS",
            "CACHES",
        ],
        rows,
    );
}

fn print_sessions(sessions: &[SessionInfo]) {
    let rows = sessions
        .iter()
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                s.id.clone(),
                s.model.clone(),
                s.cache.to_string(),
                format_bytes(s.cache_state_bytes),
                s.generations_run.to_string(),
                if s.generating { "generating" } else { "idle" }.to_owned(),
                format!("{}s", s.idle_timeout.as_secs()),
                labels.join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "MODEL",
            "CACHE",
            "CACHE STATE",
            "RUNS",
            "STATE",
            "IDLE TIMEOUT",
            "LABELS",
        ],
        rows,
    );
}

async fn session_command(client: &Client, args: SessionArgs) -> anyhow::Result<()> {
    let json = args.json;
    match args.command {
        SessionCommand::Create {
            model,
            cache,
            idle_timeout,
            labels,
        } => {
            let mut builder = client.create_session(model).cache(cache);
            if let Some(seconds) = idle_timeout {
                builder = builder.idle_timeout(Duration::from_secs(seconds));
            }
            for (key, value) in labels {
                builder = builder.label(key, value);
            }
            let session = builder.await?;
            if json {
                print_session(&session.info().await?, true);
            } else {
                println!("{}", session.id());
            }
        }
        SessionCommand::Get { id } => print_session(&client.session(id).info().await?, json),
        SessionCommand::SetCache { id, cache } => {
            print_session(&client.session(id).set_cache(cache).await?, json)
        }
        SessionCommand::Reset { id } => {
            print_session(&client.session(id).reset_cache().await?, json)
        }
        SessionCommand::Cancel { id } => {
            let cancelled = client.session(id.as_str()).cancel().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"session_id": id, "cancelled": cancelled})
                );
            } else if cancelled {
                println!("session {id}: generation cancelled");
            } else {
                println!("session {id}: no generation running");
            }
        }
        SessionCommand::Close { id } => {
            let freed = client.session(id.as_str()).close().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"session_id": id, "freed_cache_bytes": freed})
                );
            } else {
                println!(
                    "session {id}: closed, {} of cache freed",
                    format_bytes(freed)
                );
            }
        }
    }
    Ok(())
}

/// One session as one line, or as a JSON object (times in seconds since the Unix epoch).
fn print_session(s: &SessionInfo, json: bool) {
    if json {
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
        };
        let info = serde_json::json!({
            "session_id": s.id,
            "model": s.model,
            "cache": s.cache.to_string(),
            "cache_state_bytes": s.cache_state_bytes,
            "generations_run": s.generations_run,
            "generating": s.generating,
            "created_at": unix(s.created_at),
            "last_activity": unix(s.last_activity),
            "idle_timeout_s": s.idle_timeout.as_secs(),
            "labels": s.labels,
        });
        println!("{info}");
        return;
    }
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "session {}: model {}, cache {}, {}, {} runs, cache state {}, idle timeout {}s{}",
        s.id,
        s.model,
        s.cache,
        if s.generating { "generating" } else { "idle" },
        s.generations_run,
        format_bytes(s.cache_state_bytes),
        s.idle_timeout.as_secs(),
        if labels.is_empty() {
            String::new()
        } else {
            format!(", labels {}", labels.join(","))
        }
    );
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
