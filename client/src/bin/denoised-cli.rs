//! `denoised-cli`: list models and sessions, and run generations with a progress bar.
//! A thin shell over `denoised_client`; it only parses arguments and formats output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use denoised_client::{
    CacheConfig, Client, Completed, Event, GenerateRequest, GenerationStream, ImageFormat,
    ModelInfo, Preview, SessionInfo, Started, TraceParent,
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
    /// Generate an image.
    Generate(Box<GenerateArgs>),
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
    /// Embedded guidance scale.
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
    /// Output image; `.png`, `.jpg` or `.jpeg` selects the format.
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Print one JSON object with the summary instead of text and a progress bar.
    #[arg(long)]
    json: bool,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
        Command::Generate(args) => generate(&client, *args).await?,
    }
    Ok(())
}

async fn generate(client: &Client, args: GenerateArgs) -> anyhow::Result<()> {
    let out_format = match args.out.extension().and_then(|e| e.to_str()) {
        None => ImageFormat::Png,
        Some(ext) => ImageFormat::from_extension(ext)
            .with_context(|| format!("--out {}: use .png, .jpg or .jpeg", args.out.display()))?,
    };
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

    let mut request = GenerateRequest::new(args.prompt).output_format(out_format);
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

    let wall = Instant::now();
    let session = args.session.map(|id| client.session(id));
    let stream = match (&session, args.model) {
        (Some(session), _) => session.generate(request).await?,
        (None, Some(model)) => client.generate_once(model, args.cache, request).await?,
        (None, None) => unreachable!("clap requires --model or --session"),
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
    let run = tokio::select! {
        run = drive(stream, &progress, preview_dir) => run?,
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
    run.completed
        .image
        .save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    print_summary(&run, &args.out, preview_dir, wall.elapsed(), args.json);
    Ok(())
}

/// What a finished generation stream produced.
struct Run {
    started: Started,
    completed: Completed,
    previews: u32,
}

async fn drive(
    mut stream: GenerationStream,
    progress: &ProgressBar,
    preview_dir: Option<&Path>,
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

fn print_summary(run: &Run, out: &Path, previews: Option<&Path>, wall: Duration, json: bool) {
    let (s, c) = (&run.started.settings, &run.completed);
    if json {
        let summary = serde_json::json!({
            "output": out.display().to_string(),
            "model": s.model,
            "session_id": run.started.session_id,
            "generation_id": c.generation_id,
            "width": c.image.width,
            "height": c.image.height,
            "format": c.image.format.to_string(),
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
            "preview_dir": previews.map(|dir| dir.display().to_string()),
            "calibrated_mag_ratios": c.calibrated_mag_ratios,
        });
        println!("{summary}");
        return;
    }
    println!(
        "wrote {} ({}x{} {})",
        out.display(),
        c.image.width,
        c.image.height,
        c.image.format
    );
    println!(
        "model {}, seed {}, {} steps, cache {}",
        s.model, s.seed, c.steps, s.cache
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
    if let Some(dir) = previews {
        println!("{} previews in {}", run.previews, dir.display());
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
            vec![
                m.name.clone(),
                format!("{}/{}", m.family, m.variant),
                format!(
                    "{}x{} ({}..={}, /{})",
                    m.default_width,
                    m.default_height,
                    m.size.start(),
                    m.size.end(),
                    m.size_multiple
                ),
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
            "SIZE",
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
