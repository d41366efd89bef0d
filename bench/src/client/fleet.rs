//! Many clients started together, counted together, stopped together.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::{self, ClientReport, ClientSpec};
use crate::payload::now_ns;

/// Errors kept for the report; the rest are only counted.
const KEPT_ERRORS: usize = 10;
/// How often waits check the counters.
const POLL: Duration = Duration::from_millis(5);

/// How a fleet's clients behave.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Record publish→receive latency of live messages (payloads made by [`crate::payload`]).
    pub record_latency: bool,
    /// Most clients dialling and upgrading at once; `None`: all at once (a storm).
    pub connect_concurrency: Option<usize>,
    /// Longest a client may take to dial and upgrade (waits for welcomes have their own limits).
    pub connect_timeout: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions { record_latency: false, connect_concurrency: Some(256), connect_timeout: Duration::from_secs(30) }
    }
}

/// What the clients share: counters, histograms and the stop signal.
pub struct FleetShared {
    /// When the fleet started, on the clock of [`now_ns`].
    started_ns: u64,
    pub(crate) stop: CancellationToken,
    pub(crate) record_latency: bool,
    pub(crate) connect_limit: Option<Arc<Semaphore>>,
    pub(crate) connect_timeout: Duration,
    counters: Counters,
    /// Time from the fleet's start to each welcome, in microseconds.
    welcome_times: Mutex<Histogram<u64>>,
    /// Time from the fleet's start to each client going live, in microseconds.
    live_times: Mutex<Histogram<u64>>,
    /// Publish→receive latency in microseconds.
    latency: Mutex<Histogram<u64>>,
    errors: Mutex<Vec<String>>,
    close_codes: Mutex<BTreeMap<u16, u64>>,
    /// Wakes [`Fleet::wait_msgs`] when messages arrive, while someone waits.
    msgs_arrived: Notify,
    /// Whether someone waits on `msgs_arrived` (so clients skip notifying otherwise).
    msgs_watched: AtomicBool,
}

#[derive(Default)]
struct Counters {
    welcomed: AtomicU64,
    live: AtomicU64,
    failed: AtomicU64,
    ended: AtomicU64,
    msgs: AtomicU64,
    last_welcome_ns: AtomicU64,
    last_live_ns: AtomicU64,
    last_msg_ns: AtomicU64,
}

/// A snapshot of a fleet's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Clients that got their welcome.
    pub welcomed: u64,
    /// Clients that went live.
    pub live: u64,
    /// Clients that could not connect (or failed before their welcome).
    pub failed: u64,
    /// Clients whose connection the server ended.
    pub ended: u64,
    /// Messages received by all clients.
    pub msgs: u64,
}

/// Percentiles of a histogram, in the histogram's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.5) as f64,
            p99: histogram.value_at_quantile(0.99) as f64,
            p999: histogram.value_at_quantile(0.999) as f64,
            max: histogram.max() as f64,
        }
    }
}

impl FleetShared {
    pub(crate) fn welcomed(&self, now: u64) {
        self.counters.welcomed.fetch_add(1, Ordering::Relaxed);
        let since_start = now.saturating_sub(self.started_ns);
        self.counters.last_welcome_ns.fetch_max(since_start, Ordering::Relaxed);
        record(&self.welcome_times, since_start / 1000);
    }

    pub(crate) fn live(&self, now: u64) {
        self.counters.live.fetch_add(1, Ordering::Relaxed);
        let since_start = now.saturating_sub(self.started_ns);
        self.counters.last_live_ns.fetch_max(since_start, Ordering::Relaxed);
        record(&self.live_times, since_start / 1000);
    }

    pub(crate) fn add_msgs(&self, msgs: u64, now: u64) {
        if msgs > 0 {
            self.counters.msgs.fetch_add(msgs, Ordering::Relaxed);
            self.counters.last_msg_ns.fetch_max(now.saturating_sub(self.started_ns), Ordering::Relaxed);
            if self.msgs_watched.load(Ordering::Relaxed) {
                self.msgs_arrived.notify_waiters();
            }
        }
    }

    /// Records latencies given in nanoseconds.
    pub(crate) fn record_latencies(&self, samples_ns: &[u64]) {
        let mut histogram = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for sample in samples_ns {
            histogram.saturating_record((sample / 1000).max(1));
        }
    }

    pub(crate) fn failed(&self, mut report: ClientReport, error: String) -> ClientReport {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < KEPT_ERRORS {
            errors.push(error.clone());
        }
        report.error = Some(error);
        report
    }

    pub(crate) fn ended(&self, report: &ClientReport) {
        self.counters.ended.fetch_add(1, Ordering::Relaxed);
        if let Some(code) = report.close_code {
            *self.close_codes.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1;
        }
    }
}

fn record(histogram: &Mutex<Histogram<u64>>, micros: u64) {
    histogram.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(micros.max(1));
}

/// Microseconds from 1 µs to 10 minutes, three significant digits.
fn micros_histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
}

/// Running clients.
pub struct Fleet {
    shared: Arc<FleetShared>,
    tasks: Vec<JoinHandle<ClientReport>>,
}

impl Fleet {
    /// Starts one client per spec, now.
    pub fn launch(specs: Vec<ClientSpec>, options: &FleetOptions) -> Fleet {
        let shared = Arc::new(FleetShared {
            started_ns: now_ns(),
            stop: CancellationToken::new(),
            record_latency: options.record_latency,
            connect_limit: options.connect_concurrency.map(|limit| Arc::new(Semaphore::new(limit.max(1)))),
            connect_timeout: options.connect_timeout,
            counters: Counters::default(),
            welcome_times: micros_histogram(),
            live_times: micros_histogram(),
            latency: micros_histogram(),
            errors: Mutex::new(Vec::new()),
            close_codes: Mutex::new(BTreeMap::new()),
            msgs_arrived: Notify::new(),
            msgs_watched: AtomicBool::new(false),
        });
        let tasks = specs.into_iter().map(|spec| tokio::spawn(conn::run(spec, shared.clone()))).collect();
        Fleet { shared, tasks }
    }

    /// How many clients the fleet started.
    pub fn size(&self) -> usize {
        self.tasks.len()
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        let c = &self.shared.counters;
        Counts {
            welcomed: c.welcomed.load(Ordering::Relaxed),
            live: c.live.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            ended: c.ended.load(Ordering::Relaxed),
            msgs: c.msgs.load(Ordering::Relaxed),
        }
    }

    /// Waits until every client is welcomed or has failed, at most `timeout`; returns whether all
    /// were welcomed.
    pub async fn wait_welcomed(&self, timeout: Duration) -> bool {
        let size = self.size() as u64;
        self.wait_for(timeout, |c| c.welcomed + c.failed >= size).await;
        self.counts().welcomed == size
    }

    /// Waits until every client is live or has failed, at most `timeout`; returns whether all went
    /// live.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let size = self.size() as u64;
        self.wait_for(timeout, |c| c.live + c.failed >= size).await;
        self.counts().live == size
    }

    /// Waits until the clients received `msgs` messages in all, at most `timeout`; returns whether
    /// they did.
    pub async fn wait_msgs(&self, msgs: u64, timeout: Duration) -> bool {
        let shared = &self.shared;
        shared.msgs_watched.store(true, Ordering::Relaxed);
        let arrived = tokio::time::timeout(timeout, async {
            loop {
                let notified = shared.msgs_arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.counters.msgs.load(Ordering::Relaxed) >= msgs {
                    return;
                }
                // A bounded wait: a notification raced with `enable` is caught on the next turn.
                let _ = tokio::time::timeout(POLL, notified).await;
            }
        })
        .await
        .is_ok();
        shared.msgs_watched.store(false, Ordering::Relaxed);
        arrived
    }

    /// Polls the counters until `done` holds or `timeout` passes; returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, mut done: impl FnMut(&Counts) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.counts()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Time from the launch to the last welcome so far.
    pub fn last_welcome(&self) -> Duration {
        Duration::from_nanos(self.shared.counters.last_welcome_ns.load(Ordering::Relaxed))
    }

    /// Time from the launch to the last client going live so far.
    pub fn last_live(&self) -> Duration {
        Duration::from_nanos(self.shared.counters.last_live_ns.load(Ordering::Relaxed))
    }

    /// Time from the launch to the last message received so far.
    pub fn last_msg(&self) -> Duration {
        Duration::from_nanos(self.shared.counters.last_msg_ns.load(Ordering::Relaxed))
    }

    /// Time since the launch.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(now_ns().saturating_sub(self.shared.started_ns))
    }

    /// Percentiles of the clients' times from launch to welcome, in microseconds.
    pub fn welcome_times(&self) -> Percentiles {
        Percentiles::of(&self.shared.welcome_times.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Percentiles of the clients' times from launch to live, in microseconds.
    pub fn live_times(&self) -> Percentiles {
        Percentiles::of(&self.shared.live_times.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Percentiles of publish→receive latency, in microseconds.
    pub fn latency(&self) -> Percentiles {
        Percentiles::of(&self.shared.latency.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Forgets the latencies recorded so far (between load levels).
    pub fn reset_latency(&self) {
        self.shared.latency.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }

    /// The first errors clients failed with.
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many connections the server closed, by close code.
    pub fn close_codes(&self) -> BTreeMap<u16, u64> {
        self.shared.close_codes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops every client (closing its socket) and returns what each saw.
    pub async fn stop(mut self) -> Vec<ClientReport> {
        self.shared.stop.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let mut reports = Vec::with_capacity(tasks.len());
        for task in tasks {
            reports.push(task.await.unwrap_or_else(|error| ClientReport {
                error: Some(format!("client task failed: {error}")),
                ..ClientReport::default()
            }));
        }
        reports
    }
}

#[cfg(test)]
impl Fleet {
    /// What the clients share, to drive a connection without a socket.
    pub(crate) fn shared(&self) -> &FleetShared {
        &self.shared
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}
