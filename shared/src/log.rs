//! Logging for Herald's binaries: `HERALD_LOG` filters (default `info`, async-nats at `warn`), lines
//! go to stderr (stdout is for what commands print: tokens, sequences), colours only on a terminal.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber; call once at the start of `main`.
pub fn init() {
    init_with("info,async_nats=warn");
}

/// Installs the log subscriber with `default` as the filter when `HERALD_LOG` is not set (a
/// command-line tool says what went wrong itself, without the NATS client's own lines).
pub fn init_with(default: &str) {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
