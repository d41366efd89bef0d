//! `replay`: one client catches up on K messages. On Herald, K messages are stored for one user
//! first, then the client connects with `since=0`: messages per second from the dial to its
//! `replayed` frame. The peers store nothing, so for them the same client receives a burst of K
//! live messages published back to back: the rate one socket can take, as a reference.

use anyhow::{Result, bail};
use async_nats::Subject;
use serde::Serialize;

use super::{Context, Outcome, progress, secs};
use crate::client::{Fleet, FleetOptions};
use crate::publish;
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::{Target, TargetKind};

/// The user whose messages are replayed.
const USER: &str = "replay0";
/// Burst messages published before waiting for the client to catch up, so a burst never
/// overflows a socket queue (1 MiB on the raw server, about 10,000 messages of 100 B).
const BURST_WINDOW: u64 = 1_000;

/// Sizes of the replay scenario.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ReplayOptions {
    /// Messages to replay.
    #[arg(id = "replay-messages", long = "replay-messages", value_name = "N", default_value_t = 100_000)]
    pub messages: usize,
    /// Seconds the replay (or burst) may take.
    #[arg(id = "replay-timeout-secs", long = "replay-timeout-secs", value_name = "SECS", default_value_t = 60.0)]
    pub timeout_secs: f64,
}

/// What one target did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayResult {
    /// `replay` (Herald: stored, then resumed) or `burst` (peers: live, back to back).
    pub mode: &'static str,
    /// Messages published.
    pub published: u64,
    /// Messages the stream held before the client connected (Herald).
    pub stored: Option<u64>,
    /// Messages the client received (before `replayed`, in replay mode).
    pub received: u64,
    /// The `count` of the `replayed` frame.
    pub replayed_count: Option<u64>,
    /// Seconds from the dial (replay) or the first publish (burst) to the last message.
    pub secs: Option<f64>,
    /// received / secs.
    pub msgs_per_sec: Option<f64>,
    /// What went wrong, if anything.
    pub problem: Option<String>,
}

/// Runs the replay scenario on every target.
pub async fn run(ctx: &Context, options: &ReplayOptions) -> Report {
    let mut ctx = ctx.clone();
    ctx.tools.stream_max_msgs_per_subject = Some(options.messages.max(1000) as u64);
    let mut report = Report::new("replay", format!("one client catching up on {} messages", options.messages), options);
    ctx.each_target(&mut report, "replay", async |target| {
        let result = match target.kind {
            TargetKind::Herald => replay(&ctx, options, target).await?,
            _ => burst(&ctx, options, target).await?,
        };
        progress(&format!("replay {}: {:?} msgs/s ({})", target.kind.name(), result.msgs_per_sec, result.mode));
        let notes = result.problem.iter().cloned().collect();
        Ok(Outcome { measures: measures(&result), details: result, notes })
    })
    .await;
    report.note("herald: stored, then replayed with since=0 (dial to replayed frame); nats-ws and raw store nothing: a live burst to one client, for reference");
    report
}

fn subjects(count: usize) -> impl Iterator<Item = Subject> {
    std::iter::repeat_n(Subject::from(format!("push.user.{USER}")), count)
}

async fn replay(ctx: &Context, options: &ReplayOptions, target: &Target) -> Result<ReplayResult> {
    let publisher = target.publisher().await?;
    let published = publish::burst(target, &publisher, subjects(options.messages), ctx.payload_bytes).await?;
    let stored = target.stored_messages(&publisher).await?;
    let fleet = Fleet::launch(vec![target.client(USER, Some(0), None)], &FleetOptions::default());
    if !fleet.wait_welcomed(ctx.connect_timeout).await {
        bail!("the client did not connect: {:?}", fleet.errors());
    }
    let live = fleet.wait_live(secs(options.timeout_secs)).await;
    let took = fleet.last_live().as_secs_f64();
    let report = fleet.stop().await.pop().unwrap_or_default();
    let received = report.msgs_before_live;
    Ok(ReplayResult {
        mode: "replay",
        published,
        stored,
        received,
        replayed_count: report.replayed_count,
        secs: live.then_some(took),
        msgs_per_sec: (live && took > 0.0).then(|| received as f64 / took),
        problem: (!live).then(|| {
            format!(
                "no replayed frame within {} s ({} messages arrived): does the gateway resume yet?",
                options.timeout_secs, report.msgs
            )
        }),
    })
}

async fn burst(ctx: &Context, options: &ReplayOptions, target: &Target) -> Result<ReplayResult> {
    let publisher = target.publisher().await?;
    let fleet = Fleet::launch(vec![target.client(USER, None, None)], &FleetOptions::default());
    if !fleet.wait_welcomed(ctx.connect_timeout).await {
        bail!("the client did not connect: {:?}", fleet.errors());
    }
    let started = fleet.elapsed();
    let deadline = tokio::time::Instant::now() + secs(options.timeout_secs);
    let mut published = 0u64;
    let mut complete = true;
    while published < options.messages as u64 && complete {
        let chunk = BURST_WINDOW.min(options.messages as u64 - published) as usize;
        published += publish::burst(target, &publisher, subjects(chunk), ctx.payload_bytes).await?;
        // At most two windows in flight.
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        complete = fleet.wait_msgs(published.saturating_sub(BURST_WINDOW), wait).await;
    }
    complete =
        complete && fleet.wait_msgs(published, deadline.saturating_duration_since(tokio::time::Instant::now())).await;
    let took = fleet.last_msg().saturating_sub(started).as_secs_f64();
    let received = fleet.counts().msgs;
    fleet.stop().await;
    Ok(ReplayResult {
        mode: "burst",
        published,
        stored: None,
        received,
        replayed_count: None,
        secs: complete.then_some(took),
        msgs_per_sec: (complete && took > 0.0).then(|| received as f64 / took),
        problem: (!complete).then(|| format!("{received} of {published} arrived within {} s", options.timeout_secs)),
    })
}

fn measures(result: &ReplayResult) -> Vec<Measure> {
    vec![
        Measure::new("received", "messages received", Unit::Count, Better::Neither, Some(result.received as f64)),
        Measure::new("secs", "time", Unit::Seconds, Better::Lower, result.secs),
        Measure::new("msgs_per_sec", "messages/s to one client", Unit::PerSec, Better::Higher, result.msgs_per_sec),
    ]
}
