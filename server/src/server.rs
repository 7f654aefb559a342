//! Assembles and runs the gRPC server: the Denoiser service, health, reflection.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use denoised_proto::v1::denoiser_server::DenoiserServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::Status;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::DenoiserService;
use crate::config::Config;
use crate::engine::{EngineHandle, EngineStartError};
use crate::session::SessionStore;

/// Largest message accepted or sent (final images and previews travel inline).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] EngineStartError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How long a step already running gets to end once generations are told to stop.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the transport gets to deliver the streams' last messages before connections are
/// dropped (a client that does not read would otherwise hold the process).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A server running in the background of the current Tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    engine: EngineHandle,
    health: HealthReporter,
    draining: Arc<AtomicBool>,
    grace: Duration,
}

impl RunningServer {
    /// Stops accepting requests and waits (a bounded time) for open calls to end.
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        let _ = self.shutdown.send(());
        close(self.task).await
    }

    /// Graceful shutdown, as on SIGTERM: health reports NOT_SERVING and new Denoiser calls get
    /// UNAVAILABLE at once; running generations get the grace period (`shutdown_grace_secs`)
    /// to complete, then end with UNAVAILABLE; then the transport closes, with a bounded wait
    /// for slow readers.
    pub async fn drain(self) -> Result<(), tonic::transport::Error> {
        self.draining.store(true, Ordering::Release);
        self.health
            .set_not_serving::<DenoiserServer<DenoiserService>>()
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let running = self.engine.active_generations();
        tracing::info!(running, grace_s = self.grace.as_secs(), "draining");
        if !self.wait_idle(self.grace).await {
            tracing::warn!(
                running = self.engine.active_generations(),
                "grace period over; stopping running generations"
            );
            self.engine.stop_generations();
            self.wait_idle(STOP_WAIT).await;
        }
        let _ = self.shutdown.send(());
        close(self.task).await
    }

    /// Waits up to `limit` for the engine to hold no generation; true if it got there.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let start = Instant::now();
        while self.engine.active_generations() > 0 {
            if start.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Waits up to [`CLOSE_WAIT`] for the transport to finish its calls, then drops the connections.
async fn close(
    mut task: JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), tonic::transport::Error> {
    match tokio::time::timeout(CLOSE_WAIT, &mut task).await {
        Ok(result) => result.unwrap_or(Ok(())),
        Err(_) => {
            tracing::warn!("connections still open; closing them");
            task.abort();
            Ok(())
        }
    }
}

/// Loads the models, binds `config.listen` (port 0 picks a free port) and serves in the background.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let engine_config = config.clone();
    // Model loading is blocking work: keep it off the async workers.
    let engine = tokio::task::spawn_blocking(move || EngineHandle::start(&engine_config))
        .await
        .map_err(|_| EngineStartError::Died)??;
    let sessions = SessionStore::new(config.limits.clone());
    sessions.spawn_evictor();
    let service =
        DenoiserService::new(engine.clone(), Arc::clone(&sessions), config.limits.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DenoiserServer<DenoiserService>>()
        .await;
    // v1alpha too: grpcurl 1.8 and Python's grpcio-reflection only speak v1alpha.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(denoised_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(denoised_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let denoiser = DenoiserServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // While draining, every Denoiser call is refused; health and reflection keep answering.
    let draining = Arc::new(AtomicBool::new(false));
    let refuse_while_draining = {
        let draining = draining.clone();
        move |req: tonic::Request<()>| {
            if draining.load(Ordering::Acquire) {
                Err(Status::from(crate::error::ServiceError::ShuttingDown))
            } else {
                Ok(req)
            }
        }
    };
    let denoiser =
        tonic::service::interceptor::InterceptedService::new(denoiser, refuse_while_draining);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .trace_fn(crate::telemetry::grpc_request_span)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(denoiser)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );
    tracing::info!(%addr, "denoised listening");
    Ok(RunningServer {
        addr,
        shutdown: shutdown_tx,
        task,
        engine,
        health: health_reporter,
        draining,
        grace: Duration::from_secs(config.shutdown_grace_secs),
    })
}
