//! Defects found under load and with hostile input, each reproduced against the server as a
//! client sees it (a real server on 127.0.0.1:0, the client crate or the raw proto client).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use denoised_client::proto::{self as pb, denoiser_client::DenoiserClient};
use denoised_client::{
    CacheConfig, Client, Error, Event, GenerateRequest, GenerationStream, MagCacheConfig, Preview,
};
use denoised_tests::{TestServer, MODEL};
use futures::StreamExt;
use tonic::Code;

fn request(steps: u32, seed: u64) -> GenerateRequest {
    GenerateRequest::new("a red circle at the top left")
        .size(32, 24)
        .steps(steps)
        .seed(seed)
}

/// A request whose every step carries a decoded 256x256 PNG preview (~190 KB of noise): a
/// client that does not read fills the transport's windows (a few MB) within a few dozen steps,
/// after which the generation waits for it.
fn heavy(steps: u32, seed: u64) -> GenerateRequest {
    request(steps, seed)
        .size(256, 256)
        .preview(Preview::full_decode().png())
}

/// Reads a stream to its end: the number of steps seen and the error it ended with, if any.
async fn drain(mut stream: GenerationStream) -> (usize, Option<Error>) {
    let mut steps = 0;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Step(_)) => steps += 1,
            Ok(_) => {}
            Err(e) => return (steps, Some(e)),
        }
    }
    (steps, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_free_as_soon_as_its_client_sees_the_end() {
    let server = TestServer::start_with(|c| c.limits.stream_buffer = 1).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let session = client.create_session(MODEL).await.unwrap();
    // Racy before the fix: the final status went out before the session was released.
    for round in 0..10 {
        let mut stream = session.generate(request(200, round)).await.unwrap();
        let mut ended = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Step(s)) if s.index == 1 => assert!(session.cancel().await.unwrap()),
                Ok(_) => {}
                Err(e) => {
                    ended = Some(e.code());
                    break;
                }
            }
        }
        assert_eq!(ended, Some(Code::Cancelled));
        // No waiting: the end was observed, so the session is already free.
        assert!(
            !session.cancel().await.unwrap(),
            "round {round}: still cancellable"
        );
        let info = session.info().await.unwrap();
        assert!(!info.generating, "round {round}: still generating");
        let (_, error) = drain(session.generate(request(1, round)).await.unwrap()).await;
        assert!(error.is_none(), "round {round}: {error:?}");
    }
    // Ephemeral sessions are gone once their client sees the end, however it ended: cancelled by
    // a deadline, failed, or completed.
    let mut raw = DenoiserClient::connect(server.url.clone()).await.unwrap();
    for (steps, timeout, want) in [
        (
            500,
            Some(Duration::from_millis(300)),
            Some(Code::DeadlineExceeded),
        ),
        (2, None, None),
    ] {
        let mut req = tonic::Request::new(pb::GenerateRequest {
            model: MODEL.into(),
            prompt: "a red circle".into(),
            width: 32,
            height: 24,
            steps,
            seed: Some(1),
            ..Default::default()
        });
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        let mut stream = raw.generate(req).await.unwrap().into_inner();
        let mut ended = None;
        while let Some(event) = stream.next().await {
            if let Err(status) = event {
                ended = Some(status.code());
                break;
            }
        }
        assert_eq!(ended, want);
        assert!(
            client.list_sessions().await.unwrap().len() == 1,
            "an ephemeral session outlived its stream"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_honours_the_call_deadline() {
    let server = TestServer::start().await;
    let mut raw = DenoiserClient::connect(server.url.clone()).await.unwrap();
    let mut req = tonic::Request::new(pb::GenerateRequest {
        model: MODEL.into(),
        prompt: "a red circle".into(),
        width: 256,
        height: 256,
        steps: 1000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let mut stream = raw.generate(req).await.unwrap().into_inner();
    let mut status = None;
    while let Some(event) = stream.next().await {
        if let Err(s) = event {
            status = Some(s);
            break;
        }
    }
    let status = status.expect("a 1000-step generation cannot finish in 500 ms");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Ended at the deadline (within a step or two), not when the generation would have.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_slot() {
    let server = TestServer::start_with(|c| {
        c.limits.max_active_generations = 2;
        c.limits.max_queued_generations = 0;
        c.limits.stream_buffer = 2;
        c.limits.stalled_stream_timeout_secs = 1;
    })
    .await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    // Two clients read `Started` only and then hold their streams without reading.
    let mut held = Vec::new();
    for seed in 0..2 {
        let mut stream = client
            .generate_once(MODEL, CacheConfig::None, heavy(500, seed))
            .await
            .unwrap();
        assert!(matches!(stream.next().await, Some(Ok(Event::Started(_)))));
        held.push(stream);
    }
    let err = client
        .generate_once(MODEL, CacheConfig::None, request(2, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Once their buffers are full, within the stall timeout (1 s) and a step, both are
    // cancelled and their state freed.
    let start = Instant::now();
    loop {
        if client.list_sessions().await.unwrap().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stalled generations kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, error) = drain(
        client
            .generate_once(MODEL, CacheConfig::None, request(2, 3))
            .await
            .unwrap(),
    )
    .await;
    assert!(error.is_none(), "{error:?}");
    // A stalled client that reads again finds the steps buffered for it, then the reason.
    let (steps, error) = drain(held.remove(0)).await;
    assert!(steps < 500, "the generation ran to its end ({steps} steps)");
    assert_eq!(error.map(|e| e.code()), Some(Code::DeadlineExceeded));
    println!("stalled client: {steps} steps were buffered before the generation stopped");
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_like_fields_are_bounded_and_echoes_truncated() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let session = client.create_session(MODEL).await.unwrap();
    // Once allocated ~16 GiB on the engine thread and stalled every stream for 70 s.
    let huge = CacheConfig::MagCache(MagCacheConfig {
        mag_ratios: vec![1.0],
        num_inference_steps: Some(u32::MAX),
        ..Default::default()
    });
    let started = Instant::now();
    let err = session.set_cache(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("num_inference_steps"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let patterns = CacheConfig::parse("taylorseer").unwrap();
    let CacheConfig::TaylorSeer(mut taylor) = patterns else {
        unreachable!()
    };
    taylor.cache_identifiers = vec!["transformer_blocks\\.\\d+\\.attn".into(); 2000];
    let err = session
        .set_cache(CacheConfig::TaylorSeer(taylor))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // A 5 MiB label is refused; ListSessions keeps working for everyone.
    let err = client
        .create_session(MODEL)
        .label("notes", "x".repeat(5 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("labels[notes]"), "{err}");
    assert_eq!(client.list_sessions().await.unwrap().len(), 1);

    // Huge ids and names: NOT_FOUND with a short message, not a status too large to send.
    let mut raw = DenoiserClient::connect(server.url.clone()).await.unwrap();
    let id = "x".repeat(100_000);
    let statuses = [
        raw.get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .map(|_| ()),
        raw.close_session(pb::CloseSessionRequest {
            session_id: id.clone(),
        })
        .await
        .map(|_| ()),
        raw.reset_cache(pb::ResetCacheRequest {
            session_id: id.clone(),
        })
        .await
        .map(|_| ()),
        raw.cancel_generation(pb::CancelGenerationRequest {
            session_id: id.clone(),
        })
        .await
        .map(|_| ()),
        raw.set_cache_strategy(pb::SetCacheStrategyRequest {
            session_id: id.clone(),
            cache: None,
        })
        .await
        .map(|_| ()),
        raw.create_session(pb::CreateSessionRequest {
            model: "m".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        raw.generate(pb::GenerateRequest {
            session_id: id.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for status in statuses {
        let status = status.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{:.200}", status.message());
        assert!(status.message().len() < 200, "{:.200}", status.message());
    }
    let labels: HashMap<_, _> = client.list_sessions().await.unwrap()[0]
        .labels
        .clone()
        .into_iter()
        .collect();
    assert!(labels.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_budget_wait_in_a_bounded_queue() {
    // One 256x256 100-step generation fills the model's budget.
    let server = TestServer::start_with(|c| {
        c.limits.admission_budget = 256 * 256 * 100;
        c.limits.stream_buffer = 1;
    })
    .await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let big = client.create_session(MODEL).await.unwrap();
    let mut running = big.generate(heavy(100, 1)).await.unwrap();
    assert!(matches!(running.next().await, Some(Ok(Event::Started(_)))));
    // A small request does not fit beside it: it waits (no Started) instead of slowing it down.
    let small = client.create_session(MODEL).await.unwrap();
    let mut waiting = small.generate(request(2, 2)).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.next()).await;
    assert!(early.is_err(), "started beside a full budget: {early:?}");
    assert!(
        small.info().await.unwrap().generating,
        "queued counts as generating"
    );
    // Once the large one is done, the queued one starts and completes.
    let (steps, error) = drain(running).await;
    assert_eq!((steps, error.is_none()), (100, true));
    let (steps, error) = drain(waiting).await;
    assert_eq!((steps, error.is_none()), (2, true), "{error:?}");
    server.stop().await;

    // The queue is bounded: beyond it, RESOURCE_EXHAUSTED naming the limit.
    let server = TestServer::start_with(|c| {
        c.limits.max_active_generations = 1;
        c.limits.max_queued_generations = 1;
        c.limits.stream_buffer = 1;
    })
    .await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let mut first = client
        .generate_once(MODEL, CacheConfig::None, request(50, 1))
        .await
        .unwrap();
    assert!(matches!(first.next().await, Some(Ok(Event::Started(_)))));
    let queued = client
        .generate_once(MODEL, CacheConfig::None, request(2, 2))
        .await
        .unwrap();
    let err = client
        .generate_once(MODEL, CacheConfig::None, request(2, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.to_string().contains("limits.max_queued_generations"),
        "{err}"
    );
    // A queued request whose client leaves is dropped from the queue with its session.
    drop(queued);
    drop(first);
    let start = Instant::now();
    while !client.list_sessions().await.unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sessions left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_keep_stepping_while_a_large_one_runs() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let big_steps = 30;
    let mut big = client
        .generate_once(
            MODEL,
            CacheConfig::None,
            request(big_steps, 1).size(512, 512),
        )
        .await
        .unwrap();
    // The large generation's steps, timestamped as they arrive.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(event) = big.next().await {
            if let Event::Step(step) = event.unwrap() {
                let _ = tx.send((Instant::now(), step.step_time));
            }
        }
    });
    let (_, big_step) = rx.recv().await.expect("a large step");

    let small_started = Instant::now();
    let mut small = client
        .generate_once(MODEL, CacheConfig::None, request(30, 2))
        .await
        .unwrap();
    let (mut first_step, mut longest_gap, mut last) = (None, Duration::ZERO, Instant::now());
    while let Some(event) = small.next().await {
        if let Event::Step(_) = event.unwrap() {
            let now = Instant::now();
            first_step.get_or_insert(now - small_started);
            longest_gap = longest_gap.max(now - last);
            last = now;
        }
    }
    let small_done = Instant::now();
    reader.await.unwrap();
    let mut during = 0;
    while let Ok((at, _)) = rx.try_recv() {
        if at > small_started && at < small_done {
            during += 1;
        }
    }
    println!(
        "large step {big_step:?}; small: first step after {first_step:?}, longest gap \
         {longest_gap:?}, done in {:?} while the large one ran {during} steps",
        small_done - small_started
    );
    // Taking turns step by step, the 30 small steps would wait for 30 large ones; least-served
    // first, the small request runs to its end within a couple of large steps.
    assert!(
        during <= 3,
        "{during} large steps ran while the small request waited"
    );
    server.stop().await;
}
