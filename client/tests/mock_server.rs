//! The client against an in-process mock of the Denoiser service: wire-level behaviour (status
//! codes, metadata, streaming, concurrent session use) without a GPU or model weights.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use denoised_client::proto::denoiser_server::{Denoiser, DenoiserServer};
use denoised_client::proto::{self as v1, generate_event::Event as E};
use denoised_client::{
    CacheConfig, CacheKind, Client, Error, Event, FirstBlockCacheConfig, GenerateRequest,
    ImageFormat, TraceParent,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

#[derive(Default)]
struct State {
    sessions: HashMap<String, v1::Session>,
    next_id: u32,
    traceparents: Vec<String>,
    authorization: Vec<String>,
}

#[derive(Clone, Default)]
struct Mock(Arc<Mutex<State>>);

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
        Ok(Response::new(v1::ListModelsResponse {
            models: vec![v1::ModelInfo {
                name: "mock".into(),
                family: "flux".into(),
                num_blocks: 4,
                supported_caches: vec![v1::CacheKind::None as i32, v1::CacheKind::TaylorSeer as i32],
                ..Default::default()
            }],
        }))
    }

    async fn create_session(
        &self,
        request: Request<v1::CreateSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record(&request);
        let r = request.into_inner();
        if r.model != "mock" {
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
    /// The prompt "truncate" ends the stream without Completed.
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.record(&request);
        let r = request.into_inner();
        let session_id = if r.session_id.is_empty() {
            let session = self
                .create_session(Request::new(v1::CreateSessionRequest {
                    model: r.model.clone(),
                    cache: r.cache.clone(),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            session.session_id
        } else {
            self.session(&r.session_id)?.session_id
        };
        let (tx, rx) = mpsc::channel(8);
        let mock = self.clone();
        tokio::spawn(async move {
            let send = |event| tx.send(Ok(v1::GenerateEvent { event: Some(event) }));
            let settings = v1::ResolvedSettings {
                model: "mock".into(),
                steps: 4,
                seed: r.seed.unwrap_or(99),
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
            send(E::Completed(v1::Completed {
                generation_id: "g".into(),
                image: Some(v1::Image {
                    format: v1::ImageFormat::Png as i32,
                    width: 4,
                    height: 4,
                    data: png(),
                }),
                steps: 4,
                full_compute_steps: 4,
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
        Ok(Response::new(v1::CancelGenerationResponse { cancelled: false }))
    }
}

async fn serve() -> (Mock, String) {
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

    let info = session.set_cache(FirstBlockCacheConfig::default()).await.unwrap();
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

    let err = client
        .generate_once("mock", CacheConfig::None, GenerateRequest::new("truncate"))
        .await
        .unwrap()
        .collect_final()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IncompleteStream { steps_seen: 4 }), "{err}");
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
    let state = mock.0.lock().unwrap();
    assert_eq!(state.traceparents, [traceparent.to_string()]);
    assert_eq!(state.authorization, ["Bearer t0ken"]);
    drop(state);

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
