//! The contract between gateways and push functions (docs/functions.md): lifecycle events, the
//! presence scatter-gather, and dead letters.
//!
//! Gateways publish [`LifecycleEvent`]s on [`EVENTS_CONNECT`](crate::subject::EVENTS_CONNECT) and
//! [`EVENTS_DISCONNECT`](crate::subject::EVENTS_DISCONNECT) and answer [`PRESENCE_GATHER`] requests
//! with a [`PresenceReply`]; the functions runtime publishes a [`DeadLetter`] on
//! `herald.dlq.<function>` (see [`crate::subject::dead_letter`]) when it gives up on an event.

use serde::{Deserialize, Serialize};

/// Every gateway answers requests here with a [`PresenceReply`] about its own sockets.
pub use crate::subject::PRESENCE_GATHER;

/// Error headers set by the micro-service standard alongside `Herald-Error`.
pub mod header {
    /// The error text of a failed service request.
    pub const NATS_SERVICE_ERROR: &str = "Nats-Service-Error";
    /// The error code of a failed service request (400: bad input, 500: failure, 504: timeout).
    pub const NATS_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
}

/// A socket opened or closed on a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The socket's user id.
    pub user: String,
    /// The socket's device id.
    pub device: String,
    /// The socket's connection id.
    pub conn: String,
    /// The gateway's node id.
    pub node: String,
    /// When it happened (RFC 3339).
    pub ts: String,
    /// The close code; disconnect events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Why the socket closed; disconnect events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of a [`PRESENCE_GATHER`] request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceQuery {
    /// The user whose sockets to count in [`PresenceReply::user_connections`], or none.
    #[serde(default)]
    pub user: Option<String>,
}

/// One gateway's answer to a [`PresenceQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceReply {
    /// The gateway's node id.
    pub node: String,
    /// Distinct users with at least one socket on this gateway.
    pub users: u64,
    /// Open sockets on this gateway.
    pub connections: u64,
    /// Open sockets of the asked user on this gateway (0 when no user was asked).
    #[serde(default)]
    pub user_connections: u64,
}

/// What the functions runtime publishes on `herald.dlq.<function>` when it gives up on an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The function that failed.
    pub function: String,
    /// The event's original subject.
    pub subject: String,
    /// The stream the event was read from.
    pub stream: String,
    /// The event's sequence in that stream.
    pub seq: u64,
    /// How many deliveries were attempted.
    pub attempts: u64,
    /// The last error.
    pub error: String,
    /// The event's payload, encoded like a frame's `data` (see [`crate::payload`]).
    pub data: serde_json::Value,
    /// When it was dead-lettered (RFC 3339).
    pub ts: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_events_have_the_contract_shape() {
        let connect: LifecycleEvent = serde_json::from_str(
            r#"{"user":"42","device":"phone","conn":"c1","node":"gw-1","ts":"2026-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        assert_eq!((connect.code, connect.reason.as_deref()), (None, None));
        let disconnect = LifecycleEvent { code: Some(1000), reason: Some("bye".into()), ..connect };
        assert_eq!(
            serde_json::to_value(&disconnect).unwrap(),
            serde_json::json!({"user":"42","device":"phone","conn":"c1","node":"gw-1",
                "ts":"2026-01-02T03:04:05Z","code":1000,"reason":"bye"})
        );
    }

    #[test]
    fn presence_query_user_is_optional() {
        assert_eq!(serde_json::from_str::<PresenceQuery>("{}").unwrap(), PresenceQuery { user: None });
        assert_eq!(serde_json::to_string(&PresenceQuery { user: Some("a".into()) }).unwrap(), r#"{"user":"a"}"#);
    }
}
