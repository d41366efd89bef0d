//! Reading a request's whole body, bounded in size and in time: a client that announces a body and
//! then sends it slowly, or never, must not hold a connection (and the task reading it) forever.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::body::{Body, Incoming};
use hyper::header::EXPECT;
use tokio::time::Instant;

/// Most bytes of a refused body read (and dropped) after its answer, see [`drain_after_answer`].
const DRAIN_LIMIT: u64 = 16 << 20;
/// Longest a refused body is read after its answer, when `request_body_timeout` is 0 (none).
const DRAIN_PATIENCE: Duration = Duration::from_secs(60);

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over the limit given.
    TooLarge,
    /// Not all of it arrived within the time given.
    TimedOut,
    /// The connection broke, or the body was malformed (a bad chunk), before its end.
    CutOff,
}

/// The whole body, when it is at most `limit` bytes and arrives within `within` (zero: no limit);
/// `headers` are its request's.
pub(crate) async fn read(
    headers: &HeaderMap,
    mut body: Incoming,
    limit: usize,
    within: Duration,
) -> Result<Bytes, BodyError> {
    // A refused body is read after its answer for what is left of the time it had.
    let drain_until = Instant::now() + if within.is_zero() { DRAIN_PATIENCE } else { within };
    // A `Content-Length` over the limit is refused before a byte is read (nor waited for).
    if body.size_hint().lower() > limit as u64 {
        // A client that asked whether to send it (`Expect: 100-continue`) sends nothing more.
        if !expects_continue(headers) {
            drain_after_answer(body, drain_until);
        }
        return Err(BodyError::TooLarge);
    }
    let collect = collect(&mut body, limit);
    let collected = if within.is_zero() {
        collect.await
    } else {
        tokio::time::timeout(within, collect).await.map_err(|_| BodyError::TimedOut)?
    };
    if collected == Err(BodyError::TooLarge) {
        drain_after_answer(body, drain_until);
    }
    collected
}

async fn collect(body: &mut Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::CutOff)?.into_data() else { continue };
        if collected.len() + data.len() > limit {
            return Err(BodyError::TooLarge);
        }
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(EXPECT).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads the rest of a refused body, and drops it, while its answer goes out: most clients send a
/// whole body before they read the answer, and a connection closed with their bytes unread is
/// reset, which they report as a network error instead of the answer. Bounded: at most
/// [`DRAIN_LIMIT`] bytes, until `until` (the connection is then closed, as before).
fn drain_after_answer(mut body: Incoming, until: Instant) {
    tokio::spawn(tokio::time::timeout_at(until, async move {
        let mut read = 0;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |data| data.len() as u64);
            if read > DRAIN_LIMIT {
                break;
            }
        }
    }));
}
