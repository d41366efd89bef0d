//! The scenarios, each run on every target in turn, each target started fresh for it:
//!
//! - [`idle`]: memory per idle connection;
//! - [`fanout`]: the most `push.all` deliveries per second that still keep up;
//! - [`unicast`]: publish→receive latency of messages to single users, at fractions of that maximum;
//! - [`storm`]: many clients connecting at once, then all resuming at once;
//! - [`replay`]: one client catching up on many stored messages.

pub mod fanout;
pub mod idle;
pub mod replay;
pub mod storm;
pub mod unicast;

use std::time::Duration;

use anyhow::Result;

use crate::client::ClientSpec;
use crate::limits;
use crate::report::{Measure, Report};
use crate::targets::{Target, TargetKind, Tools};

/// What every scenario needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// Programs and logs.
    pub tools: Tools,
    /// Targets, in order.
    pub targets: Vec<TargetKind>,
    /// Size of every published payload.
    pub payload_bytes: usize,
    /// Source addresses to spread client sockets over (default: as many as the count needs).
    pub sources: Option<usize>,
    /// Longest a client may take to connect and get its welcome.
    pub connect_timeout: Duration,
}

impl Context {
    /// Client specs for users `<prefix>0 … <prefix><count-1>` of `target`, spread over source
    /// addresses; `since(i)` is the resume point of user i, if any.
    pub fn specs(
        &self,
        target: &Target,
        count: usize,
        prefix: &str,
        since: impl Fn(usize) -> Option<u64>,
    ) -> Result<Vec<ClientSpec>> {
        limits::check_fds(count)?;
        let sources = limits::sources(count, self.sources);
        Ok((0..count).map(|i| target.client(&format!("{prefix}{i}"), since(i), sources[i % sources.len()])).collect())
    }

    /// Starts `kind`, runs `body` on it, and stops it whatever happened; `label` names the logs.
    pub async fn on_target<T>(
        &self,
        kind: TargetKind,
        label: &str,
        body: impl AsyncFnOnce(&Target) -> Result<T>,
    ) -> Result<T> {
        progress(&format!("{label}: starting {}", kind.name()));
        let mut target = Target::start(kind, &self.tools, &format!("{label}-{}", kind.name())).await?;
        let result = body(&target).await;
        let crashed = target.check_running().err();
        target.stop().await;
        match (result, crashed) {
            (Err(error), Some(crash)) => Err(error.context(format!("{crash:#}"))),
            (result, _) => result,
        }
    }

    /// Runs `one` on every target into `report`; a target that fails is recorded as such and the
    /// others still run.
    pub async fn each_target<T: serde::Serialize>(
        &self,
        report: &mut Report,
        label: &str,
        one: impl AsyncFn(&Target) -> Result<Outcome<T>>,
    ) {
        for &kind in &self.targets {
            match self.on_target(kind, label, async |target| one(target).await).await {
                Ok(outcome) => {
                    report.add(kind, outcome.details, outcome.measures);
                    for note in outcome.notes {
                        report.note(format!("{}: {note}", kind.name()));
                    }
                }
                Err(error) => {
                    progress(&format!("{label}: {} failed: {error:#}", kind.name()));
                    report.add_error(kind, &error);
                }
            }
        }
    }
}

/// What a scenario found on one target.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    /// The detailed result (JSON).
    pub details: T,
    /// The figures for the table.
    pub measures: Vec<Measure>,
    /// Problems worth a note under the table.
    pub notes: Vec<String>,
}

/// A progress line on stderr.
pub fn progress(message: &str) {
    eprintln!("[herald-bench] {message}");
}

/// Seconds as a [`Duration`] (flags take seconds).
pub fn secs(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

/// CPU use of the target's processes and of this tool over an interval, in percent of one core.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    /// The process holding the sockets (gateway, nats-server, raw-server).
    pub server: Option<f64>,
    /// nats-server, when separate from the socket server.
    pub nats: Option<f64>,
    /// This tool (clients and publisher).
    pub tool: Option<f64>,
}

/// Measures [`CpuUse`] from its start.
pub struct CpuMeters {
    server: crate::procfs::CpuMeter,
    nats: Option<crate::procfs::CpuMeter>,
    tool: crate::procfs::CpuMeter,
}

impl CpuMeters {
    /// Starts measuring the processes of `target` and this tool.
    pub fn start(target: &Target) -> Result<CpuMeters> {
        use crate::procfs::CpuMeter;
        Ok(CpuMeters {
            server: CpuMeter::start(target.server_pid())?,
            nats: if target.has_separate_nats() { Some(CpuMeter::start(target.nats_pid())?) } else { None },
            tool: CpuMeter::start(std::process::id())?,
        })
    }

    /// CPU used since the start.
    pub fn read(&self) -> CpuUse {
        CpuUse {
            server: self.server.percent(),
            nats: self.nats.as_ref().and_then(|meter| meter.percent()),
            tool: self.tool.percent(),
        }
    }
}
