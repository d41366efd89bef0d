//! Readiness: connected to NATS, with the stream and the KV buckets present. A background task
//! checks them every second and recreates whatever JetStream says is missing, e.g. after NATS came
//! back without its store; delivery subscriptions come back by themselves with the connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use herald_shared::stream::{StreamSettings, ensure_buckets, ensure_stream};
use herald_shared::subject::{BUCKETS, STREAM};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::delivery::feed::Feed;
use crate::delivery::replies::Replies;
use crate::delivery::router::Router;
use crate::http::metrics::Metrics;

/// How often the stream is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the control connection's events tell readiness.
#[derive(Default)]
pub(crate) struct ControlEvents {
    /// Notified on every (re)connection to NATS, to check the stream at once.
    connected: Notify,
    /// NATS refused the credentials at the last attempt to connect.
    credentials_refused: AtomicBool,
}

impl ControlEvents {
    pub(crate) fn note(&self, event: &async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                self.credentials_refused.store(false, Ordering::Release);
                self.connected.notify_one();
            }
            event if herald_shared::nats::refuses_credentials(event) => {
                self.credentials_refused.store(true, Ordering::Release)
            }
            // An attempt that failed otherwise (no server): the credentials were not what failed.
            async_nats::Event::ClientError(_) => self.credentials_refused.store(false, Ordering::Release),
            _ => {}
        }
    }
}

pub(crate) struct Health {
    control: async_nats::Client,
    feed: Feed,
    replies: Replies,
    /// A [`Store`]: what the last check found.
    store: AtomicU8,
    /// The session-policy watch is established (sessions may be accepted without missing a kick).
    pub(crate) policy_watch: AtomicBool,
    /// The preferences watch is established.
    pub(crate) prefs_watch: AtomicBool,
    /// What the control connection's events said.
    control_events: Arc<ControlEvents>,
    /// Counts the times buckets were recreated: a KV watch restarts on it, since a
    /// watch of a deleted bucket waits forever instead of failing.
    recreated: tokio::sync::watch::Sender<u64>,
}

impl Health {
    pub(crate) fn new(
        control: async_nats::Client,
        feed: Feed,
        replies: Replies,
        control_events: Arc<ControlEvents>,
    ) -> Health {
        Health {
            control,
            feed,
            replies,
            store: AtomicU8::new(Store::Unchecked as u8),
            policy_watch: AtomicBool::new(false),
            prefs_watch: AtomicBool::new(false),
            control_events,
            recreated: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever buckets were recreated.
    pub(crate) fn recreations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recreated.subscribe()
    }

    /// Whether the control and delivery connections to NATS are up.
    pub(crate) fn nats_connected(&self) -> bool {
        self.control.connection_state() == State::Connected && self.feed.is_connected()
    }

    /// Whether the control connection to NATS is up (what the API's reads of JetStream go over).
    pub(crate) fn control_connected(&self) -> bool {
        self.control.connection_state() == State::Connected
    }

    /// Whether the gateway can serve: NATS connected, the stream present, the KV watches running.
    pub(crate) fn ready(&self) -> bool {
        self.problems().is_empty()
    }

    /// The reasons the gateway is not ready, for `/readyz`.
    pub(crate) fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if !self.nats_connected() && self.control_events.credentials_refused.load(Ordering::Acquire) {
            problems.push(
                "NATS refuses the gateway's credentials (authorization violation): check nats_user and nats_password, or nats_creds",
            );
        } else if !self.nats_connected() {
            problems.push("not connected to NATS");
        } else if !self.replies.is_connected() {
            problems.push("the replays' connection to NATS is down");
        }
        match self.store.load(Ordering::Acquire) {
            store if store == Store::Ready as u8 => {}
            store if store == Store::Unanswered as u8 => problems.push("JetStream does not answer"),
            store if store == Store::Leaderless as u8 => problems.push("stream HERALD or a KV bucket has no leader"),
            store if store == Store::NoJetStream as u8 => {
                problems.push("NATS runs without JetStream (nats.conf needs its jetstream block)")
            }
            // Said by "not connected to NATS" while disconnected.
            store if store == Store::Unchecked as u8 => {
                if problems.is_empty() {
                    problems.push("JetStream not checked yet since NATS connected")
                }
            }
            _ => problems.push("stream HERALD or a KV bucket not available"),
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
    router: Router,
    shutdown: CancellationToken,
) {
    let mut was_ok = false;
    let mut seen = false;
    // When the stream seen last was made: another time means it was made again.
    let mut stream_made = None;
    while !shutdown.is_cancelled() {
        let (store, made) = match health.nats_connected() {
            true => check_stream(&js, &settings, &health, &metrics, seen).await,
            false => (Store::Unchecked, None),
        };
        if let Some(made) = made {
            if stream_made.is_some_and(|before| before != made) {
                warn!(
                    "stream HERALD was made again: its sequences start over, while the cursors and read positions \
                     kept in KV are the old stream's; if this was on purpose, remove buckets herald-cursors and \
                     herald-reads too (docs/operations.md)"
                );
                router.stream_replaced().await;
            }
            stream_made = Some(made);
        }
        let ok = store == Store::Ready;
        seen |= ok;
        health.store.store(store as u8, Ordering::Release);
        if ok != was_ok {
            info!(ready = ok, "readiness changed");
            was_ok = ok;
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = health.control_events.connected.notified() => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// What a check found of the stream and the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Store {
    /// All present (made now if they were missing).
    Ready,
    /// Something missing that could not be made.
    Unavailable,
    /// Not known: NATS is not connected, or has not been asked since it connected.
    Unchecked,
    /// JetStream did not answer about all of them, e.g. from a NATS node cut off from its cluster.
    Unanswered,
    /// One of them has no leader (its cluster lost its quorum): nothing can be stored or read.
    Leaderless,
    /// Nobody answers JetStream's API: NATS runs without JetStream.
    NoJetStream,
}

/// What JetStream said of one stream (a KV bucket is the stream `KV_<bucket>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Present,
    /// JetStream answered that it has no such stream.
    Absent,
    /// No answer (a timeout, no responders) or one that does not say (no leader, say).
    Unanswered,
    /// Known to the cluster, but led by no server.
    Leaderless,
    /// No responders on JetStream's API: JetStream is not enabled.
    NoJetStream,
}

/// What a stream's info says of its leader.
trait Led {
    fn has_leader(&self) -> bool;
}

impl Led for jetstream::stream::Stream {
    fn has_leader(&self) -> bool {
        // A server outside any cluster leads its streams itself and names no leader.
        self.cached_info().cluster.as_ref().is_none_or(|cluster| cluster.leader.is_some())
    }
}

impl Probe {
    fn of<T: Led>(answer: &Result<T, GetStreamError>) -> Probe {
        match answer.as_ref().map_err(|error| error.kind()) {
            Ok(stream) if !stream.has_leader() => Probe::Leaderless,
            Ok(_) => Probe::Present,
            Err(GetStreamErrorKind::JetStream(error)) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Probe::Absent
            }
            Err(GetStreamErrorKind::Request) if no_responders(answer) => Probe::NoJetStream,
            Err(_) => Probe::Unanswered,
        }
    }
}

/// Whether a request got "no responders": no server serves JetStream's API.
fn no_responders<T>(answer: &Result<T, GetStreamError>) -> bool {
    use async_nats::jetstream::context::{RequestError, RequestErrorKind};
    let source = answer.as_ref().err().and_then(|error| std::error::Error::source(error));
    source
        .and_then(|source| source.downcast_ref::<RequestError>())
        .is_some_and(|error| error.kind() == RequestErrorKind::NoResponders)
}

/// Whether the stream and every KV bucket exist, and when the stream was made (another time than
/// before: it was made again, and the router starts over). Whatever JetStream says is missing is
/// (re)created, whenever it is found missing: at start, after NATS came back without its store, or
/// when a fresh cluster had no JetStream leader when the first gateway tried (the stream may then
/// be made by one gateway and the buckets by none). Nothing is made while JetStream does not
/// answer: a node cut off from its cluster times out on what exists. `seen`: this gateway has
/// found them all present before.
async fn check_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    health: &Health,
    metrics: &Metrics,
    seen: bool,
) -> (Store, Option<time::OffsetDateTime>) {
    let (probes, made) = probe(js).await;
    let (store, made_now) = check(js, settings, health, metrics, seen, probes).await;
    (store, made_now.or(made))
}

/// [`check_stream`] once JetStream was asked; when the stream was made, if it was made now.
async fn check(
    js: &jetstream::Context,
    settings: &StreamSettings,
    health: &Health,
    metrics: &Metrics,
    seen: bool,
    probes: Vec<(&'static str, Probe)>,
) -> (Store, Option<time::OffsetDateTime>) {
    if probes.iter().any(|(_, probe)| *probe == Probe::NoJetStream) {
        // Said once, not at every check: it lasts until NATS restarts with JetStream.
        if health.store.load(Ordering::Acquire) != Store::NoJetStream as u8 {
            warn!("NATS runs without JetStream, which keeps every push: enable it (nats.conf's jetstream block)");
        }
        return (Store::NoJetStream, None);
    }
    let unanswered: Vec<_> =
        probes.iter().filter(|(_, probe)| *probe == Probe::Unanswered).map(|(name, _)| name).collect();
    if !unanswered.is_empty() {
        warn!(?unanswered, "JetStream does not answer about the stream or buckets");
        return (Store::Unanswered, None);
    }
    let leaderless: Vec<_> =
        probes.iter().filter(|(_, probe)| *probe == Probe::Leaderless).map(|(name, _)| name).collect();
    if !leaderless.is_empty() {
        warn!(?leaderless, "the stream or buckets have no leader");
        return (Store::Leaderless, None);
    }
    let missing: Vec<_> = probes.iter().filter(|(_, probe)| *probe == Probe::Absent).map(|(name, _)| *name).collect();
    if missing.is_empty() {
        if !seen {
            apply_settings(js, settings).await;
        }
        return (Store::Ready, None);
    }
    info!(?missing, "creating what is missing in JetStream");
    let made = match ensure_stream(js, settings).await {
        Ok(stream) => stream.created,
        Err(error) => {
            warn!(%error, "stream HERALD unavailable");
            return (Store::Unavailable, None);
        }
    };
    if let Err(error) = ensure_buckets(js, settings).await {
        warn!(%error, "cannot create the KV buckets");
        return (Store::Unavailable, Some(made));
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
    (Store::Ready, Some(made))
}

/// Updates the stream and the buckets that were there before this gateway to its settings (its
/// limits, the stream's republish), as it would have made them. What cannot be updated is logged,
/// and the gateway serves with them as they are.
async fn apply_settings(js: &jetstream::Context, settings: &StreamSettings) {
    if let Err(error) = ensure_stream(js, settings).await {
        warn!(%error, "stream HERALD could not be updated to this gateway's settings");
    }
    if let Err(error) = ensure_buckets(js, settings).await {
        warn!(%error, "the KV buckets could not be updated to this gateway's settings");
    }
}

/// What JetStream says of the stream and each bucket, asked all at once (a JetStream without a
/// leader lets each question time out), and when the stream was made, if it is there.
async fn probe(js: &jetstream::Context) -> (Vec<(&'static str, Probe)>, Option<time::OffsetDateTime>) {
    let buckets =
        BUCKETS.map(|bucket| async move { (bucket, Probe::of(&js.get_stream(format!("KV_{bucket}")).await)) });
    let (stream, buckets) = futures::join!(js.get_stream(STREAM), futures::future::join_all(buckets));
    let made = stream.as_ref().ok().map(|stream| stream.cached_info().created);
    (std::iter::once((STREAM, Probe::of(&stream))).chain(buckets).collect(), made)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Led for () {
        fn has_leader(&self) -> bool {
            true
        }
    }

    impl Led for bool {
        fn has_leader(&self) -> bool {
            *self
        }
    }

    fn jetstream_error(status: u16, code: u64) -> Result<(), GetStreamError> {
        let error = serde_json::json!({"code": status, "err_code": code, "description": "from JetStream"});
        Err(GetStreamError::new(GetStreamErrorKind::JetStream(serde_json::from_value(error).unwrap())))
    }

    #[test]
    fn only_jetstream_saying_it_has_no_such_stream_is_absence() {
        assert_eq!(Probe::of(&Ok::<(), GetStreamError>(())), Probe::Present);
        assert_eq!(Probe::of(&jetstream_error(404, 10059)), Probe::Absent);
        assert_eq!(Probe::of(&Ok::<bool, GetStreamError>(false)), Probe::Leaderless);
    }

    #[test]
    fn a_timeout_or_an_answer_that_does_not_say_is_no_answer() {
        assert_eq!(Probe::of(&Err::<(), _>(GetStreamError::new(GetStreamErrorKind::Request))), Probe::Unanswered);
        // "JetStream system temporarily unavailable": a cluster electing its leader.
        assert_eq!(Probe::of(&jetstream_error(503, 10008)), Probe::Unanswered);
    }
}
