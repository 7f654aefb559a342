//! Graceful shutdown of the `denoised` process: SIGTERM turns health NOT_SERVING and refuses new
//! calls at once, lets running generations finish within the grace period, ends them cleanly
//! after it, and exits 0 even when a client stopped reading.
use std::time::{Duration, Instant};

use denoised_client::{CacheConfig, Client, Event, GenerateRequest};
use denoised_tests::{repo_root, server_binary, ServerProcess, MODEL};
use futures::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn request(steps: u32) -> GenerateRequest {
    GenerateRequest::new("a red circle at the top left")
        .size(32, 24)
        .steps(steps)
        .seed(1)
}

async fn health(url: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: "denoised.v1.Denoiser".into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

/// Reads until the first step.
async fn first_step(stream: &mut denoised_client::GenerationStream) {
    while let Some(event) = stream.next().await {
        if let Event::Step(_) = event.unwrap() {
            return;
        }
    }
    panic!("the stream ended before its first step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_generations_complete_then_exits_0() {
    let mut server = ServerProcess::spawn(
        &server_binary(),
        &repo_root(),
        &["--shutdown-grace-secs", "60"],
    );
    let url = server.url();
    assert_eq!(health(&url).await, ServingStatus::Serving);
    let client = Client::connect(url.clone()).await.unwrap();
    let session = client.create_session(MODEL).await.unwrap();
    let mut stream = session.generate(request(400)).await.unwrap();
    first_step(&mut stream).await;

    server.signal("TERM");
    // At once: health says NOT_SERVING and new calls are refused.
    let start = Instant::now();
    while health(&url).await != ServingStatus::NotServing {
        assert!(start.elapsed() < Duration::from_secs(2), "still SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = client.list_models().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    let err = client
        .generate_once(MODEL, CacheConfig::None, request(2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");

    // The running generation finishes within the grace period.
    let mut completed = false;
    while let Some(event) = stream.next().await {
        if let Event::Completed(_) = event.expect("no error while draining") {
            completed = true;
        }
    }
    assert!(completed);
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_streams_end_unavailable_and_slow_readers_do_not_hold_the_process() {
    let mut server = ServerProcess::spawn(
        &server_binary(),
        &repo_root(),
        &["--shutdown-grace-secs", "1"],
    );
    let client = Client::connect(server.url()).await.unwrap();
    let reader = client.create_session(MODEL).await.unwrap();
    let mut read = reader.generate(request(1000).size(128, 128)).await.unwrap();
    first_step(&mut read).await;
    // This client reads `Started` and then nothing more.
    let idle = client.create_session(MODEL).await.unwrap();
    let mut unread = idle.generate(request(1000).size(128, 128)).await.unwrap();
    assert!(matches!(unread.next().await, Some(Ok(Event::Started(_)))));

    let signalled = Instant::now();
    server.signal("TERM");
    let mut ended = None;
    while let Some(event) = read.next().await {
        if let Err(e) = event {
            ended = Some(e.code());
            break;
        }
    }
    assert_eq!(ended, Some(Code::Unavailable));
    let after = signalled.elapsed();
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_secs(10),
        "ended {after:?} after SIGTERM with a 1 s grace period"
    );
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "the process did not exit cleanly");
    drop(unread);
}
