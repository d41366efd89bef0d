//! `herald-bench`: see the library's documentation and `docs/benchmarks.md`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use herald_bench::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error.into()),
    };
    if let Command::RawServer(options) = cli.command {
        return match runtime.block_on(herald_bench::raw::serve(options)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error),
        };
    }
    // Dropping the run on a signal drops every target, which kills every process it started.
    runtime.block_on(async {
        tokio::select! {
            result = herald_bench::cli::run(cli.command) => match result {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("herald-bench: some targets failed (see the notes above)");
                    ExitCode::FAILURE
                }
                Err(error) => fail(&error),
            },
            _ = interrupted() => {
                eprintln!("herald-bench: interrupted; stopping every process it started");
                ExitCode::from(130)
            }
        }
    })
}

async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("herald-bench: {error:#}");
    ExitCode::FAILURE
}
