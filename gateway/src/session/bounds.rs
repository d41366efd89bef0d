//! Reading the stream's current bounds: its first and last sequence, and the per-subject limit
//! it trims by.

use bytes::Bytes;
use herald_shared::subject::STREAM;
use serde::Deserialize;

use crate::delivery::feed::Feed;
use crate::delivery::leader::StreamCluster;

/// Every subject the stream stores.
const STORED_SUBJECTS: &str = "push.>";

/// The stream's bounds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct Bounds {
    #[serde(rename = "first_seq")]
    pub(crate) first: u64,
    #[serde(rename = "last_seq")]
    pub(crate) last: u64,
    /// Names this stream among the streams of the same name over time: a hash of its creation time
    /// (a replaced stream's sequences mean other messages). 0 when the server did not say.
    #[serde(skip)]
    pub(crate) epoch: u64,
    /// The stream's own per-subject limit (`max_msgs_per_subject`; 0 or less: none), whatever this
    /// gateway's settings say: another gateway or an operator may have set it. None when the server
    /// did not say.
    #[serde(skip)]
    pub(crate) per_subject_cap: Option<i64>,
}

/// A `STREAM.INFO` answer: the state, or an error.
#[derive(Deserialize)]
struct InfoAnswer {
    state: Option<Bounds>,
    config: Option<InfoConfig>,
    created: Option<String>,
    cluster: Option<StreamCluster>,
    error: Option<serde_json::Value>,
}

/// An epoch as clients see it (`welcome.epoch`, a Centrifugal channel's `epoch`): hex digits.
pub(crate) fn epoch_text(epoch: u64) -> String {
    format!("{epoch:x}")
}

/// The part of a stream's configuration the bounds carry.
#[derive(Deserialize)]
struct InfoConfig {
    max_msgs_per_subject: Option<i64>,
}

/// FNV-1a: the same on every gateway and build (unlike std's hasher, whose algorithm may change).
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// The stream could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the stream: {0}")]
pub(crate) struct StreamError(pub(crate) String);

/// The stream's bounds, read from the server now, by a request on the feed.
async fn bounds(feed: &Feed) -> Result<Answered, StreamError> {
    let answer = feed
        .request(format!("$JS.API.STREAM.INFO.{STREAM}"), Bytes::new())
        .await
        .map_err(|e| StreamError(e.to_string()))?;
    bounds_answered(&answer)
}

/// Bounds as a server answered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answered {
    bounds: Bounds,
    /// False when they come from a replica of a stream without a leader, which answers from its
    /// own store: it may lack what the other replicas stored while it was cut off from them.
    led: bool,
}

/// The bounds a `STREAM.INFO` answer gives.
fn bounds_answered(answer: &[u8]) -> Result<Answered, StreamError> {
    let answer: InfoAnswer = serde_json::from_slice(answer).map_err(|e| StreamError(e.to_string()))?;
    if let Some(error) = answer.error {
        return Err(StreamError(error.to_string()));
    }
    let led = answer.cluster.is_none_or(|cluster| cluster.has_leader());
    let state = answer.state.ok_or_else(|| StreamError("no state in the stream info".into()))?;
    let epoch = answer.created.as_deref().map_or(0, stable_hash);
    let per_subject_cap = answer.config.and_then(|config| config.max_msgs_per_subject);
    Ok(Answered { bounds: Bounds { epoch, per_subject_cap, ..state }, led })
}

/// How many times, and how far apart, bounds older than a known sequence are read again.
const STALE_RETRIES: usize = 5;
const STALE_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// The newest bounds read of the stream's current epoch: an answer of the same epoch that ends
/// before them comes from a server with a stale view (sequences never go back within an epoch).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Newest {
    epoch: u64,
    last: u64,
}

impl Newest {
    /// Notes an answer: a new epoch starts over (the stream was made again).
    fn note(&mut self, bounds: Bounds) {
        if bounds.epoch != self.epoch {
            *self = Newest { epoch: bounds.epoch, last: bounds.last };
        } else {
            self.last = self.last.max(bounds.last);
        }
    }

    /// The last sequence known stored in the stream `bounds` were read from (0 when none is, or
    /// when the server gives no epoch to tell streams apart).
    fn known_in(&self, bounds: &Bounds) -> u64 {
        if bounds.epoch == self.epoch && bounds.epoch != 0 { self.last } else { 0 }
    }
}

/// Reads the bounds for many sessions at once. A session that asks joins the next request sent,
/// never one already in flight: the request must leave after the session's subscriptions, on the
/// same connection, for the join to be exact. In a reconnect storm this turns a request per
/// session into a handful.
pub(crate) struct BoundsReader {
    feed: Feed,
    pending: std::sync::Mutex<Pending>,
    newest: std::sync::Mutex<Newest>,
}

#[derive(Default)]
struct Pending {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<Reading, String>>>,
    reading: bool,
}

/// Bounds as read, with the last sequence known stored in their stream before the request was
/// sent (bounds behind it come from a stale view). Known before, not when the answer is used: a
/// newer answer to a later request says nothing of this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    bounds: Bounds,
    known: u64,
    /// See [`Answered::led`].
    led: bool,
}

impl BoundsReader {
    /// A reader over the delivery feed.
    pub(crate) fn new(feed: Feed) -> BoundsReader {
        BoundsReader { feed, pending: Default::default(), newest: Default::default() }
    }

    /// The stream's epoch (see [`Bounds::epoch`]), read by a request sent after this call began.
    /// Any replica knows it, with or without a leader.
    pub(crate) async fn read_epoch(self: &std::sync::Arc<Self>) -> Result<u64, StreamError> {
        Ok(self.reading().await?.bounds.epoch)
    }

    async fn reading(self: &std::sync::Arc<Self>) -> Result<Reading, StreamError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let start = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.waiting.push(answer);
            !std::mem::replace(&mut pending.reading, true)
        };
        if start {
            tokio::spawn(self.clone().serve());
        }
        answered.await.map_err(|_| StreamError("bounds reader stopped".into()))?.map_err(StreamError)
    }

    /// The stream's bounds, reaching `at_least` (a sequence seen stored: a gap's end, what the
    /// router saw, a client's `since`) and the newest bounds read before, from a stream with a
    /// leader (see [`led`]). A NATS server that rejoined its cluster may answer from a stale view
    /// for a while: such bounds are read again, a few times a moment apart. Bounds that
    /// stay behind fail, since a replay up to them would skip messages and tell nobody; except
    /// that bounds behind `at_least` only (which may be of a stream since made again, or a
    /// client's bogus `since`) are trusted when the stream's leader stores nothing from there on.
    pub(crate) async fn read_at_least(self: &std::sync::Arc<Self>, at_least: u64) -> Result<Bounds, StreamError> {
        bounds_reaching(self, at_least).await
    }

    /// The first sequence the stream's leader stores from `from` on, if any.
    async fn first_stored_from(&self, from: u64) -> Result<Option<u64>, StreamError> {
        let query = serde_json::json!({ "seq": from, "next_by_subj": STORED_SUBJECTS });
        let stored = crate::delivery::leader::message_get(&self.feed, query).await.map_err(StreamError)?;
        Ok(stored.map(|stored| stored.seq))
    }

    /// Sends requests until nobody waits: each answers everyone who asked before it was sent.
    async fn serve(self: std::sync::Arc<Self>) {
        loop {
            let waiting = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if pending.waiting.is_empty() {
                    pending.reading = false;
                    return;
                }
                std::mem::take(&mut pending.waiting)
            };
            // One request at a time: what is known now was known before this one was sent.
            let before = *self.newest.lock().unwrap_or_else(|p| p.into_inner());
            let result = bounds(&self.feed).await.map_err(|e| e.0);
            if let Ok(Answered { bounds, led: true }) = result {
                self.newest.lock().unwrap_or_else(|p| p.into_inner()).note(bounds);
            }
            let result =
                result.map(|Answered { bounds, led }| Reading { bounds, known: before.known_in(&bounds), led });
            for answer in waiting {
                let _ = answer.send(result.clone());
            }
        }
    }
}

/// What reading bounds that reach a known sequence asks of the stream.
trait StreamView {
    /// The bounds, read now.
    async fn reading(&self) -> Result<Reading, StreamError>;
    /// The first sequence stored from `from` on, by the stream's leader.
    async fn stored_from(&self, from: u64) -> Result<Option<u64>, StreamError>;
}

impl StreamView for std::sync::Arc<BoundsReader> {
    async fn reading(&self) -> Result<Reading, StreamError> {
        BoundsReader::reading(self).await
    }

    async fn stored_from(&self, from: u64) -> Result<Option<u64>, StreamError> {
        self.first_stored_from(from).await
    }
}

/// `read`, unless its stream had no leader: nothing tells how far behind such bounds are, since
/// the gateway may have missed what the replica lacks, so they fail, as while the stream elects a
/// leader (the join or catch-up tries again, then closes with 1013).
fn led(read: Reading) -> Result<Reading, StreamError> {
    match read.led {
        true => Ok(read),
        false => Err(StreamError("the stream has no leader: a replica's bounds may be behind".into())),
    }
}

/// See [`BoundsReader::read_at_least`].
async fn bounds_reaching(view: &impl StreamView, at_least: u64) -> Result<Bounds, StreamError> {
    let mut read = led(view.reading().await?)?;
    for _ in 0..STALE_RETRIES {
        if read.bounds.last >= at_least.max(read.known) {
            return Ok(read.bounds);
        }
        tokio::time::sleep(STALE_PAUSE).await;
        read = led(view.reading().await?)?;
    }
    let bounds = read.bounds;
    let stale = |stored: u64| {
        StreamError(format!("the stream's bounds end at {} but it stores {stored}: a stale view", bounds.last))
    };
    // Sequences never go back within an epoch: behind bounds read before, the view is stale.
    if bounds.last < read.known {
        return Err(stale(read.known));
    }
    if bounds.last >= at_least {
        return Ok(bounds);
    }
    match view.stored_from(at_least).await? {
        None => Ok(bounds),
        Some(seq) => Err(stale(seq)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(epoch: u64, last: u64) -> Bounds {
        Bounds { first: 1, last, epoch, per_subject_cap: None }
    }

    /// A stream whose bounds answers are `answers`, in turn (the last one again and again).
    struct Answers {
        answers: std::sync::Mutex<Vec<Bounds>>,
        newest: Newest,
        stored: Option<u64>,
        /// Whether the stream has a leader.
        led: bool,
    }

    impl StreamView for Answers {
        async fn reading(&self) -> Result<Reading, StreamError> {
            let mut answers = self.answers.lock().unwrap();
            let bounds = if answers.len() > 1 { answers.remove(0) } else { answers[0] };
            Ok(Reading { bounds, known: self.newest.known_in(&bounds), led: self.led })
        }

        async fn stored_from(&self, from: u64) -> Result<Option<u64>, StreamError> {
            Ok(self.stored.filter(|last| *last >= from))
        }
    }

    fn answers(answers: &[Bounds], newest: Bounds, stored: Option<u64>) -> Answers {
        let mut known = Newest::default();
        known.note(newest);
        Answers { answers: std::sync::Mutex::new(answers.to_vec()), newest: known, stored, led: true }
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_behind_a_known_sequence_are_read_again_and_never_trusted_while_the_leader_stores_it() {
        let stale = bounds(7, 90);
        // Caught up after two more reads.
        let view = answers(&[stale, stale, bounds(7, 120)], bounds(7, 0), Some(120));
        assert_eq!(bounds_reaching(&view, 100).await.unwrap().last, 120);
        // Still behind the sequence asked for, which the leader stores: a failure, not a replay
        // that ends short.
        let view = answers(&[stale], bounds(7, 0), Some(120));
        assert!(bounds_reaching(&view, 100).await.is_err());
        // Behind bounds read before, in the same epoch: the same.
        let view = answers(&[stale], bounds(7, 110), Some(120));
        assert!(bounds_reaching(&view, 0).await.is_err());
        // Behind bounds read before even when the leader says nothing of that sequence (the
        // message there was deleted): within an epoch, sequences never go back.
        let view = answers(&[stale], bounds(7, 110), None);
        assert!(bounds_reaching(&view, 0).await.is_err());
        // Behind `at_least` only, and the leader stores nothing from there on (the stream was made
        // again, or a client's `since` is bogus): trusted.
        let view = answers(&[stale], bounds(7, 0), Some(95));
        assert_eq!(bounds_reaching(&view, 100).await.unwrap(), stale);
        // Bounds read before of another epoch say nothing of this one.
        let view = answers(&[stale], bounds(6, 500), None);
        assert_eq!(bounds_reaching(&view, 0).await.unwrap(), stale);
        // A replica of a stream without a leader: even bounds that reach everything known fail.
        let view = Answers { led: false, ..answers(&[bounds(7, 120)], bounds(7, 0), None) };
        assert!(bounds_reaching(&view, 100).await.is_err());
    }

    #[test]
    fn an_answer_says_whether_the_stream_had_a_leader() {
        let state = r#""state":{"first_seq":3,"last_seq":9},"config":{"max_msgs_per_subject":5},"created":"2026-12-05T10:00:00Z""#;
        let bounds = Bounds { first: 3, last: 9, epoch: stable_hash("2026-12-05T10:00:00Z"), per_subject_cap: Some(5) };
        let led = format!(r#"{{{state},"cluster":{{"name":"c","leader":"n2","replicas":[]}}}}"#);
        assert_eq!(bounds_answered(led.as_bytes()).unwrap(), Answered { bounds, led: true });
        // A replica of a stream without a leader: its store may be behind the others'.
        let leaderless = format!(r#"{{{state},"cluster":{{"name":"c","replicas":[]}}}}"#);
        assert_eq!(bounds_answered(leaderless.as_bytes()).unwrap(), Answered { bounds, led: false });
        let empty_leader = format!(r#"{{{state},"cluster":{{"name":"c","leader":""}}}}"#);
        assert!(!bounds_answered(empty_leader.as_bytes()).unwrap().led);
        // A server without a cluster says nothing of one.
        let alone = format!("{{{state}}}");
        assert_eq!(bounds_answered(alone.as_bytes()).unwrap(), Answered { bounds, led: true });
        let refused = r#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(bounds_answered(refused.as_bytes()).is_err());
    }

    #[test]
    fn bounds_behind_newer_ones_of_the_same_epoch_are_stale_and_a_new_epoch_starts_over() {
        let mut newest = Newest::default();
        newest.note(bounds(7, 100));
        newest.note(bounds(7, 90));
        assert_eq!(newest.known_in(&bounds(7, 90)), 100, "a stale answer does not lower what is known");
        assert_eq!(newest.known_in(&bounds(8, 5)), 0, "another epoch: nothing known of it");
        newest.note(bounds(8, 5));
        assert_eq!(newest.known_in(&bounds(8, 5)), 5, "the stream made again");
        assert_eq!(newest.known_in(&bounds(7, 90)), 0);
        newest.note(bounds(0, 50));
        assert_eq!(newest.known_in(&bounds(0, 10)), 0, "no epoch: streams cannot be told apart");
    }
}
