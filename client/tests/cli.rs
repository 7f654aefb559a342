//! `denoised-cli` end to end against the in-process mock server.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::VIDEO_BYTES;
use denoised_client::proto as v1;

/// Runs the CLI in `cwd` (default: the test's). `RUST_BACKTRACE` is set because errors must
/// stay one line even then.
fn cli(args: Vec<String>, cwd: Option<PathBuf>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_denoised-cli"));
    command
        .args(args)
        .env_remove("DENOISED_SERVER")
        .env_remove("TRACEPARENT")
        .env("RUST_BACKTRACE", "1");
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    command.output().expect("run denoised-cli")
}

/// Runs the CLI in `cwd` off the runtime's worker threads, so the mock server keeps serving.
async fn run_in(cwd: Option<&Path>, url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--server".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    let cwd = cwd.map(Path::to_owned);
    tokio::task::spawn_blocking(move || cli(all, cwd))
        .await
        .unwrap()
}

async fn run(url: &str, args: &[&str]) -> Output {
    run_in(None, url, args).await
}

/// The stderr of a failed run, checked to be one line.
fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("denoised-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_json_summary_and_tables() {
    let (mock, url) = common::serve().await;
    let dir = temp_dir("image");
    let out = dir.join("fox.png");

    let output = run(
        &url,
        &[
            "--traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "generate",
            "--model",
            "mock",
            "--prompt",
            "a fox",
            "--seed",
            "3",
            "--cache",
            "taylorseer:interval=5,order=1",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["seed"], 3);
    assert_eq!(summary["steps"], 4);
    assert_eq!(summary["full_compute_steps"], 4);
    assert_eq!(summary["format"], "png");
    assert!(image::open(&out).is_ok());
    assert_eq!(summary["modality"], "image");
    assert_eq!(summary["num_frames"], serde_json::Value::Null);
    {
        // Both calls carry it: ListModels (for the model's modality), then Generate.
        let state = mock.0.lock().unwrap();
        assert_eq!(state.traceparents.len(), 2);
        let request = state.generate_requests.last().unwrap();
        assert_eq!(request.output_format, v1::ImageFormat::Png as i32);
        assert_eq!(request.video_format, v1::VideoFormat::Unspecified as i32);
    }

    let output = run(
        &url,
        &[
            "generate",
            "--model",
            "mock",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    println!("{text}");
    assert!(text.starts_with("wrote "), "{text}");
    assert!(text.contains("full-compute steps 4/4"), "{text}");

    // --events: a line per step before the summary.
    let output = run(
        &url,
        &[
            "generate",
            "--model",
            "mock",
            "--events",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines[..4].iter().enumerate() {
        assert!(line.starts_with(&format!("step {}/4: ", i + 1)), "{text}");
    }
    assert!(lines[4].starts_with("wrote "), "{text}");

    let output = run(&url, &["models"]).await;
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    println!("{table}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("none,taylorseer"), "{table}");
    let mock_row = table.lines().find(|l| l.starts_with("mock ")).unwrap();
    assert!(mock_row.contains(" image "), "{table}");

    let output = run(&url, &["sessions"]).await;
    assert!(output.status.success(), "{output:?}");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_fail_with_clear_messages() {
    let (_mock, url) = common::serve().await;
    let output = run(
        &url,
        &["generate", "--model", "mock", "--cache", "teacache"],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown cache strategy \"teacache\""),
        "{stderr}"
    );

    let output = run(&url, &["generate", "--model", "mock", "--out", "x.gif"]).await;
    let stderr = one_line_error(&output);
    assert!(stderr.contains("use .png, .jpg or .jpeg"), "{stderr}");

    let output = run(
        &url,
        &["generate", "--session", "unknown", "--out", "/dev/null.png"],
    )
    .await;
    let stderr = one_line_error(&output);
    assert!(stderr.contains("NotFound"), "{stderr}");

    let output = run(&url, &["generate", "--model", "nope"]).await;
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("the server has no model `nope` (it serves: mock, mock-video)"),
        "{stderr}"
    );

    // A chain of causes (connect error, transport error, OS error) still prints as one line.
    let output = tokio::task::spawn_blocking(|| {
        cli(
            ["--server", "http://127.0.0.1:1", "models"]
                .map(String::from)
                .to_vec(),
            None,
        )
    })
    .await
    .unwrap();
    let stderr = one_line_error(&output);
    assert!(
        stderr.starts_with("error: cannot connect to http://127.0.0.1:1: "),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_video_writes_video_and_frames() {
    let (mock, url) = common::serve().await;
    let dir = temp_dir("video");
    let out = dir.join("clip.gif");
    let frames = dir.join("frames");
    let last_request = || mock.0.lock().unwrap().generate_requests.pop().unwrap();

    let output = run(
        &url,
        &[
            "generate",
            "--model",
            "mock-video",
            "--prompt",
            "waves",
            "--frames",
            "5",
            "--fps",
            "12",
            "--dynamic-cfg",
            "--frames-dir",
            frames.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["modality"], "video");
    assert_eq!(summary["format"], "gif");
    assert_eq!(summary["num_frames"], 5);
    assert_eq!(summary["fps"], 12);
    assert_eq!(summary["use_dynamic_cfg"], true);
    assert_eq!(summary["frames"], 5);
    assert_eq!(summary["frames_dir"], frames.to_str().unwrap());
    assert_eq!(summary["steps"], 4);
    assert_eq!(std::fs::read(&out).unwrap(), VIDEO_BYTES);
    for i in 0..5 {
        assert!(image::open(frames.join(format!("frame_{i:04}.png"))).is_ok());
    }
    assert!(!frames.join("frame_0005.png").exists());
    let request = last_request();
    assert_eq!(request.model, "mock-video");
    assert_eq!((request.num_frames, request.fps), (5, 12));
    assert_eq!(request.use_dynamic_cfg, Some(true));
    // The container follows the extension; frames stay in the default image format.
    assert_eq!(request.video_format, v1::VideoFormat::Gif as i32);
    assert_eq!(request.output_format, v1::ImageFormat::Unspecified as i32);
    assert!(request.return_frames);

    // No --out: `out.<format>` in the working directory, the format from --video-format.
    let output = run_in(
        Some(&dir),
        &url,
        &["generate", "--model", "mock-video", "--video-format", "gif"],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with("wrote out.gif (4x4 gif, 9 frames at 8 fps, 1.12 s)"),
        "{text}"
    );
    assert_eq!(std::fs::read(dir.join("out.gif")).unwrap(), VIDEO_BYTES);
    let request = last_request();
    assert_eq!(request.video_format, v1::VideoFormat::Gif as i32);
    assert_eq!((request.num_frames, request.fps), (0, 0));
    assert_eq!(request.use_dynamic_cfg, None);
    assert!(!request.return_frames);

    // An existing session: its model decides that a video comes back.
    let client = denoised_client::Client::connect(url.as_str())
        .await
        .unwrap();
    let session = client.create_session("mock-video").await.unwrap();
    let mp4 = dir.join("clip.mp4");
    let output = run(
        &url,
        &[
            "generate",
            "--session",
            session.id(),
            "--out",
            mp4.to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read(&mp4).unwrap(), VIDEO_BYTES);
    let request = last_request();
    assert_eq!(request.session_id, session.id());
    assert_eq!(request.video_format, v1::VideoFormat::Mp4 as i32);

    let output = run(&url, &["models"]).await;
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with("mock-video")).unwrap();
    assert!(row.contains(" video "), "{table}");
    assert!(row.contains("9 (1..=49, 1+4k) 8 fps"), "{table}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_arguments_fail_before_generating() {
    let (mock, url) = common::serve().await;
    let dir = temp_dir("video-errors");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    for (args, message) in [
        (
            vec!["--model", "mock-video", "--out", &path("x.png")],
            "model `mock-video` makes videos; use .mp4 or .gif",
        ),
        (
            vec![
                "--model",
                "mock-video",
                "--out",
                &path("x.mp4"),
                "--video-format",
                "gif",
            ],
            "--video-format gif does not match --out",
        ),
        (
            vec!["--model", "mock", "--video-format", "gif"],
            "--video-format: model `mock` makes images",
        ),
    ] {
        let output = run(&url, &[&["generate"], args.as_slice()].concat()).await;
        let stderr = one_line_error(&output);
        assert!(stderr.contains(message), "{stderr}");
    }
    assert!(mock.0.lock().unwrap().generate_requests.is_empty());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // The server's refusal (naming the field) also prints as one line.
    let output = run(&url, &["generate", "--model", "mock", "--frames", "9"]).await;
    let stderr = one_line_error(&output);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("`num_frames`"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
