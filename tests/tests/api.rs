//! End to end: a real server on 127.0.0.1:0, driven through the client crate.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use denoised_client::{
    CacheConfig, CacheKind, Client, Error, Event, GenerateRequest, GenerationStream, Preview,
    StepEvent,
};
use denoised_tests::{tiny_model_dir, TestServer, MODEL};
use futures::StreamExt;
use tonic::Code;

fn request(steps: u32, seed: u64) -> GenerateRequest {
    GenerateRequest::new("a red circle at the top left")
        .size(32, 24)
        .steps(steps)
        .seed(seed)
}

struct Collected {
    started: bool,
    steps: Vec<StepEvent>,
    completed: Option<denoised_client::Completed>,
    error: Option<Error>,
}

async fn collect(mut stream: GenerationStream) -> Collected {
    let mut c = Collected {
        started: false,
        steps: Vec::new(),
        completed: None,
        error: None,
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Started(_)) => c.started = true,
            Ok(Event::Step(s)) => c.steps.push(s),
            Ok(Event::Completed(done)) => c.completed = Some(done),
            Err(e) => {
                c.error = Some(e);
                break;
            }
        }
    }
    c
}

async fn wait_idle(session: &denoised_client::Session) {
    for _ in 0..500 {
        if !session.info().await.unwrap().generating {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("session still generating after 5 s");
}

/// How long the session took to stop generating, if it did within `bound`.
async fn idle_within(session: &denoised_client::Session, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if !session.info().await.unwrap().generating {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// The one-shot form (ephemeral session), run to its final event.
async fn generate_once(
    client: &Client,
    cache: CacheConfig,
    request: GenerateRequest,
) -> denoised_client::Completed {
    let stream = client.generate_once(MODEL, cache, request).await.unwrap();
    stream.collect_final().await.unwrap()
}

fn code(result: Result<impl std::fmt::Debug, Error>) -> Code {
    result.expect_err("expected an error").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifecycle_and_streamed_generation() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();

    let models = client.list_models().await.unwrap();
    let model = models
        .iter()
        .find(|m| m.name == MODEL)
        .expect("tiny model listed");
    assert_eq!(model.device, "cpu");
    assert!(model.supported_caches.contains(&CacheKind::None));

    let session = client
        .create_session(MODEL)
        .label("test", "lifecycle")
        .await
        .unwrap();
    let info = session.info().await.unwrap();
    assert_eq!(
        (info.model.as_str(), info.generations_run, info.generating),
        (MODEL, 0, false)
    );
    assert_eq!(
        info.labels.get("test").map(String::as_str),
        Some("lifecycle")
    );
    assert!(client
        .list_sessions()
        .await
        .unwrap()
        .iter()
        .any(|s| s.id == session.id()));

    let stream = session
        .generate(request(5, 1).preview(Preview::latent_rgb().every(2).max_edge(64)))
        .await
        .unwrap();
    let run = collect(stream).await;
    assert!(run.error.is_none(), "{:?}", run.error);
    assert!(run.started);
    let indices: Vec<u32> = run.steps.iter().map(|s| s.index).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    assert!(run
        .steps
        .iter()
        .all(|s| s.total == 5 && s.cache.full_compute));
    // Previews every 2nd step and always on the last one.
    let previews: Vec<bool> = run.steps.iter().map(|s| s.preview.is_some()).collect();
    assert_eq!(previews, vec![true, false, true, false, true]);
    // Timesteps decrease from 1000.
    assert!(run.steps.windows(2).all(|w| w[0].timestep > w[1].timestep));
    let done = run.completed.expect("completed");
    let image = done.image.to_dynamic_image().unwrap();
    assert_eq!((image.width(), image.height()), (32, 24));
    assert_eq!(done.full_compute_steps, 5);

    wait_idle(&session).await;
    assert_eq!(session.info().await.unwrap().generations_run, 1);
    assert_eq!(session.close().await.unwrap(), 0);
    assert_eq!(code(session.info().await), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_image_and_one_shot_form() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let a = generate_once(&client, CacheConfig::None, request(3, 99)).await;
    let b = generate_once(&client, CacheConfig::None, request(3, 99)).await;
    let c = generate_once(&client, CacheConfig::None, request(3, 100)).await;
    assert_eq!(a.image.bytes, b.image.bytes);
    assert_ne!(a.image.bytes, c.image.bytes);
    // Ephemeral sessions are gone once their generation ended.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client.list_sessions().await.unwrap().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_interleave_and_match_solo_runs() {
    // A one-event buffer keeps the engine in step with each reader, so arrival order is step order.
    let server = TestServer::start_with(|c| c.limits.stream_buffer = 1).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let steps = 12;
    let configs = [CacheConfig::None, best_cache(&client).await];
    let mut solo = Vec::new();
    for (i, cache) in configs.iter().enumerate() {
        let done = generate_once(&client, cache.clone(), request(steps, 7 + i as u64)).await;
        solo.push(done.image.bytes);
    }

    let clock = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, cache) in configs.iter().enumerate() {
        let session = client
            .create_session(MODEL)
            .cache(cache.clone())
            .await
            .unwrap();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = session
                .generate(request(steps, 7 + i as u64))
                .await
                .unwrap();
            let mut arrivals = Vec::new();
            let mut image = None;
            while let Some(event) = stream.next().await {
                match event.unwrap() {
                    Event::Step(_) => arrivals.push(clock.fetch_add(1, Ordering::SeqCst)),
                    Event::Completed(done) => image = Some(done.image.bytes),
                    Event::Started(_) => {}
                }
            }
            (arrivals, image.expect("completed"))
        }));
    }
    let (a, b) = (
        tasks.remove(0).await.unwrap(),
        tasks.remove(0).await.unwrap(),
    );
    // Interleaved: each stream's first step arrives before the other's last step.
    assert!(
        a.0[0] < *b.0.last().unwrap() && b.0[0] < *a.0.last().unwrap(),
        "{:?} / {:?}",
        a.0,
        b.0
    );
    assert_eq!(a.1, solo[0], "session 1 image differs from its solo run");
    assert_eq!(b.1, solo[1], "session 2 image differs from its solo run");
    server.stop().await;
}

/// A strategy other than `none` when the build has one (caches land separately from the spine).
async fn best_cache(client: &Client) -> CacheConfig {
    let model = client
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.name == MODEL)
        .unwrap();
    if model.supported_caches.contains(&CacheKind::TaylorSeer) {
        CacheConfig::parse("taylorseer:cache_interval=3,disable_cache_before_step=1").unwrap()
    } else {
        CacheConfig::None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_and_reset_mid_generation_show_in_the_next_steps() {
    let server = TestServer::start_with(|c| c.limits.stream_buffer = 1).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let new_cache = best_cache(&client).await;
    let session = client.create_session(MODEL).await.unwrap();
    let mut stream = session.generate(request(40, 3)).await.unwrap();
    let mut steps = Vec::new();
    let mut switched_at = None;
    let mut reset_at = None;
    while let Some(event) = stream.next().await {
        if let Event::Step(step) = event.unwrap() {
            if step.index == 3 {
                let info = session.set_cache(new_cache.clone()).await.unwrap();
                // The server answers with the config resolved to its effective values.
                assert_eq!(info.cache.kind(), new_cache.kind());
                switched_at = Some(step.index);
            }
            if step.index == 20 {
                session.reset_cache().await.unwrap();
                reset_at = Some(step.index);
            }
            steps.push(step);
        }
    }
    assert_eq!(steps.len(), 40);
    let switch = steps
        .iter()
        .position(|s| s.cache.strategy_switched)
        .expect("a step reports the switch");
    let reset = steps
        .iter()
        .position(|s| s.cache.cache_reset)
        .expect("a step reports the reset");
    // Requests apply at a step boundary shortly after they were made (the engine runs at most
    // a couple of steps ahead of this reader).
    assert!(switch > switched_at.unwrap() as usize && switch <= switched_at.unwrap() as usize + 3);
    assert!(reset > reset_at.unwrap() as usize && reset <= reset_at.unwrap() as usize + 3);
    assert_eq!(
        steps.iter().filter(|s| s.cache.strategy_switched).count(),
        1
    );
    assert_eq!(steps.iter().filter(|s| s.cache.cache_reset).count(), 1);
    // The new strategy's own counter restarts at the switch and at the reset.
    assert_eq!(steps[switch].cache.strategy_step, 1);
    assert_eq!(steps[reset].cache.strategy_step, 1);
    assert!(
        steps[reset].cache.full_compute,
        "the step after a reset computes fully"
    );
    assert!(steps[..switch]
        .iter()
        .all(|s| s.cache.strategy == CacheKind::None));
    assert!(steps[switch..]
        .iter()
        .all(|s| s.cache.strategy == new_cache.kind()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_by_rpc_and_by_drop_frees_the_session() {
    let server = TestServer::start_with(|c| c.limits.stream_buffer = 1).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let session = client.create_session(MODEL).await.unwrap();

    // By RPC: the stream ends with CANCELLED.
    let mut stream = session.generate(request(200, 1)).await.unwrap();
    let mut seen = 0;
    let mut ended_with = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Step(_)) => {
                seen += 1;
                if seen == 2 {
                    assert!(session.cancel().await.unwrap());
                }
            }
            Ok(_) => {}
            Err(e) => {
                ended_with = Some(e.code());
                break;
            }
        }
    }
    assert_eq!(ended_with, Some(Code::Cancelled));
    assert!(
        seen < 10,
        "cancel took effect within a step or two ({seen} steps seen)"
    );
    wait_idle(&session).await;
    assert!(!session.cancel().await.unwrap(), "nothing left to cancel");

    // By dropping the stream: a generation that would run for seconds (1000 steps at 256x256,
    // 10-25 ms each on 2 cores) must stop within a step or two, not run to its end.
    let steps = 1000;
    let mut stream = session
        .generate(request(steps, 2).size(256, 256))
        .await
        .unwrap();
    let mut step_times = Vec::new();
    while step_times.len() < 3 {
        if let Event::Step(step) = stream.next().await.expect("a step").unwrap() {
            step_times.push(step.step_time);
        }
    }
    drop(stream);
    // The rest of the run at the pace of its fastest step so far, so that a slower machine gets
    // a longer bound; a tenth of that is still dozens of steps.
    let rest = *step_times.iter().min().unwrap() * (steps - 3);
    let stopped = idle_within(&session, rest / 10).await;
    assert!(
        stopped.is_some(),
        "still generating {:?} after the drop (the rest of the run takes about {rest:?})",
        rest / 10
    );
    println!("dropped stream: stopped in {stopped:?}, the rest would take {rest:?}");

    // The session is free again and generates to the end.
    let run = collect(session.generate(request(2, 3)).await.unwrap()).await;
    assert!(run.completed.is_some(), "{:?}", run.error);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_evicted() {
    let server = TestServer::start_with(|c| c.limits.eviction_interval_ms = 20).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let short = client
        .create_session(MODEL)
        .idle_timeout(Duration::from_secs(1))
        .await
        .unwrap();
    let long = client
        .create_session(MODEL)
        .idle_timeout(Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(code(short.info().await), Code::NotFound);
    assert!(long.info().await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_statuses_and_the_server_carries_on() {
    let server = TestServer::start_with(|c| c.limits.max_sessions = 3).await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let ghost = client.session("no-such-session");
    assert_eq!(code(ghost.info().await), Code::NotFound);
    assert_eq!(code(ghost.generate(request(2, 1)).await), Code::NotFound);
    assert_eq!(
        code(ghost.set_cache(CacheConfig::None).await),
        Code::NotFound
    );
    assert_eq!(code(ghost.reset_cache().await), Code::NotFound);
    assert_eq!(code(ghost.cancel().await), Code::NotFound);
    assert_eq!(code(ghost.close().await), Code::NotFound);
    assert_eq!(
        code(client.create_session("no-such-model").await),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .generate_once("no-such-model", CacheConfig::None, request(2, 1))
                .await
        ),
        Code::NotFound
    );

    let session = client.create_session(MODEL).await.unwrap();
    let rejected = [
        ("width", request(2, 1).size(1, 32)),
        ("height", request(2, 1).size(32, 100_000)),
        ("steps", request(10_000, 1)),
        ("guidance", request(2, 1).guidance(-1.0)),
        ("true_cfg_scale", request(2, 1).true_cfg_scale(1e9)),
        ("class_label", request(2, 1).class_label(3)),
    ];
    for (field, req) in rejected {
        let err = session.generate(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{field}: {err}"
        );
    }
    let bad_cache = CacheConfig::parse("taylorseer:cache_interval=0").unwrap();
    let err = session.set_cache(bad_cache.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.to_string().contains("cache.taylor_seer.cache_interval"),
        "{err}"
    );
    assert_eq!(
        code(client.create_session(MODEL).cache(bad_cache).await),
        Code::InvalidArgument
    );
    let err = client
        .create_session(MODEL)
        .cache(CacheConfig::parse("magcache:threshold=0.1").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A second generation on a busy session.
    let first = session.generate(request(50, 1)).await.unwrap();
    assert_eq!(
        code(session.generate(request(2, 1)).await),
        Code::FailedPrecondition
    );
    drop(first);
    wait_idle(&session).await;

    // The session limit.
    client.create_session(MODEL).await.unwrap();
    client.create_session(MODEL).await.unwrap();
    assert_eq!(
        code(client.create_session(MODEL).await),
        Code::ResourceExhausted
    );

    // Still serving.
    let run = collect(session.generate(request(2, 5)).await.unwrap()).await;
    assert!(run.completed.is_some(), "{:?}", run.error);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generation_limit_refuses_with_resource_exhausted() {
    let server = TestServer::start_with(|c| {
        c.limits.max_active_generations = 1;
        c.limits.max_queued_generations = 0;
        // The running generation waits for its reader, so it holds the one slot until dropped.
        c.limits.stream_buffer = 1;
    })
    .await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let first = client.create_session(MODEL).await.unwrap();
    let second = client.create_session(MODEL).await.unwrap();
    let mut running = first.generate(request(50, 1)).await.unwrap();
    while !matches!(running.next().await.unwrap().unwrap(), Event::Step(_)) {}

    let err = second.generate(request(2, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.to_string().contains("maximum of 1 generations"),
        "{err}"
    );
    // The one-shot form counts against the same limit, and leaves no session behind.
    let err = client
        .generate_once(MODEL, CacheConfig::None, request(2, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(client.list_sessions().await.unwrap().len(), 2);
    let refused = second.info().await.unwrap();
    assert!(!refused.generating);
    // A generation the engine refused is not counted as run.
    assert_eq!(refused.generations_run, 0);

    // The slot frees when the running generation ends.
    drop(running);
    wait_idle(&first).await;
    assert_eq!(first.info().await.unwrap().generations_run, 1);
    let run = collect(second.generate(request(2, 2)).await.unwrap()).await;
    assert!(run.completed.is_some(), "{:?}", run.error);
    assert_eq!(second.info().await.unwrap().generations_run, 1);
    server.stop().await;
}

/// The word whose T5 token [`model_with_a_token_past_the_embeddings`] puts out of range.
const FAULTY_WORD: &str = "boom";

/// The tiny model (components linked, not copied) with a T5 tokenizer that knows one piece more
/// than the T5 encoder has embeddings: [`FAULTY_WORD`] tokenizes to id `vocab_size`, so encoding
/// a prompt with it fails inside libtorch (embedding index out of range) while every other
/// prompt works as before.
fn model_with_a_token_past_the_embeddings(dir: &Path) -> PathBuf {
    let source = tiny_model_dir();
    let read_json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let vocab_size = read_json(source.join("text_encoder_2/config.json"))["vocab_size"]
        .as_u64()
        .unwrap() as usize;
    let model = dir.join("model");
    let _ = std::fs::remove_dir_all(&model);
    std::fs::create_dir_all(model.join("tokenizer_2")).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "tokenizer_2" {
            std::os::unix::fs::symlink(source.join(&name), model.join(&name)).unwrap();
        }
    }
    for entry in std::fs::read_dir(source.join("tokenizer_2")).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "tokenizer.json" {
            let target = source.join("tokenizer_2").join(&name);
            std::os::unix::fs::symlink(target, model.join("tokenizer_2").join(&name)).unwrap();
        }
    }
    let mut tokenizer = read_json(source.join("tokenizer_2/tokenizer.json"));
    let pieces = tokenizer["model"]["vocab"].as_array_mut().unwrap();
    assert!(pieces.len() <= vocab_size);
    // Fillers no prompt contains, then the word as one piece scored above any split of it.
    while pieces.len() < vocab_size {
        let filler = format!("<unused_{}>", pieces.len());
        pieces.push(serde_json::json!([filler, -100.0]));
    }
    pieces.push(serde_json::json!([format!("\u{2581}{FAULTY_WORD}"), 0.0]));
    std::fs::write(
        model.join("tokenizer_2/tokenizer.json"),
        serde_json::to_string(&tokenizer).unwrap(),
    )
    .unwrap();
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libtorch_failure_ends_only_its_own_stream() {
    let dir = std::env::temp_dir().join(format!("denoised-faulty-{}", std::process::id()));
    let model = model_with_a_token_past_the_embeddings(&dir);
    let server = TestServer::start_with(|c| {
        c.models[0].path = model;
        c.limits.stream_buffer = 1;
    })
    .await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let healthy = client.create_session(MODEL).await.unwrap();
    let failing = client.create_session(MODEL).await.unwrap();

    // A generation is under way on one session when the other one's fails.
    let mut running = healthy.generate(request(30, 1)).await.unwrap();
    let mut steps = 0;
    while steps < 3 {
        if let Event::Step(_) = running.next().await.unwrap().unwrap() {
            steps += 1;
        }
    }
    let faulty = GenerateRequest::new(format!("a red {FAULTY_WORD} at the top left"))
        .size(32, 24)
        .steps(30);
    let failed = match failing.generate(faulty).await {
        Ok(stream) => collect(stream).await.error.expect("the generation fails"),
        Err(e) => e,
    };
    // A status the server sent (a stream that just broke off reads as INTERNAL too).
    assert!(
        matches!(
            failed,
            Error::Status {
                code: Code::Internal,
                ..
            }
        ),
        "{failed}"
    );
    assert!(
        failed.to_string().contains("prompt encoding failed")
            && failed.to_string().contains("index out of range"),
        "{failed}"
    );

    // The other generation runs to its end.
    let rest = collect(running).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    assert_eq!(steps + rest.steps.len(), 30);
    assert!(rest.completed.is_some());

    // The server carries on: the failed session is free and generates, new sessions work.
    assert!(!failing.info().await.unwrap().generating);
    let run = collect(failing.generate(request(2, 3)).await.unwrap()).await;
    assert!(run.completed.is_some(), "{:?}", run.error);
    let run = collect(
        client
            .generate_once(MODEL, CacheConfig::None, request(2, 4))
            .await
            .unwrap(),
    )
    .await;
    assert!(run.completed.is_some(), "{:?}", run.error);
    server.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_events_carry_the_module_decision_record_when_asked() {
    use denoised_client::{ForwardRows, ModuleDecision};
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    // A threshold no relative change reaches: every step after the first skips all blocks but
    // the first.
    let fbc = CacheConfig::parse("fbc:threshold=10").unwrap();
    let stream = client
        .generate_once(
            MODEL,
            fbc.clone(),
            request(4, 1).record_module_decisions(true),
        )
        .await
        .unwrap();
    let steps = collect(stream).await.steps;
    assert_eq!(steps.len(), 4);
    for step in &steps {
        let c = &step.cache;
        let forwards = c.modules.as_ref().expect("the record was asked for");
        assert_eq!(forwards.len(), 1, "one conditional call per step");
        let f = &forwards[0];
        assert_eq!(f.rows, ForwardRows::Cond);
        assert_eq!(f.forward, ModuleDecision::Computed);
        assert_eq!(f.blocks.len() as u32, c.blocks.total());
        assert_eq!(f.attention.len(), f.blocks.len());
        // The record and the step's counts tell the same story.
        let count = |d: &[ModuleDecision], which| d.iter().filter(|&&x| x == which).count() as u32;
        assert_eq!(
            count(&f.blocks, ModuleDecision::Computed),
            c.blocks.computed
        );
        assert_eq!(count(&f.blocks, ModuleDecision::Skipped), c.blocks.skipped);
        assert_eq!(
            count(&f.attention, ModuleDecision::Computed),
            c.attention.computed
        );
        assert_eq!(f.output_projection, ModuleDecision::Computed);
        if step.index == 0 {
            assert!(c.full_compute);
            assert!(f.blocks.iter().all(|&d| d == ModuleDecision::Computed));
        } else {
            // Which blocks ran: the first; the rest were skipped and their attention not asked.
            assert_eq!(f.blocks[0], ModuleDecision::Computed);
            assert_eq!(f.attention[0], ModuleDecision::Computed);
            assert!(f.blocks[1..].iter().all(|&d| d == ModuleDecision::Skipped));
            assert!(f.attention[1..]
                .iter()
                .all(|&d| d == ModuleDecision::NotRun));
        }
    }
    // Off by default: no bytes spent.
    let stream = client
        .generate_once(MODEL, fbc, request(2, 1))
        .await
        .unwrap();
    assert!(collect(stream)
        .await
        .steps
        .iter()
        .all(|s| s.cache.modules.is_none()));
    server.stop().await;
}
