//! `herald-chaos`: see the library's documentation and docs/operations.md.
//!
//! Exit status: 0 when every client got exactly what it was owed, 1 when something was lost,
//! duplicated, reordered or misdelivered, 2 when the run itself failed, 130 when interrupted.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use herald_chaos::{Options, Report};

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    let json = options.json.clone();
    // Dropping the run on a signal stops every gateway and removes every container it started.
    tokio::select! {
        result = herald_chaos::run(options) => match result {
            Ok(report) => finish(&report, json.as_deref()),
            Err(error) => {
                eprintln!("herald-chaos: {error:#}");
                ExitCode::from(2)
            }
        },
        _ = interrupted() => {
            eprintln!("herald-chaos: interrupted; stopping the gateways and removing the containers");
            ExitCode::from(130)
        }
    }
}

/// Prints the report and its one-line summary, writes the JSON file, and judges.
fn finish(report: &Report, json: Option<&std::path::Path>) -> ExitCode {
    print!("{}", report.render());
    println!("{}", report.summary());
    if let Some(path) = json {
        let written = serde_json::to_vec_pretty(report)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(path, bytes));
        if let Err(error) = written {
            eprintln!("herald-chaos: cannot write {}: {error}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
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
