//! End to end on a video model: a real server on 127.0.0.1:0 serving the tiny random CogVideoX
//! pipeline, driven through the client crate.
use denoised_client::{
    CacheConfig, CacheKind, Client, Event, ForwardRows, GenerateRequest, Modality, ModuleDecision,
    StepEvent, VideoFormat,
};
use denoised_server::config::ModelEntry;
use denoised_tests::{tiny_video_model_dir, TestServer};
use futures::StreamExt;
use mp4_atom::{Codec, Decode, Ftyp, Moov, StszSamples};
use tonic::Code;

const VIDEO_MODEL: &str = "video";

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.models.push(ModelEntry {
            name: VIDEO_MODEL.into(),
            path: tiny_video_model_dir(),
            max_sequence_length: None,
            vae_tiling: false,
            admission_budget: None,
        });
        c.limits.stream_buffer = 1;
    })
    .await
}

/// The tiny model's size: its latent sample size (6 × 8) times the VAE's 8.
fn request(steps: u32) -> GenerateRequest {
    GenerateRequest::new("a red circle moving from left to right")
        .size(64, 48)
        .steps(steps)
        .seed(5)
        .num_frames(9)
}

/// Frame count and size of an MP4, from its boxes.
fn mp4_frames(data: &[u8]) -> (usize, u16, u16) {
    let mut buf = data;
    Ftyp::decode(&mut buf).expect("an ftyp box");
    let moov = Moov::decode(&mut buf).expect("a moov box");
    let stbl = &moov.trak[0].mdia.minf.stbl;
    let frames = match &stbl.stsz.samples {
        StszSamples::Different { sizes } => sizes.len(),
        StszSamples::Identical { count, .. } => *count as usize,
    };
    match &stbl.stsd.codecs[..] {
        [Codec::Avc1(avc1)] => (frames, avc1.visual.width, avc1.visual.height),
        other => panic!("one H.264 track expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_generation_streams_steps_and_returns_the_video() {
    let server = server().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let models = client.list_models().await.unwrap();
    let video = models
        .iter()
        .find(|m| m.name == VIDEO_MODEL)
        .expect("the video model is listed");
    assert_eq!(
        (video.family.as_str(), video.modality),
        ("cogvideox", Modality::Video)
    );
    let limits = video.video.clone().expect("frame limits");
    assert_eq!((limits.default_num_frames, limits.num_frames_step), (9, 8));
    assert_eq!(limits.default_fps, 8);
    assert!(video.supported_caches.contains(&CacheKind::FasterCache));
    let image_model = models.iter().find(|m| m.name != VIDEO_MODEL).unwrap();
    assert_eq!(image_model.modality, Modality::Image);

    let session = client.create_session(VIDEO_MODEL).await.unwrap();
    let mut stream = session
        .generate(request(4).return_frames(true))
        .await
        .unwrap();
    let (mut started, mut steps, mut completed) = (None, Vec::<StepEvent>::new(), None);
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Started(s) => started = Some(s),
            Event::Step(s) => steps.push(s),
            Event::Completed(c) => completed = Some(c),
        }
    }
    let settings = started.expect("a Started event").settings;
    assert_eq!((settings.num_frames, settings.fps), (9, 8));
    assert_eq!(settings.guidance, 6.0, "CogVideoX's default guidance");
    assert_eq!(steps.len(), 4, "one Step per step");
    assert!(steps.iter().enumerate().all(|(i, s)| s.index as usize == i));
    let completed = completed.expect("a Completed event");
    let video = completed.video.expect("a video");
    assert_eq!(video.format, VideoFormat::Mp4);
    assert_eq!(
        (video.width, video.height, video.num_frames, video.fps),
        (64, 48, 9, 8)
    );
    assert_eq!(mp4_frames(&video.bytes), (9, 64, 48));
    assert_eq!(completed.frames.len(), 9);
    assert_eq!((completed.image.width, completed.image.height), (64, 48));

    // The same generation as animated GIF decodes to the same frame count.
    let gif = client
        .generate_once(
            VIDEO_MODEL,
            CacheConfig::None,
            request(2).video_format(VideoFormat::Gif),
        )
        .await
        .unwrap()
        .collect_final()
        .await
        .unwrap()
        .video
        .expect("a video");
    use image::AnimationDecoder;
    let decoder = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(gif.bytes)).unwrap();
    let frames = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 9);
    assert_eq!(frames[0].buffer().dimensions(), (64, 48));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_and_reset_mid_video_generation_show_in_the_next_step() {
    let server = server().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let session = client.create_session(VIDEO_MODEL).await.unwrap();
    let mut stream = session
        .generate(request(12).record_module_decisions(true))
        .await
        .unwrap();
    let (mut steps, mut switched_at, mut reset_at) = (Vec::<StepEvent>::new(), None, None);
    while let Some(event) = stream.next().await {
        if let Event::Step(step) = event.unwrap() {
            if step.index == 2 {
                session
                    .set_cache(
                        "fastercache:unconditional_batch_skip_range=2"
                            .parse::<CacheConfig>()
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                switched_at = Some(step.index as usize);
            }
            if step.index == 7 {
                session.reset_cache().await.unwrap();
                reset_at = Some(step.index as usize);
            }
            steps.push(step);
        }
    }
    assert_eq!(steps.len(), 12);
    let switch = steps
        .iter()
        .position(|s| s.cache.strategy_switched)
        .unwrap();
    let reset = steps.iter().position(|s| s.cache.cache_reset).unwrap();
    // Requests take effect at a step boundary shortly after they were made.
    assert!(switch > switched_at.unwrap() && switch <= switched_at.unwrap() + 3);
    assert!(reset > reset_at.unwrap() && reset <= reset_at.unwrap() + 3);
    assert_eq!(steps[switch].cache.strategy, CacheKind::FasterCache);
    assert_eq!(steps[switch].cache.strategy_step, 1);
    assert!(steps[..switch]
        .iter()
        .all(|s| s.cache.strategy == CacheKind::None));
    // FasterCache really skips the unconditional half on some steps after the switch.
    assert!(
        steps[switch..].iter().any(|s| !s.cache.full_compute),
        "FasterCache approximated nothing"
    );
    // The per-module record shows how: one batched call for both halves while it computes, else
    // a conditional call and an unconditional half rebuilt without a call.
    let rows = |s: &StepEvent| -> Vec<(ForwardRows, ModuleDecision)> {
        let forwards = s.cache.modules.as_ref().expect("the record was asked for");
        forwards.iter().map(|f| (f.rows, f.forward)).collect()
    };
    let batched = vec![(ForwardRows::Both, ModuleDecision::Computed)];
    assert!(steps[..switch].iter().all(|s| rows(s) == batched));
    let rebuilt = vec![
        (ForwardRows::Cond, ModuleDecision::Computed),
        (ForwardRows::Uncond, ModuleDecision::Predicted),
    ];
    assert!(steps[switch..].iter().any(|s| rows(s) == rebuilt));
    for s in &steps {
        let calls = s.cache.modules.as_ref().unwrap();
        let blocks: usize = calls.iter().map(|f| f.blocks.len()).sum();
        assert_eq!(blocks as u32, s.cache.blocks.total());
        assert!(calls
            .iter()
            .filter(|f| f.forward == ModuleDecision::Predicted)
            .all(|f| f.blocks.is_empty()));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_video_requests_name_their_field() {
    let server = server().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let once = |request: GenerateRequest, model: &'static str| {
        let client = client.clone();
        async move {
            // Refused when the call is made, or as the stream's first item.
            match client
                .generate_once(model, CacheConfig::None, request)
                .await
            {
                Err(e) => e,
                Ok(stream) => stream.collect_final().await.expect_err("refused"),
            }
        }
    };
    // 13 frames decode to 16 with this VAE: not served.
    let err = once(request(2).num_frames(13), VIDEO_MODEL).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains("num_frames"), "{err}");
    let err = once(
        request(2).fps(100).video_format(VideoFormat::Gif),
        VIDEO_MODEL,
    )
    .await;
    assert!(err.to_string().contains("fps"), "{err}");
    let err = once(
        GenerateRequest::new("x").steps(1).num_frames(9),
        denoised_tests::MODEL,
    )
    .await;
    assert!(err.to_string().contains("num_frames"), "{err}");
    server.stop().await;
}
