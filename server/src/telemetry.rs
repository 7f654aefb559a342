//! Logging and tracing set-up. Spans: one per gRPC request (here), one per generation and one per
//! denoising step (engine). The OpenTelemetry exporter plugs in as one more subscriber layer.
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Structured logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}

/// The span of one gRPC request, created before it is entered (so a remote parent can be set
/// here once W3C trace context is extracted from the headers).
pub fn grpc_request_span(req: &http::Request<()>) -> tracing::Span {
    tracing::info_span!("grpc", path = %req.uri().path())
}
