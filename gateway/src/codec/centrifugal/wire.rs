//! The JSON shapes of the Centrifugal protocol (v2) that Herald writes: publications, pushes,
//! replies and errors, and the codes of errors and disconnects.

use bytes::Bytes;
use herald_shared::payload::{write_data, write_json_string};
use herald_shared::subject::Audience;

use crate::close::{Close, CloseCode};
use crate::delivery::message::Message;
use crate::websocket::frame::{self, FrameBuf};

/// The channel everything published to `push.all` goes to.
pub(crate) const ALL: &str = "all";

/// Client error codes (centrifugal.dev, "Client protocol codes").
pub(crate) mod error {
    pub(crate) const INTERNAL: u32 = 100;
    pub(crate) const UNAUTHORIZED: u32 = 101;
    pub(crate) const PERMISSION_DENIED: u32 = 103;
    pub(crate) const METHOD_NOT_FOUND: u32 = 104;
    pub(crate) const ALREADY_SUBSCRIBED: u32 = 105;
    pub(crate) const BAD_REQUEST: u32 = 107;
    pub(crate) const NOT_AVAILABLE: u32 = 108;
    pub(crate) const TOKEN_EXPIRED: u32 = 109;
    pub(crate) const TOO_MANY_REQUESTS: u32 = 111;
    pub(crate) const UNRECOVERABLE_POSITION: u32 = 112;
    /// What a push function reported: an application error (codes from 400 are the application's).
    pub(crate) const FUNCTION_ERROR: u32 = 400;
}

/// Disconnect codes sent as WebSocket close codes: 3000-3499 reconnect, 3500-3999 do not.
pub(crate) mod disconnect {
    pub(crate) const SHUTDOWN: u16 = 3001;
    pub(crate) const SERVER_ERROR: u16 = 3004;
    pub(crate) const EXPIRED: u16 = 3005;
    pub(crate) const SLOW: u16 = 3008;
    pub(crate) const NO_PONG: u16 = 3012;
    pub(crate) const INVALID_TOKEN: u16 = 3500;
    pub(crate) const BAD_REQUEST: u16 = 3501;
    pub(crate) const STALE: u16 = 3502;
    pub(crate) const FORCE_NO_RECONNECT: u16 = 3503;
    pub(crate) const CONNECTION_LIMIT: u16 = 3504;
}

/// The Centrifugal disconnect code for one of Herald's closes.
pub(crate) fn disconnect_code(code: CloseCode) -> u16 {
    match code {
        CloseCode::NoHeartbeat => disconnect::NO_PONG,
        CloseCode::ProtocolError | CloseCode::InvalidData | CloseCode::Policy => disconnect::BAD_REQUEST,
        // The SDKs know 1009 (a message over the size limit).
        CloseCode::TooBig => 1009,
        CloseCode::Internal | CloseCode::Unavailable | CloseCode::Abnormal => disconnect::SERVER_ERROR,
        CloseCode::Restart => disconnect::SHUTDOWN,
        CloseCode::TokenExpired => disconnect::EXPIRED,
        CloseCode::Disconnected | CloseCode::Replaced => disconnect::FORCE_NO_RECONNECT,
        CloseCode::SlowConsumer => disconnect::SLOW,
        CloseCode::Echo(code) => code,
    }
}

/// The close frame ending a Centrifugal connection.
pub(crate) fn close_frame(close: &Close) -> Bytes {
    frame::close(disconnect_code(close.code), &close.reason)
}

/// The channel a message is published in.
pub(crate) fn channel(audience: &Audience) -> std::borrow::Cow<'_, str> {
    match audience {
        Audience::User(user) => format!("#{user}").into(),
        Audience::All => ALL.into(),
        Audience::Topic(topic) => topic.as_str().into(),
    }
}

/// Appends `{"data":…,"offset":seq,"tags":{"kind":…,"id":…}}` (tags left out when empty).
pub(crate) fn write_publication(out: &mut Vec<u8>, message: &Message) {
    out.extend_from_slice(b"{\"data\":");
    write_data_on_one_line(out, &message.payload);
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(message.seq.to_string().as_bytes());
    let tags = [("kind", &*message.kind), ("id", &*message.id)];
    let mut first = true;
    for (name, value) in tags.iter().filter(|(_, value)| !value.is_empty()) {
        out.extend_from_slice(if first { b",\"tags\":{\"" } else { b",\"" });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        write_json_string(out, value);
        first = false;
    }
    if !first {
        out.push(b'}');
    }
    out.push(b'}');
}

/// Appends `payload` as `data` with no line break: the JSON encoding puts one command or reply per
/// line, and the SDKs split a frame at every `\n`. A line break can be raw only in a payload that
/// is JSON, where outside its strings it is whitespace (inside them JSON escapes it), so leaving
/// it out changes no value.
fn write_data_on_one_line(out: &mut Vec<u8>, payload: &[u8]) {
    let start = out.len();
    write_data(out, payload);
    if memchr::memchr2(b'\n', b'\r', &out[start..]).is_some() {
        let mut at = start;
        for index in start..out.len() {
            if !matches!(out[index], b'\n' | b'\r') {
                out[at] = out[index];
                at += 1;
            }
        }
        out.truncate(at);
    }
}

/// The publication push of `message`, WebSocket header included (the same for every socket).
pub(crate) fn encode_message(message: &Message) -> Bytes {
    let channel = channel(&message.audience);
    let mut frame = FrameBuf::with_capacity(message.payload.len() + 96 + channel.len() + message.kind.len());
    let out = frame.body();
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    write_json_string(out, &channel);
    out.extend_from_slice(b",\"pub\":");
    write_publication(out, message);
    out.extend_from_slice(b"}}");
    frame.finish_text()
}

/// The publication push of `message` in the Protobuf encoding, WebSocket header included.
pub(crate) fn encode_message_protobuf(message: &Message) -> Bytes {
    frame::binary(&super::proto::push(&channel(&message.audience), message))
}

/// A reply to command `id` carrying `result` under `method`.
pub(crate) fn reply(id: u32, method: &str, result: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "id": id, method: result })).expect("JSON values serialize")
}

/// An error reply to command `id`; internal errors, NATS unavailable and rate limits are temporary.
pub(crate) fn error_reply(id: u32, code: u32, message: &str) -> Vec<u8> {
    let temporary = matches!(code, error::INTERNAL | error::NOT_AVAILABLE | error::TOO_MANY_REQUESTS);
    error_reply_of(id, code, message, temporary)
}

/// The reply to a command this server does not serve (108, as Centrifugo's "not available": no
/// retry makes it available).
pub(crate) fn not_served(id: u32, message: &str) -> Vec<u8> {
    error_reply_of(id, error::NOT_AVAILABLE, message, false)
}

fn error_reply_of(id: u32, code: u32, message: &str, temporary: bool) -> Vec<u8> {
    let mut error = serde_json::json!({"code": code, "message": message});
    if temporary {
        error["temporary"] = true.into();
    }
    serde_json::to_vec(&serde_json::json!({ "id": id, "error": error })).expect("JSON values serialize")
}

/// The Centrifugal error code of one of Herald's error codes.
pub(crate) fn error_code(herald: &str) -> u32 {
    use herald_shared::frame::error_code as herald_code;
    match herald {
        herald_code::FORBIDDEN => error::PERMISSION_DENIED,
        herald_code::BAD_REQUEST => error::BAD_REQUEST,
        herald_code::NO_FUNCTION => error::METHOD_NOT_FOUND,
        herald_code::RATE_LIMITED => error::TOO_MANY_REQUESTS,
        herald_code::UNAVAILABLE => error::NOT_AVAILABLE,
        herald_code::FUNCTION_ERROR => error::FUNCTION_ERROR,
        _ => error::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_becomes_a_publication_push() {
        let message =
            Message::new(7, Audience::User("42".into()), "mail", "m-1", "t", Bytes::from_static(b"{\"a\":1}"));
        let frame = encode_message(&message);
        assert_eq!(
            &frame[2..],
            br##"{"push":{"channel":"#42","pub":{"data":{"a":1},"offset":7,"tags":{"kind":"mail","id":"m-1"}}}}"##
        );
        let bare = Message::new(8, Audience::Topic("news".into()), "", "", "t", Bytes::from_static(b"hi"));
        assert_eq!(&encode_message(&bare)[2..], br#"{"push":{"channel":"news","pub":{"data":"hi","offset":8}}}"#);
    }

    #[test]
    fn closes_map_to_disconnect_codes() {
        assert_eq!(disconnect_code(CloseCode::Restart), 3001);
        assert_eq!(disconnect_code(CloseCode::TokenExpired), 3005);
        assert_eq!(disconnect_code(CloseCode::Replaced), 3503);
        assert_eq!(disconnect_code(CloseCode::Policy), 3501);
        assert_eq!(disconnect_code(CloseCode::Echo(1000)), 1000);
    }
}
