//! Server configuration: defaults, overridden by an optional TOML file, overridden by CLI flags.
//! All limits live here, in one place.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Command-line flags of `denoised`. Each one overrides the same key of the TOML file.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "denoised",
    version,
    about = "Diffusion transformers with step caching, over gRPC"
)]
pub struct Args {
    /// TOML configuration file (keys as in `deploy/denoised.toml`).
    #[arg(long, env = "DENOISED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "DENOISED_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A model to serve, as `name=path/to/diffusers/folder`. Repeatable.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// `auto` (cuda:0 when available, else cpu), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "DENOISED_DEVICE")]
    pub device: Option<String>,
    /// Run dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16`, `float16`.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Skip models that fail to load (logged) instead of refusing to start.
    #[arg(long)]
    pub skip_bad_models: bool,
    /// Maximum number of open sessions.
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// On SIGTERM / SIGINT: seconds running generations get to finish before they are cancelled.
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub models: Vec<ModelEntry>,
    pub device: String,
    pub dtype: String,
    pub skip_bad_models: bool,
    /// On SIGTERM / SIGINT: health turns NOT_SERVING and new calls are refused at once; running
    /// generations get this long to finish, then they are cancelled.
    pub shutdown_grace_secs: u64,
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    /// T5 token budget for prompts (FluxPipeline's `max_sequence_length`).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// Video models: decode in overlapping tiles (diffusers' `vae.enable_tiling()` defaults), for
    /// large frames in less memory; pixels near the seams differ slightly from an untiled decode.
    #[serde(default)]
    pub vae_tiling: bool,
    /// This model's admission budget in pixel-steps (default: `limits.admission_budget`).
    #[serde(default)]
    pub admission_budget: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_sessions: usize,
    /// Generations running at once, over all sessions and models.
    pub max_active_generations: usize,
    /// Generations waiting for admission beyond those; when the queue is full, `Generate` is
    /// refused with RESOURCE_EXHAUSTED.
    pub max_queued_generations: usize,
    /// Work admitted at once per model, in pixel-steps (width × height × frames × steps summed
    /// over its running generations); a request that does not fit waits in the queue. A request
    /// larger than the whole budget runs alone. Per model: `[[models]] admission_budget`.
    pub admission_budget: u64,
    pub default_idle_timeout_secs: u64,
    pub max_idle_timeout_secs: u64,
    /// How often idle sessions are looked for.
    pub eviction_interval_ms: u64,
    pub max_image_edge: u32,
    pub max_steps: u32,
    pub max_prompt_chars: usize,
    pub max_guidance: f32,
    pub max_labels: usize,
    /// Bytes of one label key, of one label value, and of all of a session's keys and values.
    pub max_label_key_bytes: usize,
    pub max_label_value_bytes: usize,
    pub max_labels_bytes: usize,
    /// TaylorSeer module patterns per list, and bytes per pattern: each is compiled on the engine
    /// thread at every start, switch and reset.
    pub max_cache_patterns: usize,
    pub max_cache_pattern_bytes: usize,
    /// Most frames of one video.
    pub max_video_frames: u32,
    /// Most pixels of one video (frames × width × height): bounds the VAE decode's memory.
    pub max_video_pixels: u64,
    /// Events buffered per stream before that generation pauses (backpressure on slow readers).
    pub stream_buffer: usize,
    /// A generation whose client has read nothing for this long, with its buffer full, is
    /// cancelled and its session and engine slot freed.
    pub stalled_stream_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 256,
            max_active_generations: 16,
            max_queued_generations: 64,
            // Four 1024x1024 images of 28 steps.
            admission_budget: 4 * 1024 * 1024 * 28,
            default_idle_timeout_secs: 600,
            max_idle_timeout_secs: 24 * 3600,
            eviction_interval_ms: 1000,
            max_image_edge: 2048,
            max_steps: 1000,
            max_prompt_chars: 8192,
            max_guidance: 100.0,
            max_labels: 32,
            max_label_key_bytes: 128,
            max_label_value_bytes: 1024,
            max_labels_bytes: 16 * 1024,
            max_cache_patterns: 64,
            max_cache_pattern_bytes: 256,
            max_video_frames: 129,
            // Twice CogVideoX's 49 frames at 480×720.
            max_video_pixels: 2 * 49 * 480 * 720,
            stream_buffer: 32,
            stalled_stream_timeout_secs: 60,
        }
    }
}

impl Limits {
    pub fn default_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.default_idle_timeout_secs)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().expect("valid default address"),
            models: default_models(),
            device: "auto".into(),
            dtype: "auto".into(),
            skip_bad_models: false,
            shutdown_grace_secs: 30,
            limits: Limits::default(),
        }
    }
}

/// The repository's own model (`models/default`), when it is there.
fn default_models() -> Vec<ModelEntry> {
    let candidates = [
        std::env::var_os("DENOISED_DEFAULT_MODEL").map(PathBuf::from),
        Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/default"
        ))),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("model_index.json").is_file())
        .map(|path| ModelEntry {
            name: "default".into(),
            path,
            max_sequence_length: None,
            vae_tiling: false,
            admission_budget: None,
        })
        .into_iter()
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("--model `{0}`: expected NAME=PATH")]
    ModelFlag(String),
    #[error("model name `{0}` is used twice")]
    DuplicateModel(String),
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if !args.models.is_empty() {
            config.models = args
                .models
                .iter()
                .map(|m| parse_model_flag(m))
                .collect::<Result<_, _>>()?;
        }
        if let Some(device) = &args.device {
            config.device = device.clone();
        }
        if let Some(dtype) = &args.dtype {
            config.dtype = dtype.clone();
        }
        config.skip_bad_models |= args.skip_bad_models;
        if let Some(n) = args.max_sessions {
            config.limits.max_sessions = n;
        }
        if let Some(secs) = args.shutdown_grace_secs {
            config.shutdown_grace_secs = secs;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(&m.name) {
                return Err(ConfigError::DuplicateModel(m.name.clone()));
            }
        }
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.into(),
        };
        let l = &self.limits;
        if l.max_sessions == 0 {
            return Err(invalid("limits.max_sessions", "must be at least 1"));
        }
        if l.stalled_stream_timeout_secs == 0 {
            return Err(invalid(
                "limits.stalled_stream_timeout_secs",
                "must be at least 1",
            ));
        }
        if l.max_active_generations == 0 {
            return Err(invalid(
                "limits.max_active_generations",
                "must be at least 1",
            ));
        }
        if l.stream_buffer == 0 {
            return Err(invalid("limits.stream_buffer", "must be at least 1"));
        }
        if l.max_steps == 0 {
            return Err(invalid("limits.max_steps", "must be at least 1"));
        }
        if l.max_video_frames == 0 || l.max_video_pixels == 0 {
            return Err(invalid(
                "limits.max_video_frames",
                "max_video_frames and max_video_pixels must be at least 1",
            ));
        }
        if l.default_idle_timeout_secs == 0 || l.default_idle_timeout_secs > l.max_idle_timeout_secs
        {
            return Err(invalid(
                "limits.default_idle_timeout_secs",
                "must be positive and at most limits.max_idle_timeout_secs",
            ));
        }
        Ok(())
    }
}

fn parse_model_flag(flag: &str) -> Result<ModelEntry, ConfigError> {
    match flag.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(ModelEntry {
            name: name.to_owned(),
            path: PathBuf::from(path),
            max_sequence_length: None,
            vae_tiling: false,
            admission_budget: None,
        }),
        _ => Err(ConfigError::ModelFlag(flag.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_overrides_file_and_models_parse() {
        let dir = std::env::temp_dir().join(format!("denoised-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:7000\"\ndevice = \"cpu\"\n[limits]\nmax_sessions = 3\n[[models]]\nname = \"a\"\npath = \"/m/a\"\n",
        )
        .unwrap();
        let args = Args {
            config: Some(file),
            models: vec!["b=/m/b".into()],
            max_sessions: Some(5),
            ..Args::default()
        };
        let c = Config::from_args(&args).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.limits.max_sessions, 5);
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].name, "b");
        assert_eq!(c.device, "cpu");
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/denoised.toml"
        ));
        let c = Config::from_file(path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.models[0].name, "default");
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(
            parse_model_flag("nopath"),
            Err(ConfigError::ModelFlag(_))
        ));
        let mut c = Config::default();
        c.limits.max_sessions = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.max_sessions"));
        let bad: Result<Config, _> = toml::from_str("unknown_key = 1");
        assert!(bad.is_err());
    }
}
