//! Reading a request's whole body, bounded in size and in time: a client that announces a body and
//! then sends it slowly, or never, must not hold a connection (and the task reading it) forever.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};

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

/// The whole body, when it is at most `limit` bytes and arrives within `within` (zero: no limit).
pub(crate) async fn read(body: Incoming, limit: usize, within: Duration) -> Result<Bytes, BodyError> {
    // A `Content-Length` over the limit is refused before a byte is read (nor waited for).
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    let collect = Limited::new(body, limit).collect();
    let collected = if within.is_zero() {
        collect.await
    } else {
        tokio::time::timeout(within, collect).await.map_err(|_| BodyError::TimedOut)?
    };
    match collected {
        Ok(body) => Ok(body.to_bytes()),
        Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::CutOff),
    }
}
