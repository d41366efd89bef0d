//! Reading the stream's current bounds: its first and last sequence.

use async_nats::jetstream::{self, response::Response};
use herald_shared::subject::STREAM;
use serde::Deserialize;

/// The stream's bounds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct Bounds {
    #[serde(rename = "first_seq")]
    pub(crate) first: u64,
    #[serde(rename = "last_seq")]
    pub(crate) last: u64,
}

#[derive(Deserialize)]
struct InfoState {
    state: Bounds,
}

/// The stream could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the stream: {0}")]
pub(crate) struct StreamError(pub(crate) String);

/// The stream's bounds, read from the server now.
pub(crate) async fn bounds(js: &jetstream::Context) -> Result<Bounds, StreamError> {
    let response: Response<InfoState> =
        js.request(format!("STREAM.INFO.{STREAM}"), &()).await.map_err(|e| StreamError(e.to_string()))?;
    match response {
        Response::Ok(info) => Ok(info.state),
        Response::Err { error } => Err(StreamError(error.to_string())),
    }
}

/// Reads the bounds for many sessions at once. A session that asks joins the next request sent,
/// never one already in flight: the request must leave after the session's subscriptions, on the
/// same connection, for the join to be exact. In a reconnect storm this turns a request per
/// session into a handful.
pub(crate) struct BoundsReader {
    js: jetstream::Context,
    pending: std::sync::Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<Bounds, String>>>,
    reading: bool,
}

impl BoundsReader {
    /// A reader over `js` (the delivery connection).
    pub(crate) fn new(js: jetstream::Context) -> BoundsReader {
        BoundsReader { js, pending: Default::default() }
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
            let result = bounds(&self.js).await.map_err(|e| e.0);
            for answer in waiting {
                let _ = answer.send(result.clone());
            }
        }
    }
}
