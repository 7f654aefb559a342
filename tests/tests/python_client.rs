//! "Any language": a Python client generated with grpcio-tools from the same .proto runs a
//! generation against the server.
use std::time::Duration;

use denoised_tests::{python, repo_root, TestServer, MODEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_generates() {
    let server = TestServer::start().await;
    let script = repo_root().join("tests/python/client_smoke.py");
    let run = tokio::process::Command::new(python())
        .arg(&script)
        .arg("--server")
        .arg(server.running.addr.to_string())
        .arg("--model")
        .arg(MODEL)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("python client finished within 3 minutes")
        .expect("python client started");
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "python client failed\n{text}");
    println!("{text}");
    server.stop().await;
}
