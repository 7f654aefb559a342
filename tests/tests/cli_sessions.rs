//! `denoised-cli` against a real server: the session commands, including a cache switch and a
//! cancel from a second shell while a `generate --events` runs in the first.
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use denoised_tests::{cli_binary, TestServer, MODEL};
use serde_json::Value;

/// Long enough that a switch from the second shell lands mid-generation however slow that shell
/// is: while the test runs it, the first shell's stdout pipe (64 KiB, about 260 step lines)
/// fills, and then its generation waits for it.
const STEPS: usize = 400;

struct Cli {
    url: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cli_binary());
        command
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .env_remove("DENOISED_SERVER")
            .env_remove("TRACEPARENT")
            // Errors must stay one line even then.
            .env("RUST_BACKTRACE", "1");
        command
    }

    /// Runs a command that must succeed and print one line; returns it.
    fn line(&self, args: &[&str]) -> String {
        let output = self.command(args).output().unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.lines().count(), 1, "{args:?}: {stdout}");
        stdout.trim_end().to_owned()
    }

    /// The same with `--json`: the one line is a JSON object.
    fn json(&self, args: &[&str]) -> Value {
        let line = self.line(&[args, &["--json"]].concat());
        serde_json::from_str(&line).unwrap()
    }

    /// Runs a command that must fail with a one-line error; returns it.
    fn error(&self, args: &[&str]) -> String {
        let output = self.command(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        one_line_error(&output.stderr)
    }

    /// Starts `generate --events --json` on `session`, its stdout read line by line.
    fn generate(&self, session: &str, out: &Path) -> (Child, BufReader<ChildStdout>) {
        let steps = STEPS.to_string();
        let mut child = self
            .command(&[
                "generate",
                "--session",
                session,
                "--prompt",
                "a red circle at the top left",
                "--width",
                "32",
                "--height",
                "24",
                "--steps",
                &steps,
                "--seed",
                "1",
                "--events",
                "--json",
                "--out",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        (child, stdout)
    }
}

fn one_line_error(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// The next line of a `generate --events --json` (a step, or the summary), `None` at the end.
fn next(stdout: &mut BufReader<ChildStdout>) -> Option<Value> {
    let mut line = String::new();
    if stdout.read_line(&mut line).unwrap() == 0 {
        return None;
    }
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
}

fn is_step(event: &Value) -> bool {
    event["event"] == "step"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_from_a_second_shell() {
    // A one-event buffer keeps the engine in step with the first shell's reading.
    let server = TestServer::start_with(|c| c.limits.stream_buffer = 1).await;
    let cli = Cli {
        url: server.url.clone(),
    };
    // The CLI processes block; the server keeps serving on the runtime's workers.
    tokio::task::spawn_blocking(move || drive(&cli))
        .await
        .unwrap();
    server.stop().await;
}

fn drive(cli: &Cli) {
    let dir = std::env::temp_dir().join(format!("denoised-cli-sessions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let id = cli.line(&[
        "session",
        "create",
        "--model",
        MODEL,
        "--idle-timeout",
        "120",
        "--label",
        "shell=first",
    ]);
    let info = cli.json(&["session", "get", &id]);
    assert_eq!(info["session_id"], id.as_str());
    assert_eq!(info["model"], MODEL);
    assert_eq!(info["cache"], "none");
    assert_eq!(info["generating"], false);
    assert_eq!(info["generations_run"], 0);
    assert_eq!(info["idle_timeout_s"], 120);
    assert_eq!(info["labels"]["shell"], "first");
    assert!(info["created_at"].as_f64().unwrap() > 1.6e9, "{info}");
    assert_eq!(
        cli.line(&["session", "get", &id]),
        format!(
            "session {id}: model {MODEL}, cache none, idle, 0 runs, cache state 0 B, \
             idle timeout 120s, labels shell=first"
        )
    );

    // First shell: a generation printing its steps. Second shell: switch its cache.
    let (mut first, mut events) = cli.generate(&id, &dir.join("switched.png"));
    let mut steps = Vec::new();
    while steps.len() < 2 {
        let event = next(&mut events).expect("a step");
        assert!(is_step(&event), "{event}");
        steps.push(event);
    }
    let read_before_switch = steps.len();
    let switched = cli.line(&[
        "session",
        "set-cache",
        &id,
        "--cache",
        "taylorseer:cache_interval=3,disable_cache_before_step=1",
    ]);
    // Resolved by the server, while the generation runs.
    assert!(
        switched.contains(", cache taylorseer:") && switched.contains("cache_interval=3"),
        "{switched}"
    );
    assert!(switched.contains(", generating, "), "{switched}");
    let summary = loop {
        let event = next(&mut events).expect("the summary");
        if !is_step(&event) {
            break event;
        }
        steps.push(event);
    };
    assert!(first.wait().unwrap().success());
    assert_eq!(steps.len(), STEPS);
    let indices: Vec<u64> = steps.iter().map(|s| s["index"].as_u64().unwrap()).collect();
    assert!(indices
        .iter()
        .enumerate()
        .all(|(i, &index)| index == i as u64));
    let switch = steps
        .iter()
        .position(|s| s["strategy_switched"] == true)
        .expect("a step reports the switch");
    assert_eq!(
        steps
            .iter()
            .filter(|s| s["strategy_switched"] == true)
            .count(),
        1
    );
    // After the steps the first shell had printed, and before the pipe's worth of steps ran out.
    assert!(
        switch >= read_before_switch && switch < STEPS * 3 / 4,
        "switched at step {switch}"
    );
    assert!(steps[..switch].iter().all(|s| s["strategy"] == "none"));
    assert!(steps[switch..]
        .iter()
        .all(|s| s["strategy"] == "taylorseer"));
    assert_eq!(steps[switch]["strategy_step"], 1);
    assert!(steps[switch + 1..]
        .iter()
        .any(|s| s["full_compute"] == false));
    assert_eq!(summary["steps"], STEPS);
    assert!(summary["full_compute_steps"].as_u64().unwrap() < STEPS as u64);

    let reset = cli.line(&["session", "reset", &id]);
    assert!(reset.contains(", cache taylorseer:"), "{reset}");
    assert!(reset.contains(", idle, 1 runs, "), "{reset}");

    // Cancel from the second shell: the first one's generation ends early, with one line.
    let (mut first, mut events) = cli.generate(&id, &dir.join("cancelled.png"));
    assert!(is_step(&next(&mut events).expect("a step")));
    assert_eq!(
        cli.line(&["session", "cancel", &id]),
        format!("session {id}: generation cancelled")
    );
    let mut seen = 1;
    while let Some(event) = next(&mut events) {
        assert!(
            is_step(&event),
            "a cancelled generation has no summary: {event}"
        );
        seen += 1;
    }
    assert!(seen < STEPS, "{seen} steps ran after the cancel");
    let mut stderr = Vec::new();
    first
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    assert!(!first.wait().unwrap().success());
    assert!(one_line_error(&stderr).contains("Cancelled"));
    let cancel = cli.json(&["session", "cancel", &id]);
    assert_eq!(
        cancel,
        serde_json::json!({"session_id": id, "cancelled": false})
    );
    assert_eq!(
        cli.line(&["session", "cancel", &id]),
        format!("session {id}: no generation running")
    );

    assert_eq!(
        cli.line(&["session", "close", &id]),
        format!("session {id}: closed, 0 B of cache freed")
    );
    assert!(cli.error(&["session", "get", &id]).contains("NotFound"));

    // The JSON forms, and the server's refusals as one line.
    let created = cli.json(&["session", "create", "--model", MODEL, "--cache", "fbc"]);
    let other = created["session_id"].as_str().unwrap().to_owned();
    assert!(created["cache"]
        .as_str()
        .unwrap()
        .starts_with("fbc:threshold="));
    let err = cli.error(&[
        "session",
        "set-cache",
        &other,
        "--cache",
        "taylorseer:cache_interval=0",
    ]);
    assert!(
        err.contains("InvalidArgument") && err.contains("cache.taylor_seer.cache_interval"),
        "{err}"
    );
    assert!(cli
        .error(&["session", "create", "--model", "no-such-model"])
        .contains("NotFound"));
    let closed = cli.json(&["session", "close", &other]);
    assert_eq!(closed["freed_cache_bytes"], 0);
    std::fs::remove_dir_all(dir).unwrap();
}
