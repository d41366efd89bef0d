//! `herald-functions`: runs the built-in push functions until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use herald_functions::Config;
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
    herald_shared::log::init();
    let cli = Cli::parse();
    let config: Config = match herald_shared::config::load(cli.config.as_deref(), &cli.flags) {
        Ok(config) => config,
        Err(error) => fail(error),
    };
    let runtime = match herald_functions::start(&config).await {
        Ok(runtime) => runtime,
        Err(error) => fail(error),
    };
    wait_for_signal().await;
    tracing::info!("stopping: finishing calls in flight");
    tokio::select! {
        _ = runtime.shutdown() => {}
        _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
    }
}

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
