//! Shared harness for the end-to-end tests: a real server on `127.0.0.1:0` serving a tiny FLUX
//! model that `make parity-data` builds with diffusers.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use denoised_server::config::{Config, ModelEntry};
use denoised_server::server::{self, RunningServer};

/// Name under which the test server serves the tiny model.
pub const MODEL: &str = "tiny";

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The project venv's interpreter (`make setup`), or the one `VIRTUAL_ENV` points at.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `make setup`",
        python.display()
    );
    python
}

/// The tiny random FLUX pipeline (diffusers layout) the parity data script writes.
pub fn tiny_model_dir() -> PathBuf {
    let data = std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/parity/data"));
    let dir = data.join(TINY_MODEL_FOLDER);
    assert!(
        dir.join("model_index.json").is_file(),
        "{} is missing: run `make parity-data` first",
        dir.display()
    );
    dir
}

const TINY_MODEL_FOLDER: &str = "schnell_like";

/// The tiny random CogVideoX pipeline (2b-style, diffusers layout) the parity data script writes.
pub fn tiny_video_model_dir() -> PathBuf {
    let data = std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/parity/data"));
    let dir = data.join("cogvideox_pipeline/tiny_2b");
    assert!(
        dir.join("model_index.json").is_file(),
        "{} is missing: run `make parity-data` first",
        dir.display()
    );
    dir
}

/// A server on a free loopback port, serving the tiny model on the CPU.
pub struct TestServer {
    pub running: RunningServer,
    pub url: String,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the default test config adjusted by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            models: vec![ModelEntry {
                name: MODEL.into(),
                path: tiny_model_dir(),
                max_sequence_length: Some(16),
                vae_tiling: false,
            }],
            device: "cpu".into(),
            dtype: "float32".into(),
            ..Config::default()
        };
        configure(&mut config);
        let running = server::start(config).await.expect("server starts");
        let url = format!("http://{}", running.addr);
        Self { running, url }
    }

    pub async fn stop(self) {
        self.running.shutdown().await.expect("clean shutdown");
    }
}

/// The `denoised-cli` binary of this checkout, built by cargo if it is missing or stale.
///
/// A package's tests only get its own binaries, so this asks cargo for the client's, with the
/// profile of this test and the features `cargo test --workspace` resolves (by building the
/// client's `cli` test, which needs the binary): under that command, as in `make test`, there
/// is nothing left to build.
pub fn cli_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_cli).clone()
}

fn build_cli() -> PathBuf {
    // This test runs from target/<profile dir>/deps/.
    let exe = std::env::current_exe().expect("the test's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
        .expect("target/<profile>/deps/<test>");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(repo_root()).args([
        "test",
        "--workspace",
        "--no-run",
        "--test",
        "cli",
        "--message-format=json",
    ]);
    match profile {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let output = cargo.output().expect("run cargo");
    assert!(
        output.status.success(),
        "building denoised-cli failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "denoised-cli")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the denoised-cli executable")
}
