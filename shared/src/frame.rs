//! The frames of the WebSocket protocol (PROTOCOL.md sections 3 and 4).
//!
//! Every frame is a text frame holding one JSON object with a `type`. [`ServerFrame`] and
//! [`ClientFrame`] are the typed forms; the gateway's hot path writes `msg` frames directly with
//! [`write_msg`], once per message, without building a [`ServerFrame`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::payload::{write_data, write_json_string};

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Always the first frame of a connection.
    Welcome {
        conn: String,
        user: String,
        device: String,
        node: String,
        /// The stream's last sequence when the connection went live.
        seq: u64,
        /// Seconds between server pings; a client that hears nothing for longer should reconnect.
        heartbeat: u64,
        /// The user's read position: the highest personal `seq` read on any device.
        #[serde(default)]
        read: u64,
        /// The user's unread personal messages up to `seq` (muted kinds left out).
        #[serde(default)]
        unread: u64,
        /// Names the stream among the streams of its name over time (hex digits): a stream made
        /// again starts its sequences over, and a `since` of another epoch means other messages.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    Msg(Msg),
    /// Closes a replay: after the replayed messages, before any live one.
    Replayed {
        from: u64,
        to: u64,
        count: u64,
        complete: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
    Subscribed {
        topic: String,
    },
    Unsubscribed {
        topic: String,
    },
    RpcResult(RpcResult),
    /// The user's read position moved (on this device or another): `unread` is the new count.
    Read {
        seq: u64,
        unread: u64,
    },
    Pong,
    /// The answer to a `refresh`: the connection now ends at the new token's `exp`, `ttl` seconds
    /// from now by the gateway's clock.
    Refreshed {
        exp: u64,
        ttl: u64,
    },
    Error {
        code: String,
        message: String,
        /// The topic of the `sub` or `unsub` refused, when it is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
}

/// A pushed message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Msg {
    /// The stream sequence: the resume point.
    pub seq: u64,
    /// `user`, `all` or `topic:<t>`.
    pub to: String,
    /// The publisher's `Nats-Msg-Id`, or empty (left out of the frame when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The publisher's `Herald-Type`, or empty (left out of the frame when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// When the stream stored it (RFC 3339).
    pub ts: String,
    pub data: Value,
}

/// The answer to a client's `rpc` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcResult {
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

/// Why an `rpc` failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: String,
    pub message: String,
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Moves the device cursor forward to `seq`.
    Ack {
        seq: u64,
    },
    /// The user read everything personal up to `seq`: moves the read position forward (and acks).
    Read {
        seq: u64,
    },
    Sub {
        topic: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    Unsub {
        topic: String,
    },
    Rpc {
        id: String,
        #[serde(rename = "fn")]
        function: String,
        #[serde(default)]
        data: Value,
    },
    Ping,
    /// A new token for the connection (same user): it then ends at that token's expiry, not the
    /// first one's, without a reconnect.
    Refresh {
        token: String,
    },
}

/// `code` values of `error` frames and failed `rpc_result`s.
pub mod error_code {
    /// A frame with a known type but missing or invalid fields, a bad topic or function name.
    pub const BAD_REQUEST: &str = "bad_request";
    /// A topic outside the token's `topics` claim.
    pub const FORBIDDEN: &str = "forbidden";
    /// A frame whose `type` this gateway does not know.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// The gateway could not do what was asked because a dependency (NATS) failed.
    pub const UNAVAILABLE: &str = "unavailable";
    pub const NO_FUNCTION: &str = "no_function";
    pub const TIMEOUT: &str = "timeout";
    pub const FUNCTION_ERROR: &str = "function_error";
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A `refresh` whose token is refused (bad, expired, another user's).
    pub const UNAUTHORIZED: &str = "unauthorized";
}

/// WebSocket close codes of the contract.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    /// Nothing heard from the client for a heartbeat plus the timeout.
    pub const NO_HEARTBEAT: u16 = 1001;
    /// A WebSocket frame that breaks the protocol (RFC 6455).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message (or close reason) that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A message the gateway does not allow (not a JSON frame, binary).
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway is restarting: reconnect with `since`, possibly elsewhere.
    pub const RESTART: u16 = 1012;
    /// NATS or the stream was unavailable: reconnect with `since` a moment later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired while connected.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// An operator disconnected this connection or user.
    pub const DISCONNECTED: u16 = 4003;
    /// Slow consumer: the outbound queue overflowed; reconnect with `since`, nothing is lost.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Replaced by a newer session (session policy).
    pub const REPLACED: u16 = 4009;
    pub const RATE_LIMITED: u16 = 4029;
}

/// The fields of a `msg` frame other than its payload.
#[derive(Debug, Clone, Copy)]
pub struct MsgMeta<'a> {
    pub seq: u64,
    pub to: &'a str,
    pub id: &'a str,
    pub kind: &'a str,
    pub ts: &'a str,
}

/// Appends the JSON text of a `msg` frame to `out`; an empty `id` or `kind` is left out.
pub fn write_msg(out: &mut Vec<u8>, meta: &MsgMeta<'_>, payload: &[u8]) {
    out.extend_from_slice(b"{\"type\":\"msg\",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(meta.seq).as_bytes());
    out.extend_from_slice(b",\"to\":");
    write_json_string(out, meta.to);
    if !meta.id.is_empty() {
        out.extend_from_slice(b",\"id\":");
        write_json_string(out, meta.id);
    }
    if !meta.kind.is_empty() {
        out.extend_from_slice(b",\"kind\":");
        write_json_string(out, meta.kind);
    }
    out.extend_from_slice(b",\"ts\":");
    write_json_string(out, meta.ts);
    out.extend_from_slice(b",\"data\":");
    write_data(out, payload);
    out.push(b'}');
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error { code: code.to_string(), message: message.into(), topic: None }
    }

    /// An `error` frame refusing a request about `topic`.
    pub fn topic_error(code: &str, message: impl Into<String>, topic: &str) -> ServerFrame {
        ServerFrame::Error { code: code.to_string(), message: message.into(), topic: Some(topic.to_string()) }
    }

    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_writer_matches_the_typed_frame() {
        let meta = MsgMeta { seq: 125, to: "topic:news", id: "m-1", kind: "chat", ts: "2026-01-02T03:04:05Z" };
        let mut out = Vec::new();
        write_msg(&mut out, &meta, br#"{"text":"hi \"there\""}"#);
        let parsed: ServerFrame = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            parsed,
            ServerFrame::Msg(Msg {
                seq: 125,
                to: "topic:news".into(),
                id: "m-1".into(),
                kind: "chat".into(),
                ts: "2026-01-02T03:04:05Z".into(),
                data: serde_json::json!({"text": "hi \"there\""}),
            })
        );
    }

    #[test]
    fn msg_leaves_out_an_empty_id_and_kind() {
        let meta = MsgMeta { seq: 7, to: "all", id: "", kind: "", ts: "2026-01-02T03:04:05Z" };
        let mut out = Vec::new();
        write_msg(&mut out, &meta, b"1");
        assert_eq!(out, br#"{"type":"msg","seq":7,"to":"all","ts":"2026-01-02T03:04:05Z","data":1}"#);
        let ServerFrame::Msg(msg) = serde_json::from_slice(&out).unwrap() else { panic!("not a msg") };
        assert_eq!((msg.id.as_str(), msg.kind.as_str()), ("", ""));
        assert_eq!(ServerFrame::Msg(msg).to_json(), String::from_utf8(out).unwrap());
    }

    #[test]
    fn client_frames_parse() {
        let cases = [
            (r#"{"type":"ack","seq":125}"#, ClientFrame::Ack { seq: 125 }),
            (
                r#"{"type":"sub","topic":"news","since":120}"#,
                ClientFrame::Sub { topic: "news".into(), since: Some(120) },
            ),
            (r#"{"type":"sub","topic":"news"}"#, ClientFrame::Sub { topic: "news".into(), since: None }),
            (r#"{"type":"unsub","topic":"news"}"#, ClientFrame::Unsub { topic: "news".into() }),
            (
                r#"{"type":"rpc","id":"c1","fn":"prefs.set","data":{"muted":[]}}"#,
                ClientFrame::Rpc {
                    id: "c1".into(),
                    function: "prefs.set".into(),
                    data: serde_json::json!({"muted":[]}),
                },
            ),
            (r#"{"type":"ping"}"#, ClientFrame::Ping),
            (r#"{"type":"read","seq":7}"#, ClientFrame::Read { seq: 7 }),
        ];
        for (text, frame) in cases {
            assert_eq!(serde_json::from_str::<ClientFrame>(text).unwrap(), frame, "{text}");
        }
    }

    #[test]
    fn server_frames_have_the_contract_shape() {
        let replayed = ServerFrame::Replayed { from: 11, to: 20, count: 3, complete: true, topic: None };
        assert_eq!(replayed.to_json(), r#"{"type":"replayed","from":11,"to":20,"count":3,"complete":true}"#);
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        let failed = ServerFrame::RpcResult(RpcResult {
            id: "c1".into(),
            ok: false,
            data: None,
            error: Some(RpcError { code: "timeout".into(), message: "no reply".into() }),
        });
        assert_eq!(
            failed.to_json(),
            r#"{"type":"rpc_result","id":"c1","ok":false,"error":{"code":"timeout","message":"no reply"}}"#
        );
    }
}
