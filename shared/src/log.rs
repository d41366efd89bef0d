//! Logging for Herald's binaries: `HERALD_LOG` filters (default `info`, async-nats at `warn`), lines
//! go to stderr (stdout is for what commands print: tokens, sequences), colours only on a terminal.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber; call once at the start of `main`.
pub fn init() -> Result<(), String> {
    init_with("info,async_nats=warn")
}

/// Installs the log subscriber with `default` as the filter when `HERALD_LOG` is not set (a
/// command-line tool says what went wrong itself, without the NATS client's own lines). A
/// `HERALD_LOG` that is not a filter is an error: the operator who set it meant something, and a
/// silent default would hide the lines they asked for.
pub fn init_with(default: &str) -> Result<(), String> {
    let filter = match std::env::var("HERALD_LOG") {
        Ok(filter) if !filter.is_empty() => EnvFilter::try_new(&filter)
            .map_err(|error| format!("HERALD_LOG={filter:?} is not a log filter: {error}"))?,
        Ok(_) | Err(std::env::VarError::NotPresent) => EnvFilter::new(default),
        Err(std::env::VarError::NotUnicode(_)) => return Err("HERALD_LOG is not UTF-8".into()),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}
