//! An in-process mock of the Denoiser service: an image model `mock` and a video model
//! `mock-video`, four 50 ms steps reporting the session's cache kind at each step boundary, and
//! the requests and metadata it saw.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use denoised_client::proto::denoiser_server::{Denoiser, DenoiserServer};
use denoised_client::proto::{self as v1, generate_event::Event as E};
use denoised_client::{CacheConfig, CacheKind, TraceParent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct State {
    sessions: HashMap<String, v1::Session>,
    next_id: u32,
    /// `traceparent` headers received.
    pub traceparents: Vec<String>,
    /// `authorization` headers received.
    pub authorization: Vec<String>,
    /// Generate requests received.
    pub generate_requests: Vec<v1::GenerateRequest>,
}

/// The contents of every video `mock-video` returns (a client does not decode videos).
pub const VIDEO_BYTES: &[u8] = b"\0\0\0\x18ftypisom mock video";
/// `mock-video`'s frame limits.
pub const DEFAULT_FRAMES: u32 = 9;
pub const DEFAULT_FPS: u32 = 8;

#[derive(Clone, Default)]
pub struct Mock(pub Arc<Mutex<State>>);

impl Mock {
    fn record<T>(&self, request: &Request<T>) {
        let mut state = self.0.lock().unwrap();
        let header = |key| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        state.traceparents.extend(header(TraceParent::HEADER));
        state.authorization.extend(header("authorization"));
    }

    fn session(&self, id: &str) -> Result<v1::Session, Status> {
        self.0
            .lock()
            .unwrap()
            .sessions
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no session {id}")))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut v1::Session)) -> Result<v1::Session, Status> {
        let mut state = self.0.lock().unwrap();
        let session = state
            .sessions
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("no session {id}")))?;
        f(session);
        Ok(session.clone())
    }
}

fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(4, 4)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn kind_of(cache: &Option<v1::CacheConfig>) -> CacheKind {
    CacheConfig::from(cache.clone().unwrap_or_default()).kind()
}

#[tonic::async_trait]
impl Denoiser for Mock {
    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        self.record(&request);
        let supported_caches = vec![v1::CacheKind::None as i32, v1::CacheKind::TaylorSeer as i32];
        Ok(Response::new(v1::ListModelsResponse {
            models: vec![
                v1::ModelInfo {
                    name: "mock".into(),
                    family: "flux".into(),
                    num_blocks: 4,
                    supported_caches: supported_caches.clone(),
                    modality: v1::Modality::Image as i32,
                    ..Default::default()
                },
                v1::ModelInfo {
                    name: "mock-video".into(),
                    family: "cogvideox".into(),
                    variant: "cogvideox-2b".into(),
                    num_blocks: 2,
                    supported_caches,
                    modality: v1::Modality::Video as i32,
                    video: Some(v1::VideoLimits {
                        default_num_frames: DEFAULT_FRAMES,
                        num_frames: Some(v1::Range { min: 1, max: 49 }),
                        num_frames_step: 4,
                        default_fps: DEFAULT_FPS,
                    }),
                    ..Default::default()
                },
            ],
        }))
    }

    async fn create_session(
        &self,
        request: Request<v1::CreateSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record(&request);
        let r = request.into_inner();
        if r.model != "mock" && r.model != "mock-video" {
            return Err(Status::not_found(format!("no model {}", r.model)));
        }
        let mut state = self.0.lock().unwrap();
        state.next_id += 1;
        let session = v1::Session {
            session_id: format!("s{}", state.next_id),
            model: r.model,
            cache: r.cache,
            idle_timeout_seconds: r.idle_timeout_seconds,
            labels: r.labels,
            ..Default::default()
        };
        state
            .sessions
            .insert(session.session_id.clone(), session.clone());
        Ok(Response::new(session))
    }

    async fn get_session(
        &self,
        request: Request<v1::GetSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record(&request);
        Ok(Response::new(self.session(&request.get_ref().session_id)?))
    }

    async fn list_sessions(
        &self,
        request: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        self.record(&request);
        let sessions = self.0.lock().unwrap().sessions.values().cloned().collect();
        Ok(Response::new(v1::ListSessionsResponse { sessions }))
    }

    async fn close_session(
        &self,
        request: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, Status> {
        self.record(&request);
        let id = &request.get_ref().session_id;
        match self.0.lock().unwrap().sessions.remove(id) {
            Some(_) => Ok(Response::new(v1::CloseSessionResponse {
                freed_cache_bytes: 1234,
            })),
            None => Err(Status::not_found(format!("no session {id}"))),
        }
    }

    type GenerateStream = ReceiverStream<Result<v1::GenerateEvent, Status>>;

    /// Four steps, 50 ms apart, reporting the session's cache kind at each step boundary.
    /// The prompt "truncate" ends the stream without Completed. `mock-video` completes with a
    /// video (and the frames when asked); `mock` refuses the video fields as the server does.
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.record(&request);
        let r = request.into_inner();
        self.0.lock().unwrap().generate_requests.push(r.clone());
        let session = if r.session_id.is_empty() {
            self.create_session(Request::new(v1::CreateSessionRequest {
                model: r.model.clone(),
                cache: r.cache.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner()
        } else {
            self.session(&r.session_id)?
        };
        let (session_id, video) = (session.session_id, session.model == "mock-video");
        if !video {
            for (field, set) in [
                ("num_frames", r.num_frames > 1),
                ("fps", r.fps != 0),
                ("use_dynamic_cfg", r.use_dynamic_cfg == Some(true)),
                ("return_frames", r.return_frames),
            ] {
                if set {
                    return Err(Status::invalid_argument(format!(
                        "`{field}`: model `mock` makes images"
                    )));
                }
            }
        }
        let num_frames = match (video, r.num_frames) {
            (false, _) => 0,
            (true, 0) => DEFAULT_FRAMES,
            (true, n) => n,
        };
        let fps = match (video, r.fps) {
            (false, _) => 0,
            (true, 0) => DEFAULT_FPS,
            (true, n) => n,
        };
        let (tx, rx) = mpsc::channel(8);
        let mock = self.clone();
        tokio::spawn(async move {
            let send = |event| tx.send(Ok(v1::GenerateEvent { event: Some(event) }));
            let settings = v1::ResolvedSettings {
                model: session.model,
                steps: 4,
                seed: r.seed.unwrap_or(99),
                num_frames,
                fps,
                use_dynamic_cfg: r.use_dynamic_cfg.unwrap_or(false),
                ..Default::default()
            };
            send(E::Started(v1::Started {
                generation_id: "g".into(),
                session_id: session_id.clone(),
                settings: Some(settings),
                setup_ms: 1.0,
            }))
            .await
            .ok();
            let mut previous = None;
            for index in 0..4 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(session) = mock.session(&session_id) else {
                    return;
                };
                let kind = kind_of(&session.cache);
                let switched = previous.is_some_and(|p| p != kind);
                previous = Some(kind);
                let activity = v1::CacheActivity {
                    strategy: kind.into_proto() as i32,
                    blocks: Some(v1::ModuleCounts {
                        computed: 4,
                        ..Default::default()
                    }),
                    full_compute: true,
                    strategy_switched: switched,
                    ..Default::default()
                };
                send(E::Step(v1::Step {
                    index,
                    total: 4,
                    cache: Some(activity),
                    step_ms: 30.0,
                    ..Default::default()
                }))
                .await
                .ok();
            }
            if r.prompt == "truncate" {
                return;
            }
            let image = v1::Image {
                format: v1::ImageFormat::Png as i32,
                width: 4,
                height: 4,
                data: png(),
            };
            let format = match v1::VideoFormat::try_from(r.video_format) {
                Ok(v1::VideoFormat::Gif) => v1::VideoFormat::Gif,
                _ => v1::VideoFormat::Mp4,
            };
            send(E::Completed(v1::Completed {
                generation_id: "g".into(),
                image: Some(image.clone()),
                steps: 4,
                full_compute_steps: 4,
                video: video.then(|| v1::Video {
                    format: format as i32,
                    width: 4,
                    height: 4,
                    num_frames,
                    fps,
                    data: VIDEO_BYTES.to_vec(),
                }),
                frames: if video && r.return_frames {
                    vec![image; num_frames as usize]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }))
            .await
            .ok();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn set_cache_strategy(
        &self,
        request: Request<v1::SetCacheStrategyRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record(&request);
        let r = request.into_inner();
        Ok(Response::new(
            self.update(&r.session_id, |s| s.cache = r.cache)?,
        ))
    }

    async fn reset_cache(
        &self,
        request: Request<v1::ResetCacheRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record(&request);
        let id = &request.get_ref().session_id;
        Ok(Response::new(self.update(id, |s| s.cache_state_bytes = 0)?))
    }

    async fn cancel_generation(
        &self,
        request: Request<v1::CancelGenerationRequest>,
    ) -> Result<Response<v1::CancelGenerationResponse>, Status> {
        self.record(&request);
        self.session(&request.get_ref().session_id)?;
        Ok(Response::new(v1::CancelGenerationResponse {
            cancelled: false,
        }))
    }
}

/// Serves a fresh mock on a free local port; returns it and its URL.
pub async fn serve() -> (Mock, String) {
    let mock = Mock::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = DenoiserServer::new(mock.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (mock, format!("http://{addr}"))
}
