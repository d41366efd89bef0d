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
