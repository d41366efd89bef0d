//! `fanout`: C connections, messages to `push.all` at a rising rate until deliveries stop keeping
//! up.
//!
//! First a few single messages measure how long one message takes to reach all C clients on the
//! idle target (the latency floor, which grows with C). Then each step publishes for a fixed time
//! at `rate / C` messages per second; it keeps up when every expected delivery (messages × C)
//! arrived, the last one no later than the floor plus [`DRAIN_SHARE`] of the step's duration after
//! the step (so the backlog never exceeded a tenth of a step's deliveries), the publisher held its
//! pace (see [`crate::publish::Paced::kept_pace`]) and no connection was closed. A rate fails only
//! when every one of a few tries at it failed. The result is the highest offered rate that kept up,
//! with the CPU the processes used at that step.

use std::time::Instant;

use anyhow::{Result, bail};
use async_nats::Subject;
use serde::Serialize;

use super::{Context, CpuMeters, CpuUse, Outcome, progress, secs};
use crate::client::{Fleet, FleetOptions};
use crate::payload::{now_ns, stamped};
use crate::publish;
use crate::report::{Better, Measure, Report, Unit};
use crate::targets::Target;

/// How late, as a share of the step's duration, the last delivery of a step may arrive.
pub const DRAIN_SHARE: f64 = 0.1;
/// How long a failed first step's backlog may take to drain before the search goes lower.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Single messages published before the search to measure the fan-out latency floor.
const PROBES: usize = 3;

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
    /// Tries at each rate: a rate fails only when every try failed (one late step on a shared
    /// machine is often the scheduler, not the target).
    #[arg(id = "fanout-attempts", long = "fanout-attempts", value_name = "N", default_value_t = 2)]
    pub attempts: usize,
    /// Most steps per connection count.
    #[arg(id = "fanout-max-steps", long = "fanout-max-steps", value_name = "N", default_value_t = 30)]
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
    /// The most `drain_secs` may be for the step to keep up.
    pub allowed_drain_secs: f64,
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
    /// Seconds one message took from publish to its last delivery on the idle target (the slowest
    /// of a few): the latency floor of a step.
    pub one_message_secs: f64,
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
        "a step ({} s) keeps up when its last delivery arrives within one message's fan-out time + {:.0}% of the step after it and no socket is closed; steps grow ×{}; a rate fails after {} failed tries",
        options.step_secs,
        DRAIN_SHARE * 100.0,
        options.factor,
        options.attempts
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
    let mut search = Search {
        ctx,
        options,
        target,
        fleet: &fleet,
        publisher: target.publisher().await?,
        connections,
        one_message_secs: 0.0,
        expected_total: 0,
    };
    search.one_message_secs = search.probe().await?;
    let steps = search.climb().await?;
    let one_message_secs = search.one_message_secs;
    fleet.stop().await;
    let best = steps
        .iter()
        .filter(|step| step.kept_up)
        .max_by(|a, b| a.offered_deliveries_per_sec.total_cmp(&b.offered_deliveries_per_sec));
    let stopped_by = match steps.last() {
        Some(Step { reason: Some(reason), offered_deliveries_per_sec, .. }) => {
            format!("{reason} at {offered_deliveries_per_sec:.0} deliveries/s")
        }
        _ => format!("the last of {} steps kept up: the maximum is higher (raise --fanout-max-steps)", steps.len()),
    };
    Ok(FanoutRun {
        connections,
        one_message_secs,
        stopped_by,
        max_sustained_deliveries_per_sec: best.map(|step| step.offered_deliveries_per_sec),
        cpu_at_max: best.map(|step| step.cpu),
        steps,
    })
}

/// One search: the clients, the publisher and what the probe found.
struct Search<'a> {
    ctx: &'a Context,
    options: &'a FanoutOptions,
    target: &'a Target,
    fleet: &'a Fleet,
    publisher: async_nats::Client,
    connections: usize,
    /// How long one message takes to reach every client on an idle target.
    one_message_secs: f64,
    /// Deliveries published so far (the fleet is new: its count starts at 0).
    expected_total: u64,
}

impl Search<'_> {
    /// Publishes [`PROBES`] single messages, one after the other has reached every client; returns
    /// the slowest time from publish to the last delivery.
    async fn probe(&mut self) -> Result<f64> {
        let timeout = secs(self.options.grace_secs.max(5.0));
        let mut slowest: f64 = 0.0;
        for _ in 0..PROBES {
            let before = self.fleet.counts().msgs;
            let started = Instant::now();
            self.publisher.publish("push.all", stamped(now_ns(), self.ctx.payload_bytes)).await?;
            self.publisher.flush().await?;
            self.expected_total += self.connections as u64;
            if !self.fleet.wait_msgs(before + self.connections as u64, timeout).await {
                bail!("one push.all did not reach all {} clients within {timeout:?}", self.connections);
            }
            slowest = slowest.max(started.elapsed().as_secs_f64());
        }
        Ok(slowest)
    }

    /// Raises the rate step by step until a rate does not keep up in any of `attempts` tries (the
    /// backlog of a failed try drains before the next). When the first rate already fails, it goes
    /// down instead (after the backlog drained) until one keeps up, so a slow target
    /// still gets a figure.
    async fn climb(&mut self) -> Result<Vec<Step>> {
        let (options, connections) = (self.options, self.connections);
        let mut steps: Vec<Step> = Vec::new();
        let mut rate = options.start;
        let mut failed_tries = 0;
        for _ in 0..options.max_steps {
            let step = self.step(rate / connections as f64).await?;
            progress(&format!(
                "fanout {} C={connections}: {:.0} deliveries/s offered, {} of {} arrived: {}",
                self.target.kind.name(),
                step.offered_deliveries_per_sec,
                step.received,
                step.expected,
                step.reason.as_deref().unwrap_or("kept up")
            ));
            let (kept_up, ended) = (step.kept_up, step.ended_by_server);
            steps.push(step);
            if kept_up {
                rate *= options.factor;
                failed_tries = 0;
            } else if ended == 0 && failed_tries + 1 < options.attempts && self.drained().await {
                failed_tries += 1;
            } else if steps.iter().any(|step| step.kept_up) || ended > 0 || !self.drained().await {
                break;
            } else {
                rate /= options.factor * options.factor;
                failed_tries = 0;
            }
        }
        Ok(steps)
    }

    /// Waits (at most [`DRAIN_TIMEOUT`]) until every delivery published so far has arrived; returns
    /// whether it did.
    async fn drained(&self) -> bool {
        self.fleet.wait_msgs(self.expected_total, DRAIN_TIMEOUT).await
    }

    /// Publishes at `msgs_per_sec` for a step and judges whether deliveries kept up.
    async fn step(&mut self, msgs_per_sec: f64) -> Result<Step> {
        let (target, fleet, publisher) = (self.target, self.fleet, &self.publisher);
        let stored_before = target.stored_last_seq(publisher).await?;
        let before = fleet.counts();
        let meters = CpuMeters::start(target)?;
        let all = Subject::from_static("push.all");
        let step_time = secs(self.options.step_secs);
        let paced = publish::paced(publisher, msgs_per_sec, step_time, self.ctx.payload_bytes, |_| all.clone()).await?;
        let received_in_window = fleet.counts().msgs - before.msgs;
        let expected = paced.sent * self.connections as u64;
        self.expected_total += expected;
        let drain_started = Instant::now();
        let complete = fleet.wait_msgs(before.msgs + expected, secs(self.options.grace_secs)).await;
        let drain_secs = drain_started.elapsed().as_secs_f64();
        let cpu = meters.read();
        let after = fleet.counts();
        let stored = stored_before.zip(target.stored_last_seq(publisher).await?).map(|(before, after)| after - before);
        let ended_by_server = after.ended - before.ended;
        let allowed_drain = self.one_message_secs + DRAIN_SHARE * paced.planned_secs;
        let reason = if ended_by_server > 0 {
            Some(format!("{ended_by_server} connections closed by the server"))
        } else if !complete {
            Some(format!(
                "{} of {expected} deliveries {} s after the step",
                after.msgs - before.msgs,
                self.options.grace_secs
            ))
        } else if drain_secs > allowed_drain {
            Some(format!("the last delivery came {drain_secs:.3} s after the step (> {allowed_drain:.3} s)"))
        } else if !paced.kept_pace() {
            Some(format!(
                "the publisher fell behind: {} of {} messages, the last {:.3} s late",
                paced.sent, paced.planned, paced.late_secs
            ))
        } else {
            None
        };
        Ok(Step {
            nominal_msgs_per_sec: msgs_per_sec,
            sent: paced.sent,
            offered_deliveries_per_sec: paced.rate() * self.connections as f64,
            expected,
            received_in_window,
            received: after.msgs - before.msgs,
            drain_secs,
            allowed_drain_secs: allowed_drain,
            ended_by_server,
            stored,
            cpu,
            kept_up: reason.is_none(),
            reason,
        })
    }
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
            format!("one_message@{c}"),
            format!("C={c} one message to all"),
            Unit::Seconds,
            Better::Lower,
            Some(run.one_message_secs),
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
