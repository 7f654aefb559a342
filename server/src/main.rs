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
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let signal = signals.next().await;
    tracing::info!(signal, "shutting down");
    tokio::select! {
        result = running.drain() => match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("server error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        signal = signals.next() => {
            tracing::warn!(signal, "second signal: exiting without draining");
            std::process::ExitCode::from(130)
        }
    }
}

/// SIGTERM (orchestrators) and SIGINT (Ctrl-C) both start a graceful shutdown.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
