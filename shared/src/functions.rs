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
    /// The user whose sockets to count in [`PresenceReply::user_connections`], or none: then every
    /// gateway lists its users ([`PresenceReply::user_ids`]), so the asker can count each user once.
    #[serde(default)]
    pub user: Option<String>,
}

/// One message of a gateway's answer to a [`PresenceQuery`].
///
/// An answer about one user is one message. An answer about everyone lists the gateway's users,
/// split over [`parts`](Self::parts) messages (see [`presence_answer`]) so that none nears the
/// server's `max_payload`; every part repeats the counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Which message of the answer this is, from 0. Default 0.
    #[serde(default)]
    pub part: u32,
    /// How many messages the answer holds. Default 1.
    #[serde(default = "one_part")]
    pub parts: u32,
    /// This part's share of the ids of the users with a socket on this gateway, each listed in
    /// exactly one part. Absent in answers about one user, and from a gateway that does not list
    /// its users (the asker then counts [`users`](Self::users) as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
}

fn one_part() -> u32 {
    1
}

impl PresenceReply {
    /// A one-message answer holding counts only (an answer about one user).
    pub fn counts(node: &str, users: u64, connections: u64, user_connections: u64) -> PresenceReply {
        PresenceReply {
            node: node.to_string(),
            users,
            connections,
            user_connections,
            part: 0,
            parts: 1,
            user_ids: None,
        }
    }
}

/// How many bytes of user ids one [`PresenceReply`] carries at most, by default: an eighth of the
/// 1 MiB `max_payload` of Herald's NATS configuration, so no answer nears it.
pub const PRESENCE_PART_BYTES: usize = 128 * 1024;

/// A gateway's answer to a question about everyone: its counts, and `user_ids` (its users, each
/// once) split into parts whose ids take at most `max_part_bytes` of JSON each (at least one id per
/// part, and always at least one part).
pub fn presence_answer<I, S>(node: &str, user_ids: I, connections: u64, max_part_bytes: usize) -> Vec<PresenceReply>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
    let mut chunk_bytes = 0;
    let mut users = 0u64;
    for id in user_ids {
        let id = id.into();
        // `"id",` in JSON: valid ids need no escaping.
        let bytes = id.len() + 3;
        let last = chunks.last_mut().expect("there is always a chunk");
        if !last.is_empty() && chunk_bytes + bytes > max_part_bytes {
            chunks.push(Vec::new());
            chunk_bytes = 0;
        }
        chunk_bytes += bytes;
        chunks.last_mut().expect("there is always a chunk").push(id);
        users += 1;
    }
    let parts = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(part, ids)| PresenceReply {
            node: node.to_string(),
            users,
            connections,
            user_connections: 0,
            part: part as u32,
            parts,
            user_ids: Some(ids),
        })
        .collect()
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
    /// The event's payload, encoded like a frame's `data` (see [`crate::payload`]), to read.
    pub data: serde_json::Value,
    /// The event's payload byte for byte, in base64: what a re-drive publishes (`data` cannot
    /// always tell: a JSON string and the same text as bytes look alike). Absent from letters
    /// written before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
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

    #[test]
    fn a_reply_without_parts_is_one_whole_answer() {
        let old: PresenceReply =
            serde_json::from_str(r#"{"node":"gw-1","users":3,"connections":4,"user_connections":1}"#).unwrap();
        assert_eq!(old, PresenceReply::counts("gw-1", 3, 4, 1));
        assert_eq!(
            serde_json::to_value(PresenceReply::counts("gw-1", 3, 4, 1)).unwrap(),
            serde_json::json!({"node":"gw-1","users":3,"connections":4,"user_connections":1,"part":0,"parts":1})
        );
    }

    #[test]
    fn presence_answers_list_every_user_once_in_bounded_parts() {
        let ids: Vec<String> = (0..1000).map(|n| format!("user-{n:04}")).collect();
        let parts = presence_answer("gw-1", ids.clone(), 1500, 1024);
        assert!(parts.len() > 1);
        let mut listed = Vec::new();
        for (n, part) in parts.iter().enumerate() {
            assert_eq!((part.part, part.parts), (n as u32, parts.len() as u32));
            assert_eq!((part.node.as_str(), part.users, part.connections), ("gw-1", 1000, 1500));
            let part_ids = part.user_ids.as_ref().unwrap();
            let ids_bytes = serde_json::to_vec(part_ids).unwrap().len();
            assert!(ids_bytes <= 1024 + 2, "{ids_bytes}");
            listed.extend(part_ids.iter().cloned());
        }
        assert_eq!(listed, ids);

        let empty = presence_answer("gw-2", Vec::<String>::new(), 0, 1024);
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].parts, empty[0].users, empty[0].user_ids.as_deref()), (1, 0, Some(&[][..])));
        // An id longer than the budget still goes out, alone in its part.
        let long = presence_answer("gw-3", ["a".repeat(100), "b".into()], 2, 10);
        assert_eq!(long.iter().map(|p| p.user_ids.as_ref().unwrap().len()).collect::<Vec<_>>(), [1, 1]);
    }
}
