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
                admission_budget: None,
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
pub fn cli_binary() -> PathBuf {
    workspace_binaries().cli.clone()
}

/// The `denoised` server binary of this checkout, built by cargo if it is missing or stale.
pub fn server_binary() -> PathBuf {
    workspace_binaries().server.clone()
}

struct Binaries {
    server: PathBuf,
    cli: PathBuf,
}

/// A package's tests only get its own binaries, so this asks cargo for the client's and the
/// server's, with the profile of this test and the features `cargo test --workspace` resolves (by
/// building tests that need them: the client's `cli`, the server's `parity_flux`): under that
/// command, as in `make test`, there is nothing left to build.
fn workspace_binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(build_binaries)
}

fn build_binaries() -> Binaries {
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
        "--test",
        "parity_flux",
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
        "building the workspace binaries failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let executable = |name: &str| {
        messages
            .iter()
            .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
            .and_then(|m| m["executable"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| panic!("cargo reports the {name} executable"))
    };
    Binaries {
        server: executable("denoised"),
        cli: executable("denoised-cli"),
    }
}

/// A `denoised` server process on a free loopback port, serving the tiny model; killed when
/// dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl ServerProcess {
    /// Starts `binary` from `cwd` with an empty environment and `extra` arguments, and waits (30 s
    /// at most) until it logs where it listens.
    pub fn spawn(binary: &Path, cwd: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .current_dir(cwd)
            .env_clear()
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .args(["--listen", "127.0.0.1:0", "--device", "cpu", "--model"])
            .arg(format!("{MODEL}={}", tiny_model_dir().display()))
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the server starts");
        let addr = listening_address(child.stderr.take().expect("piped stderr"));
        Self { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `signal` (e.g. `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit code (`None`: still running).
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the server's log until it says where it listens; keeps draining it after (and echoes
/// its warnings and errors, for test output).
fn listening_address(stderr: std::process::ChildStderr) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("denoised listening") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line.clone());
                }
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("server: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the server reports its address within 30 s");
    let at = line.find("127.0.0.1:").expect("a loopback address");
    let addr: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    let _: std::net::SocketAddr = addr.parse().expect("an address");
    addr
}
