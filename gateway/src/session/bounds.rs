//! Reading the stream's current bounds: its first and last sequence.

use bytes::Bytes;
use herald_shared::subject::STREAM;
use serde::Deserialize;

use crate::delivery::feed::Feed;

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
}

/// A `STREAM.INFO` answer: the state, or an error.
#[derive(Deserialize)]
struct InfoAnswer {
    state: Option<Bounds>,
    created: Option<String>,
    error: Option<serde_json::Value>,
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
async fn bounds(feed: &Feed) -> Result<Bounds, StreamError> {
    let answer = feed
        .request(format!("$JS.API.STREAM.INFO.{STREAM}"), Bytes::new())
        .await
        .map_err(|e| StreamError(e.to_string()))?;
    let answer: InfoAnswer = serde_json::from_slice(&answer).map_err(|e| StreamError(e.to_string()))?;
    match (answer.state, answer.error) {
        (Some(state), None) => Ok(Bounds { epoch: answer.created.as_deref().map_or(0, stable_hash), ..state }),
        (_, Some(error)) => Err(StreamError(error.to_string())),
        (None, None) => Err(StreamError("no state in the stream info".into())),
    }
}

/// How many times, and how far apart, bounds older than a known sequence are read again.
const STALE_RETRIES: usize = 5;
const STALE_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// Reads the bounds for many sessions at once. A session that asks joins the next request sent,
/// never one already in flight: the request must leave after the session's subscriptions, on the
/// same connection, for the join to be exact. In a reconnect storm this turns a request per
/// session into a handful.
pub(crate) struct BoundsReader {
    feed: Feed,
    pending: std::sync::Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<Bounds, String>>>,
    reading: bool,
}

impl BoundsReader {
    /// A reader over the delivery feed.
    pub(crate) fn new(feed: Feed) -> BoundsReader {
        BoundsReader { feed, pending: Default::default() }
    }

    /// The stream's bounds, read by a request sent after this call began.
    pub(crate) async fn read(self: &std::sync::Arc<Self>) -> Result<Bounds, StreamError> {
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

    /// The stream's bounds, read again (a few times, a moment apart) while they end before
    /// `at_least`, a sequence known to exist: a NATS server that was cut off from its cluster may
    /// answer from a stale view for a while after it rejoined. The last answer is returned either way.
    pub(crate) async fn read_at_least(self: &std::sync::Arc<Self>, at_least: u64) -> Result<Bounds, StreamError> {
        let mut bounds = self.read().await?;
        for _ in 0..STALE_RETRIES {
            if bounds.last >= at_least {
                break;
            }
            tokio::time::sleep(STALE_PAUSE).await;
            bounds = self.read().await?;
        }
        Ok(bounds)
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
            let result = bounds(&self.feed).await.map_err(|e| e.0);
            for answer in waiting {
                let _ = answer.send(result.clone());
            }
        }
    }
}
