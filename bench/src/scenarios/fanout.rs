//! `fanout`: C connections, messages to `push.all` at a rising rate until deliveries stop keeping
//! up. Each step publishes for a fixed time at `rate / C` messages per second; it keeps up when
//! every expected delivery (messages × C) has arrived at most [`DRAIN_SHARE`] of the step's
//! duration after the step ended (so the deliveries took at most 1.1 × the step: ≥ 91% of the
//! offered rate), the publisher held its pace and no connection was closed. The result is the
//! highest offered rate that kept up, with the CPU the processes used at that step.

use std::time::Instant;

use anyhow::{Result, bail};
use async_nats::Subject;
use serde::Serialize;

use super::{Context, CpuMeters, CpuUse, Outcome, progress, secs};
use crate::client::{Fleet, FleetOptions};
use crate::publish;
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::Target;

/// How late, as a share of the step's duration, the last delivery of a step may arrive.
pub const DRAIN_SHARE: f64 = 0.1;
/// Share of the nominal rate the publisher must reach for a step to count.
const PUBLISHER_SHARE: f64 = 0.95;

/// Sizes of the fanout scenario.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FanoutOptions {
    /// Connection counts to measure, comma-separated.
    #[arg(id = "fanout-connections", long = "fanout-connections", value_name = "LIST", value_delimiter = ',', default_values_t = [1_000, 10_000])]
    pub connections: Vec<usize>,
    /// Deliveries per second of the first step.
    #[arg(id = "fanout-start", long = "fanout-start", value_name = "N", default_value_t = 50_000.0)]
    pub start: f64,
    /// Rate multiplier from one step to the next (the result's resolution).
    #[arg(id = "fanout-factor", long = "fanout-factor", value_name = "N", default_value_t = 1.4)]
    pub factor: f64,
    /// Seconds each step publishes.
    #[arg(id = "fanout-step-secs", long = "fanout-step-secs", value_name = "SECS", default_value_t = 2.0)]
    pub step_secs: f64,
    /// Seconds to wait for the last deliveries of a step (to see how late they are; a step keeps
    /// up only when they come within 10% of its duration).
    #[arg(id = "fanout-grace-secs", long = "fanout-grace-secs", value_name = "SECS", default_value_t = 1.0)]
    pub grace_secs: f64,
    /// Most steps per connection count.
    #[arg(id = "fanout-max-steps", long = "fanout-max-steps", value_name = "N", default_value_t = 20)]
    pub max_steps: usize,
}

/// One step of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Messages per second asked of the publisher.
    pub nominal_msgs_per_sec: f64,
    /// Messages published.
    pub sent: u64,
    /// Deliveries per second offered: sent × C / publishing time.
    pub offered_deliveries_per_sec: f64,
    /// Deliveries expected (sent × C).
    pub expected: u64,
    /// Deliveries that arrived while the step published.
    pub received_in_window: u64,
    /// Deliveries that arrived by the end of the grace.
    pub received: u64,
    /// Seconds from the end of publishing to the last delivery (or the end of the grace).
    pub drain_secs: f64,
    /// Connections the server closed during the step.
    pub ended_by_server: u64,
    /// Messages the stream stored during the step (Herald).
    pub stored: Option<u64>,
    /// CPU use over the step.
    pub cpu: CpuUse,
    /// Whether the step kept up.
    pub kept_up: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// The search at one connection count.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutRun {
    /// C.
    pub connections: usize,
    /// The highest offered deliveries per second that kept up.
    pub max_sustained_deliveries_per_sec: Option<f64>,
    /// CPU use at that step.
    pub cpu_at_max: Option<CpuUse>,
    /// Why the search stopped: the first step that did not keep up, or the step limit.
    pub stopped_by: String,
    /// Every step.
    pub steps: Vec<Step>,
}

/// Runs the fanout scenario on every target.
pub async fn run(ctx: &Context, options: &FanoutOptions) -> Report {
    let sizes: Vec<String> = options.connections.iter().map(usize::to_string).collect();
    let mut report = Report::new(
        "fanout",
        format!(
            "push.all to C = {} connections, {} B payloads: max sustained deliveries/s",
            sizes.join(", "),
            ctx.payload_bytes
        ),
        options,
    );
    ctx.each_target(&mut report, "fanout", async |target| {
        let mut runs = Vec::new();
        for &connections in &options.connections {
            runs.push(search(ctx, options, target, connections).await?);
        }
        let measures = runs.iter().flat_map(measures).collect();
        let notes = runs.iter().map(|run| format!("C={}: stopped: {}", run.connections, run.stopped_by)).collect();
        Ok(Outcome { details: runs, measures, notes })
    })
    .await;
    report.note(format!(
        "a step ({} s) keeps up when its last delivery arrives within {:.0}% of its duration after it and no socket is closed; steps grow ×{}",
        options.step_secs,
        DRAIN_SHARE * 100.0,
        options.factor
    ));
    report
}

/// The key of the max-deliveries figure at `connections`, to find it in a report.
pub fn max_key(connections: usize) -> String {
    format!("max_deliveries_per_sec@{connections}")
}

/// Searches the highest sustained rate for `connections` clients of `target`.
pub async fn search(ctx: &Context, options: &FanoutOptions, target: &Target, connections: usize) -> Result<FanoutRun> {
    let fleet = Fleet::launch(
        ctx.specs(target, connections, "u", |_| None)?,
        &FleetOptions { connect_timeout: ctx.connect_timeout, ..FleetOptions::default() },
    );
    if !fleet.wait_welcomed(ctx.connect_timeout * 2).await {
        bail!("{} of {connections} clients connected; errors: {:?}", fleet.counts().welcomed, fleet.errors());
    }
    let publisher = target.publisher().await?;
    let mut steps: Vec<Step> = Vec::new();
    let mut rate = options.start;
    for _ in 0..options.max_steps {
        let step = step(ctx, options, target, &fleet, &publisher, rate / connections as f64, connections).await?;
        progress(&format!(
            "fanout {} C={connections}: {:.0} deliveries/s offered, {} of {} arrived: {}",
            target.kind.name(),
            step.offered_deliveries_per_sec,
            step.received,
            step.expected,
            step.reason.as_deref().unwrap_or("kept up")
        ));
        let kept_up = step.kept_up;
        steps.push(step);
        if !kept_up {
            break;
        }
        rate *= options.factor;
    }
    fleet.stop().await;
    let best = steps.iter().rfind(|step| step.kept_up);
    let stopped_by = match steps.last() {
        Some(Step { reason: Some(reason), offered_deliveries_per_sec, .. }) => {
            format!("{reason} at {offered_deliveries_per_sec:.0} deliveries/s")
        }
        _ => format!("{} steps, all kept up: the maximum is higher (raise --fanout-max-steps)", steps.len()),
    };
    Ok(FanoutRun {
        connections,
        stopped_by,
        max_sustained_deliveries_per_sec: best.map(|step| step.offered_deliveries_per_sec),
        cpu_at_max: best.map(|step| step.cpu),
        steps,
    })
}

async fn step(
    ctx: &Context,
    options: &FanoutOptions,
    target: &Target,
    fleet: &Fleet,
    publisher: &async_nats::Client,
    msgs_per_sec: f64,
    connections: usize,
) -> Result<Step> {
    let stored_before = target.stored_last_seq(publisher).await?;
    let before = fleet.counts();
    let meters = CpuMeters::start(target)?;
    let all = Subject::from_static("push.all");
    let paced =
        publish::paced(publisher, msgs_per_sec, secs(options.step_secs), ctx.payload_bytes, |_| all.clone()).await?;
    let received_in_window = fleet.counts().msgs - before.msgs;
    let expected = paced.sent * connections as u64;
    let drain_started = Instant::now();
    let complete = fleet.wait_msgs(before.msgs + expected, secs(options.grace_secs)).await;
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let cpu = meters.read();
    let after = fleet.counts();
    let stored = match (stored_before, target.stored_last_seq(publisher).await?) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let ended_by_server = after.ended - before.ended;
    let allowed_drain = DRAIN_SHARE * paced.elapsed_secs;
    let reason = if ended_by_server > 0 {
        Some(format!("{ended_by_server} connections closed by the server"))
    } else if !complete {
        Some(format!("{} of {expected} deliveries {} s after the step", after.msgs - before.msgs, options.grace_secs))
    } else if drain_secs > allowed_drain {
        Some(format!("the last delivery came {drain_secs:.3} s after the step (> {allowed_drain:.3} s)"))
    } else if paced.rate() < PUBLISHER_SHARE * msgs_per_sec {
        Some(format!("the publisher reached {:.0} of {msgs_per_sec:.0} msgs/s", paced.rate()))
    } else {
        None
    };
    Ok(Step {
        nominal_msgs_per_sec: msgs_per_sec,
        sent: paced.sent,
        offered_deliveries_per_sec: expected as f64 / paced.elapsed_secs.max(f64::EPSILON),
        expected,
        received_in_window,
        received: after.msgs - before.msgs,
        drain_secs,
        ended_by_server,
        stored,
        cpu,
        kept_up: reason.is_none(),
        reason,
    })
}

fn measures(run: &FanoutRun) -> Vec<Measure> {
    let c = run.connections;
    let cpu = run.cpu_at_max.unwrap_or_default();
    vec![
        Measure::new(
            max_key(c),
            format!("C={c} max deliveries/s"),
            Unit::PerSec,
            Better::Higher,
            run.max_sustained_deliveries_per_sec,
        ),
        Measure::new(
            format!("server_cpu@{c}"),
            format!("C={c} server CPU at max"),
            Unit::Percent,
            Better::Neither,
            cpu.server,
        ),
        Measure::new(
            format!("nats_cpu@{c}"),
            format!("C={c} NATS CPU at max (separate)"),
            Unit::Percent,
            Better::Neither,
            cpu.nats,
        ),
        Measure::new(
            format!("tool_cpu@{c}"),
            format!("C={c} tool CPU at max"),
            Unit::Percent,
            Better::Neither,
            cpu.tool,
        ),
    ]
}
