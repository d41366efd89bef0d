//! Readiness: connected to NATS, with the stream and the KV buckets present. A background task
//! checks them every second and recreates whatever is missing, e.g. after NATS came back without
//! its store; delivery subscriptions come back by themselves with the connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use herald_shared::stream::{StreamSettings, ensure_buckets, ensure_stream};
use herald_shared::subject::{BUCKETS, STREAM};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::delivery::feed::Feed;
use crate::http::metrics::Metrics;

/// How often the stream is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Health {
    control: async_nats::Client,
    feed: Feed,
    stream_ok: AtomicBool,
    /// The session-policy watch is established (sessions may be accepted without missing a kick).
    pub(crate) policy_watch: AtomicBool,
    /// The preferences watch is established.
    pub(crate) prefs_watch: AtomicBool,
    /// Notified on every (re)connection to NATS, to check the stream at once.
    connected: Arc<Notify>,
    /// Counts the times buckets were recreated: a KV watch restarts on it, since a
    /// watch of a deleted bucket waits forever instead of failing.
    recreated: tokio::sync::watch::Sender<u64>,
}

impl Health {
    pub(crate) fn new(control: async_nats::Client, feed: Feed, connected: Arc<Notify>) -> Health {
        Health {
            control,
            feed,
            stream_ok: AtomicBool::new(false),
            policy_watch: AtomicBool::new(false),
            prefs_watch: AtomicBool::new(false),
            connected,
            recreated: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever buckets were recreated.
    pub(crate) fn recreations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recreated.subscribe()
    }

    /// Whether both NATS connections are up.
    pub(crate) fn nats_connected(&self) -> bool {
        self.control.connection_state() == State::Connected && self.feed.is_connected()
    }

    /// Whether the gateway can serve: NATS connected, the stream present, the KV watches running.
    pub(crate) fn ready(&self) -> bool {
        self.problems().is_empty()
    }

    /// The reasons the gateway is not ready, for `/readyz`.
    pub(crate) fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if !self.nats_connected() {
            problems.push("not connected to NATS");
        }
        if !self.stream_ok.load(Ordering::Acquire) {
            problems.push("stream HERALD or a KV bucket not available");
        }
        if !self.policy_watch.load(Ordering::Acquire) {
            problems.push("session policy watch not running");
        }
        if !self.prefs_watch.load(Ordering::Acquire) {
            problems.push("preferences watch not running");
        }
        problems
    }
}

/// Keeps `health` current until `shutdown`.
pub(crate) async fn monitor(
    health: Arc<Health>,
    js: jetstream::Context,
    settings: StreamSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut was_ok = false;
    let mut seen = false;
    while !shutdown.is_cancelled() {
        let connected = health.nats_connected();
        metrics.nats_connected.set(connected as i64);
        let ok = connected && check_stream(&js, &settings, &health, &metrics, seen).await;
        seen |= ok;
        health.stream_ok.store(ok, Ordering::Release);
        if ok != was_ok {
            info!(ready = ok, "readiness changed");
            was_ok = ok;
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = health.connected.notified() => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// Whether the stream and every KV bucket exist; whatever is missing is (re)created, whenever it
/// is found missing: at start, after NATS came back without its store, or when a fresh cluster had
/// no JetStream leader when the first gateway tried (the stream may then be made by one gateway
/// and the buckets by none). `seen`: this gateway has found them all present before.
async fn check_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    health: &Health,
    metrics: &Metrics,
    seen: bool,
) -> bool {
    let missing = missing(js).await;
    if missing.is_empty() {
        return true;
    }
    info!(?missing, "creating what is missing in JetStream");
    if let Err(error) = ensure_stream(js, settings).await {
        warn!(%error, "stream HERALD unavailable");
        return false;
    }
    if let Err(error) = ensure_buckets(js, settings).await {
        warn!(%error, "cannot create the KV buckets");
        return false;
    }
    info!("stream HERALD and KV buckets ready");
    // The KV watches follow the buckets: only a bucket lost and made anew restarts them (a stream
    // replaced alone leaves them running, and the gateway ready). Buckets missing before the first
    // complete check are being made for the first time, perhaps by the functions at this moment:
    // no watch can have followed them.
    if seen && missing.iter().any(|name| *name != STREAM) {
        metrics.buckets_recreated.inc();
        health.recreated.send_modify(|count| *count += 1);
    }
    true
}

/// The stream and the buckets that JetStream does not list (or does not answer about), asked all at
/// once (a JetStream without a leader lets each question time out).
async fn missing(js: &jetstream::Context) -> Vec<&'static str> {
    let stream = async { js.get_stream(STREAM).await.is_err().then_some(STREAM) };
    let buckets = BUCKETS.map(|bucket| async move { js.get_key_value(bucket).await.is_err().then_some(bucket) });
    let (stream, buckets) = futures::join!(stream, futures::future::join_all(buckets));
    stream.into_iter().chain(buckets.into_iter().flatten()).collect()
}
