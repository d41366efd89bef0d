//! `idle`: C connections held open doing nothing; the socket server's resident memory before and
//! after gives bytes per connection (and, for Herald and raw, NATS's share, since every Herald user
//! holds a subscription there).

use anyhow::Result;
use serde::Serialize;

use super::{Context, Outcome, progress, secs};
use crate::client::{Fleet, FleetOptions};
use crate::procfs::rss_bytes;
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::Target;

/// Sizes of the idle scenario.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct IdleOptions {
    /// Connections held idle.
    #[arg(id = "idle-connections", long = "idle-connections", value_name = "N", default_value_t = 19_000)]
    pub connections: usize,
    /// Seconds to wait after the last welcome before reading memory.
    #[arg(id = "idle-settle-secs", long = "idle-settle-secs", value_name = "SECS", default_value_t = 3.0)]
    pub settle_secs: f64,
}

/// What one target did.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// Connections asked for.
    pub connections: usize,
    /// Connections that got their welcome.
    pub connected: u64,
    /// Connections that failed to open.
    pub failed: u64,
    /// Connections the server closed while they were idle.
    pub ended_by_server: u64,
    /// Seconds from the first dial to the last welcome.
    pub connect_secs: f64,
    /// Which process holds the sockets.
    pub server: &'static str,
    /// Its RSS before the clients connected.
    pub server_rss_before: u64,
    /// Its RSS with the clients connected.
    pub server_rss_after: u64,
    /// (after − before) / connected.
    pub server_bytes_per_connection: Option<f64>,
    /// NATS's RSS growth per connection, when NATS is a separate process.
    pub nats_bytes_per_connection: Option<f64>,
    /// The first client errors.
    pub errors: Vec<String>,
}

/// Runs the idle scenario on every target.
pub async fn run(ctx: &Context, options: &IdleOptions) -> Report {
    let mut report = Report::new(
        "idle",
        format!("{} idle connections: resident memory of the socket server", options.connections),
        options,
    );
    ctx.each_target(&mut report, "idle", async |target| {
        let result = one(ctx, options, target).await?;
        let mut notes = Vec::new();
        if result.connected < result.connections as u64 {
            notes.push(format!(
                "{} of {} connected; first errors: {:?}",
                result.connected, result.connections, result.errors
            ));
        }
        if result.ended_by_server > 0 {
            notes.push(format!("the server closed {} idle connections", result.ended_by_server));
        }
        Ok(Outcome { measures: measures(&result), details: result, notes })
    })
    .await;
    report.note("bytes/conn = growth of VmRSS of the process holding the sockets / connections; NATS's own growth listed apart for Herald and raw");
    report
}

async fn one(ctx: &Context, options: &IdleOptions, target: &Target) -> Result<IdleResult> {
    let specs = ctx.specs(target, options.connections, "u", |_| None)?;
    let server_before = rss_bytes(target.server_pid())?;
    let nats_before = rss_bytes(target.nats_pid())?;
    let fleet = Fleet::launch(specs, &FleetOptions { connect_timeout: ctx.connect_timeout, ..FleetOptions::default() });
    fleet.wait_welcomed(ctx.connect_timeout * 2).await;
    let connect_secs = fleet.last_welcome().as_secs_f64();
    progress(&format!(
        "idle: {} of {} connected to {}",
        fleet.counts().welcomed,
        options.connections,
        target.kind.name()
    ));
    tokio::time::sleep(secs(options.settle_secs)).await;
    let server_after = rss_bytes(target.server_pid())?;
    let nats_after = rss_bytes(target.nats_pid())?;
    let counts = fleet.counts();
    let errors = fleet.errors();
    fleet.stop().await;
    let per_connection = |before: u64, after: u64| {
        (counts.welcomed > 0).then(|| (after as f64 - before as f64) / counts.welcomed as f64)
    };
    Ok(IdleResult {
        connections: options.connections,
        connected: counts.welcomed,
        failed: counts.failed,
        ended_by_server: counts.ended,
        connect_secs,
        server: target.kind.server_name(),
        server_rss_before: server_before,
        server_rss_after: server_after,
        server_bytes_per_connection: per_connection(server_before, server_after),
        nats_bytes_per_connection: target
            .has_separate_nats()
            .then(|| per_connection(nats_before, nats_after))
            .flatten(),
        errors,
    })
}

fn measures(result: &IdleResult) -> Vec<Measure> {
    vec![
        Measure::new("connected", "connected", Unit::Count, Better::Neither, Some(result.connected as f64)),
        Measure::new(
            "server_bytes_per_connection",
            "server bytes/conn",
            Unit::Bytes,
            Better::Lower,
            result.server_bytes_per_connection,
        ),
        Measure::new(
            "nats_bytes_per_connection",
            "NATS bytes/conn (separate)",
            Unit::Bytes,
            Better::Lower,
            result.nats_bytes_per_connection,
        ),
        Measure::new(
            "server_rss_after",
            "server RSS",
            Unit::Bytes,
            Better::Lower,
            Some(result.server_rss_after as f64),
        ),
        Measure::new("connect_secs", "time to connect all", Unit::Seconds, Better::Lower, Some(result.connect_secs)),
    ]
}
