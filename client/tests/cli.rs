//! `denoised-cli` end to end against the in-process mock server.
#![cfg(feature = "cli")]

mod common;

use std::process::{Command, Output};

fn cli(args: Vec<String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_denoised-cli"))
        .args(args)
        .env_remove("DENOISED_SERVER")
        .env_remove("TRACEPARENT")
        .output()
        .expect("run denoised-cli")
}

/// Runs the CLI off the runtime's worker threads, so the mock server keeps serving.
async fn run(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--server".to_owned(), url.to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || cli(all)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_json_summary_and_tables() {
    let (mock, url) = common::serve().await;
    let dir = std::env::temp_dir().join(format!("denoised-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
    assert_eq!(mock.0.lock().unwrap().traceparents.len(), 1);

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

    let output = run(&url, &["models"]).await;
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    println!("{table}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("none,taylorseer"), "{table}");

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

    let output = run(&url, &["generate", "--model", "mock", "--out", "x.webp"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("use .png, .jpg or .jpeg"), "{stderr}");

    let output = run(
        &url,
        &["generate", "--session", "unknown", "--out", "/dev/null.png"],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
}
