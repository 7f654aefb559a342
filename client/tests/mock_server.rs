//! The client against an in-process mock of the Denoiser service: wire-level behaviour (status
//! codes, metadata, streaming, concurrent session use) without a GPU or model weights.

mod common;

use std::time::Duration;

use common::{serve, DEFAULT_FPS, DEFAULT_FRAMES, VIDEO_BYTES};
use denoised_client::proto as v1;
use denoised_client::{
    CacheConfig, CacheKind, Client, Error, Event, FirstBlockCacheConfig, GenerateRequest,
    ImageFormat, Modality, TraceParent, VideoFormat,
};
use futures::StreamExt;
use tonic::{Code, Status};

#[tokio::test]
async fn session_lifecycle_and_status_codes() {
    let (_mock, url) = serve().await;
    let client = Client::connect(url).await.unwrap();

    let models = client.list_models().await.unwrap();
    assert_eq!(models[0].name, "mock");
    assert_eq!(
        models[0].supported_caches,
        [CacheKind::None, CacheKind::TaylorSeer]
    );

    let err = client.create_session("nope").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(matches!(err, Error::Status { .. }));

    let session = client
        .create_session("mock")
        .cache(CacheConfig::parse("taylorseer:interval=5,order=1").unwrap())
        .idle_timeout(Duration::from_secs(60))
        .label("test", "lifecycle")
        .await
        .unwrap();
    let info = session.info().await.unwrap();
    assert_eq!(info.id, session.id());
    assert_eq!(
        info.cache.to_string(),
        "taylorseer:cache_interval=5,max_order=1"
    );
    assert_eq!(info.idle_timeout, Duration::from_secs(60));
    assert_eq!(info.labels["test"], "lifecycle");
    assert_eq!(client.list_sessions().await.unwrap().len(), 1);

    let info = session
        .set_cache(FirstBlockCacheConfig::default())
        .await
        .unwrap();
    assert_eq!(info.cache.kind(), CacheKind::FirstBlockCache);
    session.reset_cache().await.unwrap();
    assert!(!session.cancel().await.unwrap());
    assert_eq!(session.close().await.unwrap(), 1234);

    let err = session.info().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.session("unknown").close().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn cache_switch_from_another_task_mid_generation() {
    let (_mock, url) = serve().await;
    let client = Client::connect(url).await.unwrap();
    let session = client.create_session("mock").await.unwrap();
    let mut stream = session
        .generate(GenerateRequest::new("a fox").seed(5))
        .await
        .unwrap();

    let mut kinds = Vec::new();
    let mut switched_at = None;
    let mut completed = None;
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Started(started) => assert_eq!(started.settings.seed, 5),
            Event::Step(step) => {
                kinds.push(step.cache.strategy);
                if step.cache.strategy_switched {
                    switched_at = Some(step.index);
                }
                if step.index == 0 {
                    // The handle is Clone + Send: switch from a separate task while streaming.
                    let handle = session.clone();
                    tokio::spawn(async move {
                        handle
                            .set_cache(CacheConfig::parse("fbc:threshold=0.2").unwrap())
                            .await
                    })
                    .await
                    .unwrap()
                    .unwrap();
                }
            }
            Event::Completed(done) => completed = Some(done),
        }
    }
    assert_eq!(kinds[0], CacheKind::None);
    assert_eq!(kinds.last(), Some(&CacheKind::FirstBlockCache));
    // Step 1 normally sees the switch; a slow machine may delay it by a step or two.
    assert!(switched_at.is_some_and(|i| i >= 1), "{switched_at:?}");
    let done = completed.unwrap();
    assert_eq!(done.image.format, ImageFormat::Png);
    assert_eq!(done.image.to_dynamic_image().unwrap().width(), 4);
}

#[tokio::test]
async fn one_shot_generation_and_truncated_stream() {
    let (_mock, url) = serve().await;
    let client = Client::connect(url).await.unwrap();
    let done = client
        .generate_once("mock", CacheConfig::None, GenerateRequest::new("x"))
        .await
        .unwrap()
        .collect_final()
        .await
        .unwrap();
    assert_eq!(done.steps, 4);
    assert_eq!(done.video, None);
    assert!(done.frames.is_empty());

    let err = client
        .generate_once("mock", CacheConfig::None, GenerateRequest::new("truncate"))
        .await
        .unwrap()
        .collect_final()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IncompleteStream { steps_seen: 4 }),
        "{err}"
    );
}

#[tokio::test]
async fn interceptors_and_traceparent_reach_the_server() {
    let (mock, url) = serve().await;
    let traceparent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let client = Client::connect(url)
        .await
        .unwrap()
        .with_traceparent(move || Some(traceparent))
        .with_interceptor(|mut request| {
            request
                .metadata_mut()
                .insert("authorization", "Bearer t0ken".parse().unwrap());
            Ok(request)
        });
    client.list_models().await.unwrap();
    {
        let state = mock.0.lock().unwrap();
        assert_eq!(state.traceparents, [traceparent.to_string()]);
        assert_eq!(state.authorization, ["Bearer t0ken"]);
    }

    let rejecting = client.with_interceptor(|_| Err(Status::unauthenticated("no token")));
    let err = rejecting.list_models().await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn unary_deadline() {
    // A listener that accepts connections but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let client = Client::from_channel(channel).with_timeout(Duration::from_millis(200));
    let err = client.list_models().await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}

#[tokio::test]
async fn video_generation_returns_video_and_frames() {
    let (mock, url) = serve().await;
    let client = Client::connect(url).await.unwrap();

    let models = client.list_models().await.unwrap();
    assert_eq!(models[0].modality, Modality::Image);
    assert_eq!(models[0].video, None);
    let video_model = &models[1];
    assert_eq!(video_model.modality, Modality::Video);
    let limits = video_model.video.as_ref().unwrap();
    assert_eq!(limits.default_num_frames, DEFAULT_FRAMES);
    assert_eq!(limits.num_frames, 1..=49);
    assert_eq!(
        (limits.num_frames_step, limits.default_fps),
        (4, DEFAULT_FPS)
    );

    let session = client.create_session("mock-video").await.unwrap();
    let request = GenerateRequest::new("waves")
        .num_frames(5)
        .fps(12)
        .guidance(6.0)
        .use_dynamic_cfg(true)
        .video_format(VideoFormat::Gif)
        .return_frames(true);
    let mut stream = session.generate(request).await.unwrap();
    let (mut started, mut steps, mut completed) = (None, 0, None);
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Started(s) => started = Some(s),
            Event::Step(_) => steps += 1,
            Event::Completed(c) => completed = Some(c),
        }
    }
    let settings = started.unwrap().settings;
    assert_eq!(settings.model, "mock-video");
    assert_eq!((settings.num_frames, settings.fps), (5, 12));
    assert!(settings.use_dynamic_cfg);
    assert_eq!(steps, 4);

    let done = completed.unwrap();
    let video = done.video.as_ref().unwrap();
    assert_eq!(video.format, VideoFormat::Gif);
    assert_eq!((video.width, video.height), (4, 4));
    assert_eq!((video.num_frames, video.fps), (5, 12));
    assert_eq!(video.bytes, VIDEO_BYTES);
    assert_eq!(done.image.format, ImageFormat::Png);
    assert_eq!(done.frames.len(), 5);
    assert!(done.frames.iter().all(|f| f.to_dynamic_image().is_ok()));

    let dir = std::env::temp_dir().join(format!("denoised-video-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    video.save(dir.join("clip.gif")).unwrap();
    assert_eq!(std::fs::read(dir.join("clip.gif")).unwrap(), VIDEO_BYTES);
    let err = video.save(dir.join("clip.mp4")).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let paths = done.save_frames(dir.join("frames")).unwrap();
    assert_eq!(paths.len(), 5);
    assert!(paths[4].ends_with("frames/frame_0004.png"), "{paths:?}");
    assert!(image::open(&paths[4]).is_ok());
    std::fs::remove_dir_all(dir).unwrap();

    let received = mock.0.lock().unwrap().generate_requests.pop().unwrap();
    assert_eq!(received.session_id, session.id());
    assert_eq!((received.num_frames, received.fps), (5, 12));
    assert_eq!(received.guidance, Some(6.0));
    assert_eq!(received.use_dynamic_cfg, Some(true));
    assert_eq!(received.video_format, v1::VideoFormat::Gif as i32);
    assert!(received.return_frames);

    // Defaults: the server's frame count, rate and container (MP4), no frames.
    let done = client
        .generate_once("mock-video", CacheConfig::None, GenerateRequest::new("x"))
        .await
        .unwrap()
        .collect_final()
        .await
        .unwrap();
    let video = done.video.unwrap();
    assert_eq!(video.format, VideoFormat::Mp4);
    assert_eq!((video.num_frames, video.fps), (DEFAULT_FRAMES, DEFAULT_FPS));
    assert!(done.frames.is_empty());
    let received = mock.0.lock().unwrap().generate_requests.pop().unwrap();
    assert_eq!(received.video_format, v1::VideoFormat::Unspecified as i32);
    assert_eq!(received.use_dynamic_cfg, None);
}
