//! `herald-functions`: runs the built-in push functions until SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use herald_functions::{Config, StartError};
use serde::Serialize;

/// Herald's push functions. Settings: defaults < --config file < HERALD_* environment < flags.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (also HERALD_CONFIG).
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

/// Flags that override the file and the environment.
#[derive(clap::Args, Serialize)]
struct Flags {
    /// NATS server URL(s), comma-separated.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_url: Option<String>,
    /// Address of the /metrics listener, e.g. 127.0.0.1:9090.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
}

#[tokio::main]
async fn main() {
    if let Err(error) = herald_shared::log::init() {
        fail(error);
    }
    let cli = Cli::parse();
    let config: Config = match herald_shared::config::load(cli.config.as_deref(), &cli.flags) {
        Ok(config) => config,
        Err(error) => fail(error),
    };
    let runtime = tokio::select! {
        runtime = start(&config) => runtime,
        _ = wait_for_signal() => return,
    };
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = runtime.nats_client_lost() => {
            tracing::error!("exiting: the NATS client stopped for good (restart this process)");
            std::process::exit(1);
        }
    }
    tracing::info!("stopping: finishing calls in flight");
    tokio::select! {
        _ = runtime.shutdown() => {}
        _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
    }
}

/// Starts the functions, trying again while NATS or JetStream is not ready (a cluster still electing
/// its leaders, a server still starting, concurrent first-time setup by gateways); other errors end
/// the process.
async fn start(config: &Config) -> herald_functions::Runtime {
    let mut delay = Duration::from_millis(500);
    loop {
        match herald_functions::start(config).await {
            Ok(runtime) => return runtime,
            Err(StartError::Nats(error)) => {
                tracing::warn!(%error, retry_in = ?delay, "NATS not ready: starting again soon");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_START_DELAY);
            }
            Err(error) => fail(error),
        }
    }
}

/// The longest wait between two start attempts.
const MAX_START_DELAY: Duration = Duration::from_secs(10);

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .unwrap_or_else(|error| fail(format!("cannot listen for SIGTERM: {error}")));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn fail(error: impl std::fmt::Display) -> ! {
    eprintln!("herald-functions: {error}");
    std::process::exit(2);
}
