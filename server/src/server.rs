//! Assembles and runs the gRPC server: the Denoiser service, health, reflection.
use std::net::SocketAddr;
use std::sync::Arc;

use denoised_proto::v1::denoiser_server::DenoiserServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

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

/// A server running in the background of the current Tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Stops accepting requests and waits for the server task to end.
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        let _ = self.shutdown.send(());
        self.task.await.unwrap_or(Ok(()))
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
    let service = DenoiserService::new(engine, Arc::clone(&sessions), config.limits.clone());

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
    })
}
