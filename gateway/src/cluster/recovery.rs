//! Socket.IO connection states kept for recovery, in KV `herald-socketio`: per user and state (its
//! device, `socketio-<pid root>`), the topics it is subscribed to, `{"topics":[...]}`.
//!
//! The messages a recovering client missed come from the stream; its topics come from here. A
//! connection writes its state when it opens, when its topics change, and when it closes; the
//! bucket's max age (`socketio_recovery_window`) removes a state that long after its last write,
//! so a client that comes back later, or after its gateway died before writing, is told it was
//! not recovered, as socket.io tells a client whose state it no longer has.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use herald_shared::subject::KV_SOCKETIO;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::cursor::cursor_key;

#[derive(Serialize, Deserialize)]
struct Entry {
    topics: Vec<String>,
}

/// A state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("Socket.IO state store: {0}")]
pub(crate) struct StateError(String);

fn error(what: impl std::fmt::Display) -> StateError {
    StateError(what.to_string())
}

pub(crate) struct RecoveryStates {
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
}

impl RecoveryStates {
    pub(crate) fn new(js: jetstream::Context) -> RecoveryStates {
        RecoveryStates { js, bucket: OnceCell::new() }
    }

    async fn bucket(&self) -> Result<&kv::Store, StateError> {
        self.bucket.get_or_try_init(|| async { self.js.get_key_value(KV_SOCKETIO).await.map_err(error) }).await
    }

    /// The topics of the state `device` of `user`, if it is still kept, as the bucket's leader has
    /// it (a replica may not have the write of a connection that just closed elsewhere yet).
    pub(crate) async fn read(&self, user: &str, device: &str) -> Result<Option<Vec<String>>, StateError> {
        patiently(self.read_now(user, device)).await
    }

    async fn read_now(&self, user: &str, device: &str) -> Result<Option<Vec<String>>, StateError> {
        let bucket = self.bucket().await?;
        let subject = format!("$KV.{KV_SOCKETIO}.{}", cursor_key(user, device));
        match bucket.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) if message.headers.get("KV-Operation").is_none() => {
                let entry: Entry = serde_json::from_slice(&message.payload).map_err(error)?;
                Ok(Some(entry.topics))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(error(e)),
        }
    }

    /// Keeps `topics` as the state `device` of `user`, for the recovery window from now.
    pub(crate) async fn write(&self, user: &str, device: &str, topics: Vec<String>) -> Result<(), StateError> {
        let value = serde_json::to_vec(&Entry { topics }).map_err(error)?;
        patiently(async {
            self.bucket().await?.put(cursor_key(user, device), Bytes::from(value)).await.map_err(error)?;
            Ok(())
        })
        .await
    }
}

/// How long a connection waits on this bucket: a bucket without a leader must not hold a CONNECT
/// or the session's next jobs for JetStream's whole request timeout each time.
const PATIENCE: Duration = Duration::from_secs(2);

async fn patiently<T>(work: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
    tokio::time::timeout(PATIENCE, work).await.unwrap_or_else(|_| Err(error("KV did not answer in time")))
}
