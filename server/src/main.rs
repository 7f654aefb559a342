//! `denoised`: serve diffusion transformers with step caching over gRPC.
use clap::Parser;
use denoised_server::config::{Args, Config};
use denoised_server::{server, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::init_logging();
    let args = Args::parse();
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if config.models.is_empty() {
        tracing::warn!("no model configured (pass --model NAME=PATH); serving an empty model list");
    }
    let running = match server::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("start-up failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!("cannot wait for Ctrl-C: {e}");
    }
    tracing::info!("shutting down");
    match running.shutdown().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
