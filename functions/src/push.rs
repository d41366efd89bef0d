//! Pushing from a function: a JetStream publish to `push.user.<id>` / `push.topic.<t>` /
//! `push.all` whose `Nats-Msg-Id` is derived from the input, so a retried handler never pushes
//! twice (the `HERALD` stream stores one copy per id within its duplicate window).

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use herald_shared::id::{IdError, IdKind, check_id};
use herald_shared::subject::{Audience, header};

use crate::error::HandlerError;

/// The most pushes [`Pusher::push_all`] has sent and not yet seen acknowledged.
pub const MAX_IN_FLIGHT: usize = 256;

/// The longest source id accepted.
const MAX_SOURCE_ID_LEN: usize = 256;

/// Publishes pushes with JetStream and waits for the stream's acknowledgement.
#[derive(Clone)]
pub struct Pusher {
    js: jetstream::Context,
}

/// A stored push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushAck {
    /// The message's stream sequence (the first copy's, for a duplicate).
    pub seq: u64,
    /// True when the stream already held this `Nats-Msg-Id`: nothing new was stored.
    pub duplicate: bool,
}

/// Why a push was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A user id or topic that breaks the id rule: it would not be one subject token.
    #[error(transparent)]
    BadTarget(#[from] IdError),
    /// A source id that is empty, too long, or holds whitespace or control characters.
    #[error("bad source id {0:?}: 1 to 256 printable characters without spaces")]
    BadSourceId(String),
    /// A kind that is empty, too long, holds control characters or spaces at either end: why.
    #[error("bad kind: {0}")]
    BadKind(String),
    /// NATS did not store it (no stream, no connection, timeout).
    #[error("publish failed: {0}")]
    Publish(String),
}

/// Bad input is permanent; a failed publish may pass next time.
impl From<PushError> for HandlerError {
    fn from(error: PushError) -> HandlerError {
        match error {
            PushError::Publish(_) => HandlerError::transient(error.to_string()),
            _ => HandlerError::permanent(error.to_string()),
        }
    }
}

impl Pusher {
    /// A pusher publishing through `js`.
    pub fn new(js: jetstream::Context) -> Pusher {
        Pusher { js }
    }

    /// Pushes `payload` to `to`, with `Nats-Msg-Id` = [`msg_id`]`(source_id, to)` and, when given,
    /// `Herald-Type: kind`. Pushing the same `source_id` to the same audience again stores nothing.
    pub async fn push(
        &self,
        source_id: &str,
        to: &Audience,
        kind: Option<&str>,
        payload: Bytes,
    ) -> Result<PushAck, PushError> {
        check_push(source_id, std::slice::from_ref(to), kind)?;
        self.send(source_id, to, kind, payload).await?.await
    }

    /// Pushes `payload` to each of `audiences`, as [`Pusher::push`] does, pipelined: up to
    /// [`MAX_IN_FLIGHT`] publishes are sent before their acknowledgements are awaited, so thousands
    /// of pushes take a few round trips rather than one each. Every audience is checked before
    /// anything is sent. Fails when any push was not stored; some others may have been, and pushing
    /// the same `source_id` again stores only those that were not.
    pub async fn push_all(
        &self,
        source_id: &str,
        audiences: &[Audience],
        kind: Option<&str>,
        payload: Bytes,
    ) -> Result<Vec<PushAck>, PushError> {
        check_push(source_id, audiences, kind)?;
        let mut acks = Vec::with_capacity(audiences.len());
        let mut in_flight = FuturesOrdered::new();
        for to in audiences {
            if in_flight.len() >= MAX_IN_FLIGHT
                && let Some(ack) = in_flight.next().await
            {
                acks.push(ack?);
            }
            in_flight.push_back(self.send(source_id, to, kind, payload.clone()).await?);
        }
        while let Some(ack) = in_flight.next().await {
            acks.push(ack?);
        }
        Ok(acks)
    }

    /// Sends one push (already checked) and returns the wait for its acknowledgement.
    async fn send(
        &self,
        source_id: &str,
        to: &Audience,
        kind: Option<&str>,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<PushAck, PushError>> + use<>, PushError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_MSG_ID, msg_id(source_id, to).as_str());
        if let Some(kind) = kind {
            headers.insert(header::HERALD_TYPE, kind);
        }
        let ack = self
            .js
            .publish_with_headers(to.push_subject(), headers, payload)
            .await
            .map_err(|e| PushError::Publish(e.to_string()))?;
        Ok(async move {
            let ack = ack.await.map_err(|e| PushError::Publish(e.to_string()))?;
            Ok(PushAck { seq: ack.sequence, duplicate: ack.duplicate })
        })
    }
}

/// Checks everything a push names before anything is sent.
fn check_push(source_id: &str, audiences: &[Audience], kind: Option<&str>) -> Result<(), PushError> {
    check_source_id(source_id)?;
    if let Some(kind) = kind {
        check_kind(kind)?;
    }
    for to in audiences {
        check_audience(to)?;
    }
    Ok(())
}

/// The `Nats-Msg-Id` of a push of `source_id` to `to`: `<source>:user:<id>`, `<source>:topic:<t>`
/// or `<source>:all`.
pub fn msg_id(source_id: &str, to: &Audience) -> String {
    match to {
        Audience::User(user) => format!("{source_id}:user:{user}"),
        Audience::Topic(topic) => format!("{source_id}:topic:{topic}"),
        Audience::All => format!("{source_id}:all"),
    }
}

/// Refuses a user or topic that would not be exactly one subject token (never a wildcard).
pub fn check_audience(to: &Audience) -> Result<(), IdError> {
    match to {
        Audience::User(user) => check_id(IdKind::User, user),
        Audience::Topic(topic) => check_id(IdKind::Topic, topic),
        Audience::All => Ok(()),
    }
}

fn check_source_id(id: &str) -> Result<(), PushError> {
    let printable = id.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if id.is_empty() || id.len() > MAX_SOURCE_ID_LEN || !printable {
        return Err(PushError::BadSourceId(id.chars().take(64).collect()));
    }
    Ok(())
}

fn check_kind(kind: &str) -> Result<(), PushError> {
    herald_shared::id::check_kind(kind).map_err(PushError::BadKind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_ids_name_the_source_and_the_target() {
        assert_eq!(msg_id("evt-1", &Audience::User("42".into())), "evt-1:user:42");
        assert_eq!(msg_id("evt-1", &Audience::Topic("news".into())), "evt-1:topic:news");
        assert_eq!(msg_id("evt-1", &Audience::All), "evt-1:all");
    }

    #[test]
    fn wildcards_and_bad_ids_are_refused() {
        for bad in ["*", ">", "a.b", "", "a b"] {
            assert!(check_audience(&Audience::User(bad.into())).is_err(), "{bad}");
            assert!(check_audience(&Audience::Topic(bad.into())).is_err(), "{bad}");
        }
        assert!(check_audience(&Audience::All).is_ok());
        assert!(check_source_id("order-7.shipped").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(257)] {
            assert!(check_source_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_kind("marketing").is_ok());
        assert!(check_kind(&"k".repeat(128)).is_ok(), "the shared rule's limit");
        let refused = |kind: &str| check_kind(kind).unwrap_err().to_string();
        assert_eq!(refused("a\r\nInjected: 1"), r#"bad kind: kind "a\r\nInjected: 1" holds a control character"#);
        assert_eq!(
            refused(&"k".repeat(129)),
            format!("bad kind: kind {:?}… is longer than 128 characters", "k".repeat(16))
        );
        assert_eq!(refused(""), "bad kind: a kind is not empty");
    }
}
