//! `storm`: C clients connect at once (no limit on concurrent dials); the time until all have their
//! welcome. Then, after a few messages to every user, all reconnect at once, Herald clients with
//! `since` = their first welcome's `seq`: the time until all are live (Herald: their `replayed`
//! frame arrived; the peers have no resume, so live = welcome again).

use anyhow::Result;
use async_nats::Subject;
use serde::Serialize;

use super::{Context, Outcome, progress, secs};
use crate::client::{Fleet, FleetOptions, Percentiles};
use crate::procfs::listen_overflows;
use crate::publish;
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::{Target, TargetKind};

/// Sizes of the storm scenario.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct StormOptions {
    /// Clients connecting at once.
    #[arg(id = "storm-clients", long = "storm-clients", value_name = "N", default_value_t = 1_000)]
    pub clients: usize,
    /// Messages published to every user between the two rounds (what the resume replays).
    #[arg(id = "storm-backlog", long = "storm-backlog", value_name = "N", default_value_t = 1)]
    pub backlog: usize,
    /// Seconds a round may take until every client is welcomed.
    #[arg(id = "storm-timeout-secs", long = "storm-timeout-secs", value_name = "SECS", default_value_t = 30.0)]
    pub timeout_secs: f64,
    /// Seconds resuming clients may wait for `replayed` after all are welcomed.
    #[arg(
        id = "storm-live-timeout-secs",
        long = "storm-live-timeout-secs",
        value_name = "SECS",
        default_value_t = 10.0
    )]
    pub live_timeout_secs: f64,
    /// Seconds between the rounds, for the server to release the first round's sockets.
    #[arg(id = "storm-pause-secs", long = "storm-pause-secs", value_name = "SECS", default_value_t = 1.0)]
    pub pause_secs: f64,
}

/// One round of connections.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Round {
    /// Whether the clients resumed (Herald's second round).
    pub resumed: bool,
    /// Clients welcomed.
    pub welcomed: u64,
    /// Clients live.
    pub live: u64,
    /// Clients that failed to connect.
    pub failed: u64,
    /// Seconds from the launch to the last welcome, when every client was welcomed.
    pub all_welcomed_secs: Option<f64>,
    /// Seconds from the launch to the last client live, when every client went live.
    pub all_live_secs: Option<f64>,
    /// Per-client times from the launch to the welcome, in microseconds.
    pub welcome_us: Percentiles,
    /// Per-client times from the launch to live, in microseconds.
    pub live_us: Percentiles,
    /// Connections the kernel dropped for a full accept queue during the round (any listener on
    /// this machine; a dropped SYN costs the client a 1 s retransmit).
    pub listen_overflows: Option<u64>,
    /// `replayed` frames received.
    pub replayed_frames: u64,
    /// Messages received before going live (the replayed ones).
    pub replayed_msgs: u64,
    /// What went wrong, if anything.
    pub problem: Option<String>,
    /// The first client errors.
    pub errors: Vec<String>,
}

/// What one target did.
#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    /// C.
    pub clients: usize,
    /// The first round: fresh connections.
    pub connect: Round,
    /// Messages published between the rounds.
    pub backlog_published: u64,
    /// The second round: reconnections, resuming on Herald.
    pub resume: Round,
}

/// Runs the storm scenario on every target.
pub async fn run(ctx: &Context, options: &StormOptions) -> Report {
    let mut report = Report::new(
        "storm",
        format!("{} clients connecting at once, then all resuming at once", options.clients),
        options,
    );
    ctx.each_target(&mut report, "storm", async |target| {
        let result = one(ctx, options, target).await?;
        let notes = [("connect", &result.connect), ("resume", &result.resume)]
            .into_iter()
            .filter_map(|(name, round)| round.problem.as_ref().map(|problem| format!("{name}: {problem}")))
            .collect();
        Ok(Outcome { measures: measures(&result), details: result, notes })
    })
    .await;
    report.note("resume: Herald clients reconnect with since and are live at their replayed frame; nats-ws and raw have no resume, so they simply reconnect");
    report
}

async fn one(ctx: &Context, options: &StormOptions, target: &Target) -> Result<StormResult> {
    let (connect, seqs) = round(ctx, options, target, None).await?;
    progress(&format!("storm {}: connect round {:?} s", target.kind.name(), connect.all_welcomed_secs));
    tokio::time::sleep(secs(options.pause_secs)).await;
    let publisher = target.publisher().await?;
    let subjects = (0..options.clients)
        .flat_map(|i| std::iter::repeat_n(Subject::from(format!("push.user.u{i}")), options.backlog));
    let backlog_published = publish::burst(target, &publisher, subjects, ctx.payload_bytes).await?;
    let (resume, _) = round(ctx, options, target, Some(&seqs)).await?;
    progress(&format!("storm {}: resume round {:?} s", target.kind.name(), resume.all_live_secs));
    Ok(StormResult { clients: options.clients, connect, backlog_published, resume })
}

/// Connects every client at once; resuming from `since` (per client) when given. Returns the round
/// and each client's welcome `seq`.
async fn round(
    ctx: &Context,
    options: &StormOptions,
    target: &Target,
    since: Option<&[u64]>,
) -> Result<(Round, Vec<u64>)> {
    let resumed = since.is_some() && target.kind == TargetKind::Herald;
    let specs = ctx.specs(target, options.clients, "u", |i| since.map(|seqs| seqs[i]))?;
    let timeout = secs(options.timeout_secs);
    let overflows_before = listen_overflows().ok();
    let fleet = Fleet::launch(
        specs,
        &FleetOptions { connect_concurrency: None, connect_timeout: timeout, ..Default::default() },
    );
    let all_welcomed = fleet.wait_welcomed(timeout).await;
    let all_live = fleet.wait_live(secs(options.live_timeout_secs)).await;
    let counts = fleet.counts();
    let mut round = Round {
        resumed,
        welcomed: counts.welcomed,
        live: counts.live,
        failed: counts.failed,
        all_welcomed_secs: all_welcomed.then(|| fleet.last_welcome().as_secs_f64()),
        all_live_secs: all_live.then(|| fleet.last_live().as_secs_f64()),
        welcome_us: fleet.welcome_times(),
        live_us: fleet.live_times(),
        errors: fleet.errors(),
        listen_overflows: overflows_before.zip(listen_overflows().ok()).map(|(before, after)| after - before),
        ..Round::default()
    };
    let reports = fleet.stop().await;
    round.replayed_frames = reports.iter().filter(|r| r.replayed_count.is_some()).count() as u64;
    round.replayed_msgs = reports.iter().map(|r| r.msgs_before_live).sum();
    round.problem = if !all_welcomed {
        Some(format!("{} of {} welcomed within {timeout:?}", round.welcomed, options.clients))
    } else if !all_live {
        Some(format!(
            "{} of {} clients got no replayed frame within {} s of the welcomes (does the gateway resume yet?)",
            options.clients as u64 - round.live,
            options.clients,
            options.live_timeout_secs
        ))
    } else {
        None
    };
    // A client that never got a welcome resumes from the highest seq any client saw.
    let highest = reports.iter().filter_map(|r| r.welcome_seq).max().unwrap_or(0);
    let seqs = reports.iter().map(|r| r.welcome_seq.unwrap_or(highest)).collect();
    Ok((round, seqs))
}

fn measures(result: &StormResult) -> Vec<Measure> {
    let (connect, resume) = (&result.connect, &result.resume);
    let count = |n: u64| Some(n as f64);
    let m = |key: &str, label: &str, unit, better, value| Measure::new(key, label, unit, better, value);
    vec![
        m("connect_welcomed", "connect: welcomed", Unit::Count, Better::Neither, count(connect.welcomed)),
        m("connect_all_secs", "connect: all welcomed", Unit::Seconds, Better::Lower, connect.all_welcomed_secs),
        m("connect_p50_us", "connect: p50 welcome", Unit::Micros, Better::Lower, Some(connect.welcome_us.p50)),
        m("connect_p99_us", "connect: p99 welcome", Unit::Micros, Better::Lower, Some(connect.welcome_us.p99)),
        m(
            "connect_overflows",
            "connect: accept-queue drops (host)",
            Unit::Count,
            Better::Neither,
            connect.listen_overflows.map(|n| n as f64),
        ),
        m("resume_welcomed", "resume: welcomed", Unit::Count, Better::Neither, count(resume.welcomed)),
        m("resume_live", "resume: live", Unit::Count, Better::Neither, count(resume.live)),
        m("resume_all_secs", "resume: all live", Unit::Seconds, Better::Lower, resume.all_live_secs),
        m(
            "resume_p99_us",
            "resume: p99 live",
            Unit::Micros,
            Better::Lower,
            (resume.live > 0).then_some(resume.live_us.p99),
        ),
        m("resume_replayed_msgs", "resume: replayed msgs", Unit::Count, Better::Neither, count(resume.replayed_msgs)),
        m(
            "resume_overflows",
            "resume: accept-queue drops (host)",
            Unit::Count,
            Better::Neither,
            resume.listen_overflows.map(|n| n as f64),
        ),
    ]
}
