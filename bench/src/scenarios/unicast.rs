//! `unicast`: C users, one connection each; messages to random users (`push.user.<id>`) at fixed
//! rates, fractions of a maximum. The maximum is the reference target's (Herald's) highest sustained
//! unicast rate, searched first with rising steps (or given with `--unicast-max`). Each payload
//! carries its publish time, so every delivery is a publish→receive latency sample.

use std::time::Duration;

use anyhow::{Result, bail};
use async_nats::Subject;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::fanout::DRAIN_SHARE;
use super::{Context, CpuMeters, CpuUse, Outcome, progress, secs};
use crate::client::{Counts, Fleet, FleetOptions, Percentiles};
use crate::publish::{self, Paced};
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::{Target, TargetKind};

/// Sizes of the unicast scenario.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct UnicastOptions {
    /// Users (one connection each).
    #[arg(id = "unicast-users", long = "unicast-users", value_name = "N", default_value_t = 1_000)]
    pub users: usize,
    /// Load levels, in percent of the maximum, comma-separated.
    #[arg(id = "unicast-levels", long = "unicast-levels", value_name = "LIST", value_delimiter = ',', default_values_t = [25.0, 50.0, 75.0])]
    pub levels: Vec<f64>,
    /// The maximum in messages (= deliveries) per second. Default: searched on Herald (or on the
    /// first target) at the same C in this run.
    #[arg(id = "unicast-max", long = "unicast-max", value_name = "N")]
    pub max: Option<f64>,
    /// Messages per second of the search's first step.
    #[arg(id = "unicast-start", long = "unicast-start", value_name = "N", default_value_t = 5_000.0)]
    pub start: f64,
    /// Rate multiplier from one search step to the next (the maximum's resolution).
    #[arg(id = "unicast-factor", long = "unicast-factor", value_name = "N", default_value_t = 1.25)]
    pub factor: f64,
    /// Most steps of the search.
    #[arg(id = "unicast-max-steps", long = "unicast-max-steps", value_name = "N", default_value_t = 14)]
    pub max_steps: usize,
    /// Seconds each level publishes.
    #[arg(id = "unicast-secs", long = "unicast-secs", value_name = "SECS", default_value_t = 3.0)]
    pub secs: f64,
    /// Seconds to wait for the last deliveries of a level.
    #[arg(id = "unicast-drain-secs", long = "unicast-drain-secs", value_name = "SECS", default_value_t = 5.0)]
    pub drain_secs: f64,
}

/// Where the rates come from.
#[derive(Debug, Clone, Serialize)]
pub struct Basis {
    /// Messages (= deliveries) per second that the levels are fractions of.
    pub max_msgs_per_sec: f64,
    /// Where that number comes from.
    pub source: String,
    /// The search's steps, when it was searched.
    pub steps: Vec<SearchStep>,
}

/// One step of the search for the maximum.
#[derive(Debug, Clone, Serialize)]
pub struct SearchStep {
    /// Messages per second asked of the publisher.
    pub nominal_msgs_per_sec: f64,
    /// Messages published.
    pub sent: u64,
    /// Messages received by the end of the allowed lateness.
    pub received: u64,
    /// Messages the stream stored during the step (Herald).
    pub stored: Option<u64>,
    /// CPU use over the step.
    pub cpu: CpuUse,
    /// Whether the step kept up.
    pub kept_up: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// One load level on one target.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Percent of the maximum.
    pub percent: f64,
    /// Messages per second asked of the publisher.
    pub nominal_msgs_per_sec: f64,
    /// Messages per second published.
    pub published_msgs_per_sec: f64,
    /// Messages published.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Publish→receive latency of the received messages, in microseconds.
    pub latency_us: Percentiles,
    /// Connections the server closed during the level.
    pub ended_by_server: u64,
    /// Messages the stream stored during the level (Herald).
    pub stored: Option<u64>,
    /// CPU use over the level (publishing and draining).
    pub cpu: CpuUse,
}

/// Runs the unicast scenario on every target. Without `--unicast-max`, it first searches the
/// unicast maximum of the reference target (Herald if measured) at the same C.
pub async fn run(ctx: &Context, options: &UnicastOptions) -> Report {
    let basis = match options.max {
        Some(max) => Ok(Basis { max_msgs_per_sec: max, source: "--unicast-max".into(), steps: Vec::new() }),
        None => find_basis(ctx, options).await,
    };
    let mut report = Report::new(
        "unicast",
        format!("{} users, messages to random users: publish→receive latency", options.users),
        serde_json::json!({ "options": options, "basis": basis.as_ref().ok() }),
    );
    let basis = match basis {
        Ok(basis) => basis,
        Err(error) => {
            report.note(format!("no maximum to take fractions of: {error:#}"));
            report.ok = false;
            return report;
        }
    };
    report.note(format!(
        "levels are % of {:.0} msgs/s ({}); every target gets the same rates",
        basis.max_msgs_per_sec, basis.source
    ));
    ctx.each_target(&mut report, "unicast", async |target| {
        let levels = levels(ctx, options, target, &basis).await?;
        let notes = levels
            .iter()
            .filter(|level| level.received < level.sent || level.ended_by_server > 0)
            .map(|level| {
                let stored = level.stored.map(|stored| format!(" ({stored} stored by the stream)")).unwrap_or_default();
                format!(
                    "{}%: {} of {} received{stored}, {} connections closed by the server",
                    level.percent, level.received, level.sent, level.ended_by_server
                )
            })
            .collect();
        Ok(Outcome { measures: levels.iter().flat_map(measures).collect(), details: levels, notes })
    })
    .await;
    report
}

/// The highest unicast rate the reference target sustains at C = users: rates rise by the factor
/// each step; a step keeps up when the publisher held its pace and every message arrived no later
/// than a tenth of the step after it ended (so no backlog built up), with no connection closed.
async fn find_basis(ctx: &Context, options: &UnicastOptions) -> Result<Basis> {
    let kind = if ctx.targets.contains(&TargetKind::Herald) { TargetKind::Herald } else { ctx.targets[0] };
    progress(&format!("unicast: searching the unicast maximum of {} at C={}", kind.name(), options.users));
    let steps = ctx.on_target(kind, "unicast-search", async |target| search(ctx, options, target).await).await?;
    let best = steps.iter().filter(|step| step.kept_up).map(|step| step.nominal_msgs_per_sec).reduce(f64::max);
    match best {
        Some(max) => Ok(Basis {
            max_msgs_per_sec: max,
            source: format!("unicast maximum of {} at C={}", kind.name(), options.users),
            steps,
        }),
        None => bail!("{} kept up with no unicast step", kind.name()),
    }
}

/// C connected users and a publisher sending them messages at random, one step at a time.
struct Load<'a> {
    ctx: &'a Context,
    target: &'a Target,
    fleet: Fleet,
    publisher: async_nats::Client,
    subjects: Vec<Subject>,
    rng: StdRng,
}

/// What one step of [`Load::run`] did.
struct Run {
    before: Counts,
    after: Counts,
    paced: Paced,
    /// Every message arrived within the wait.
    arrived: bool,
    cpu: CpuUse,
    /// Messages the stream stored meanwhile (Herald only).
    stored: Option<u64>,
}

impl<'a> Load<'a> {
    async fn start(ctx: &'a Context, options: &UnicastOptions, target: &'a Target, seed: u64) -> Result<Load<'a>> {
        let fleet = connect(ctx, options, target).await?;
        let publisher = target.publisher().await?;
        let subjects = user_subjects(options.users);
        Ok(Load { ctx, target, fleet, publisher, subjects, rng: StdRng::seed_from_u64(seed) })
    }

    /// Publishes at `rate` for `duration`, then waits up to `wait` for every message to arrive.
    async fn run(&mut self, rate: f64, duration: Duration, wait: Duration) -> Result<Run> {
        let Load { ctx, target, fleet, publisher, subjects, rng } = self;
        let before = fleet.counts();
        let stored_before = target.stored_last_seq(publisher).await?;
        let meters = CpuMeters::start(target)?;
        let paced = publish::paced(publisher, rate, duration, ctx.payload_bytes, |_| {
            subjects[rng.random_range(0..subjects.len())].clone()
        })
        .await?;
        let arrived = fleet.wait_msgs(before.msgs + paced.sent, wait).await;
        let cpu = meters.read();
        let after = fleet.counts();
        let stored = stored_before.zip(target.stored_last_seq(publisher).await?).map(|(b, a)| a - b);
        Ok(Run { before, after, paced, arrived, cpu, stored })
    }
}

async fn search(ctx: &Context, options: &UnicastOptions, target: &Target) -> Result<Vec<SearchStep>> {
    let mut load = Load::start(ctx, options, target, 7).await?;
    let mut steps: Vec<SearchStep> = Vec::new();
    let mut rate = options.start;
    for _ in 0..options.max_steps.max(1) {
        let allowed = secs(options.secs * DRAIN_SHARE);
        let Run { before, after, paced, arrived, cpu, stored } = load.run(rate, secs(options.secs), allowed).await?;
        let reason = if !paced.kept_pace() {
            Some(format!("the publisher fell behind ({} of {} sent)", paced.sent, paced.planned))
        } else if after.ended > before.ended {
            Some(format!("{} connections closed by the server", after.ended - before.ended))
        } else if !arrived {
            Some(format!(
                "{} of {} arrived within {:.2} s of the step's end",
                after.msgs - before.msgs,
                paced.sent,
                allowed.as_secs_f64()
            ))
        } else {
            None
        };
        let kept_up = reason.is_none();
        progress(&format!(
            "unicast search {} at {rate:.0} msgs/s: {}",
            target.kind.name(),
            reason.as_deref().unwrap_or("kept up")
        ));
        steps.push(SearchStep {
            nominal_msgs_per_sec: rate,
            sent: paced.sent,
            received: after.msgs - before.msgs,
            stored,
            cpu,
            kept_up,
            reason,
        });
        if !kept_up {
            break;
        }
        rate *= options.factor;
    }
    load.fleet.stop().await;
    Ok(steps)
}

/// C clients, one per user `u<i>`, connected and welcomed.
async fn connect(ctx: &Context, options: &UnicastOptions, target: &Target) -> Result<Fleet> {
    let fleet = Fleet::launch(
        ctx.specs(target, options.users, "u", |_| None)?,
        &FleetOptions { record_latency: true, connect_timeout: ctx.connect_timeout, ..FleetOptions::default() },
    );
    if !fleet.wait_welcomed(ctx.connect_timeout * 2).await {
        bail!("{} of {} clients connected; errors: {:?}", fleet.counts().welcomed, options.users, fleet.errors());
    }
    Ok(fleet)
}

fn user_subjects(users: usize) -> Vec<Subject> {
    (0..users).map(|i| Subject::from(format!("push.user.u{i}"))).collect()
}

async fn levels(ctx: &Context, options: &UnicastOptions, target: &Target, basis: &Basis) -> Result<Vec<Level>> {
    let mut load = Load::start(ctx, options, target, 42).await?;
    let mut levels = Vec::new();
    for &percent in &options.levels {
        let rate = basis.max_msgs_per_sec * percent / 100.0;
        load.fleet.reset_latency();
        let Run { before, after, paced, cpu, stored, .. } =
            load.run(rate, secs(options.secs), secs(options.drain_secs)).await?;
        let level = Level {
            percent,
            nominal_msgs_per_sec: rate,
            published_msgs_per_sec: paced.rate(),
            sent: paced.sent,
            received: after.msgs - before.msgs,
            latency_us: load.fleet.latency(),
            ended_by_server: after.ended - before.ended,
            stored,
            cpu,
        };
        progress(&format!(
            "unicast {} at {percent}% ({rate:.0} msgs/s): {} of {} received, p99 {:.2} ms",
            target.kind.name(),
            level.received,
            level.sent,
            level.latency_us.p99 / 1000.0
        ));
        levels.push(level);
    }
    load.fleet.stop().await;
    Ok(levels)
}

fn measures(level: &Level) -> Vec<Measure> {
    let at = level.percent;
    let latency = |key: &str, label: &str, value: f64| {
        let value = (level.latency_us.count > 0).then_some(value);
        Measure::new(format!("{key}@{at}"), format!("{at}%: {label}"), Unit::Micros, Better::Lower, value)
    };
    vec![
        Measure::new(
            format!("published@{at}"),
            format!("{at}%: published msgs/s"),
            Unit::PerSec,
            Better::Neither,
            Some(level.published_msgs_per_sec),
        ),
        Measure::new(
            format!("lost@{at}"),
            format!("{at}%: not received"),
            Unit::Count,
            Better::Lower,
            Some((level.sent - level.received.min(level.sent)) as f64),
        ),
        latency("p50", "p50", level.latency_us.p50),
        latency("p99", "p99", level.latency_us.p99),
        latency("p999", "p99.9", level.latency_us.p999),
        latency("max", "max", level.latency_us.max),
        Measure::new(
            format!("server_cpu@{at}"),
            format!("{at}%: server CPU"),
            Unit::Percent,
            Better::Neither,
            level.cpu.server,
        ),
        Measure::new(
            format!("nats_cpu@{at}"),
            format!("{at}%: NATS CPU (separate)"),
            Unit::Percent,
            Better::Neither,
            level.cpu.nats,
        ),
        Measure::new(
            format!("tool_cpu@{at}"),
            format!("{at}%: tool CPU"),
            Unit::Percent,
            Better::Neither,
            level.cpu.tool,
        ),
    ]
}
