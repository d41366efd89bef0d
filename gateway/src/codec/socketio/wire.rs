//! Engine.IO 4 and Socket.IO 4 packets as text: an Engine.IO packet is its type digit and data
//! (`4` a message), a Socket.IO packet inside a message is its type digit, an optional ack id and
//! JSON (`42["event",…]` an event, `43<id>[…]` an ack).

use bytes::Bytes;
use herald_shared::payload::{write_data, write_json_string};

use crate::delivery::message::Message;
use crate::websocket::frame::{self, FrameBuf};

/// Engine.IO packet types.
pub(crate) mod engine {
    pub(crate) const OPEN: u8 = b'0';
    pub(crate) const CLOSE: u8 = b'1';
    pub(crate) const PING: u8 = b'2';
    pub(crate) const PONG: u8 = b'3';
    pub(crate) const MESSAGE: u8 = b'4';
    pub(crate) const UPGRADE: u8 = b'5';
    pub(crate) const NOOP: u8 = b'6';
}

/// Socket.IO packet types.
pub(crate) mod packet {
    pub(crate) const CONNECT: u8 = b'0';
    pub(crate) const DISCONNECT: u8 = b'1';
    pub(crate) const EVENT: u8 = b'2';
    pub(crate) const ACK: u8 = b'3';
    pub(crate) const CONNECT_ERROR: u8 = b'4';
}

/// Event names the Socket.IO clients reserve for themselves: messages of these kinds are emitted
/// as `message`.
const RESERVED: [&str; 6] =
    ["connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"];

/// The event a message is emitted as: its kind, or `message`.
pub(crate) fn event_name(kind: &str) -> &str {
    if kind.is_empty() || RESERVED.contains(&kind) { "message" } else { kind }
}

/// `42["<kind>",<payload>,{"seq","to","id","ts"},"<seq>"]` in a text frame: the last argument is
/// the offset the Socket.IO clients keep for connection state recovery.
pub(crate) fn encode_message(message: &Message) -> Bytes {
    let to = message.audience.frame_to();
    let mut frame = FrameBuf::with_capacity(message.payload.len() + 96 + to.len() + message.kind.len());
    let out = frame.body();
    out.extend_from_slice(b"42[");
    write_json_string(out, event_name(&message.kind));
    out.push(b',');
    write_data(out, &message.payload);
    let seq = message.seq.to_string();
    out.extend_from_slice(b",{\"seq\":");
    out.extend_from_slice(seq.as_bytes());
    out.extend_from_slice(b",\"to\":");
    write_json_string(out, &to);
    if !message.id.is_empty() {
        out.extend_from_slice(b",\"id\":");
        write_json_string(out, &message.id);
    }
    if !message.kind.is_empty() && event_name(&message.kind) != &*message.kind {
        // A reserved kind: the event does not name it, so the metadata does.
        out.extend_from_slice(b",\"kind\":");
        write_json_string(out, &message.kind);
    }
    out.extend_from_slice(b",\"ts\":");
    write_json_string(out, &message.ts);
    out.extend_from_slice(b"},\"");
    out.extend_from_slice(seq.as_bytes());
    out.extend_from_slice(b"\"]");
    frame.finish_text()
}

/// A Socket.IO packet of `kind` (with `ack` id) carrying `json`, in an Engine.IO message frame.
pub(crate) fn packet(kind: u8, ack: Option<u64>, json: &serde_json::Value) -> Bytes {
    let mut text = vec![engine::MESSAGE, kind];
    if let Some(ack) = ack {
        text.extend_from_slice(ack.to_string().as_bytes());
    }
    text.extend_from_slice(json.to_string().as_bytes());
    frame::text(&text)
}

/// A Socket.IO packet in `namespace` (`/` when none): `4<kind>/chat,<json>`.
pub(crate) fn namespaced_packet(kind: u8, namespace: Option<&str>, json: &serde_json::Value) -> Bytes {
    let mut text = vec![engine::MESSAGE, kind];
    if let Some(namespace) = namespace {
        text.extend_from_slice(namespace.as_bytes());
        text.push(b',');
    }
    text.extend_from_slice(json.to_string().as_bytes());
    frame::text(&text)
}

/// An Engine.IO packet with no data (`2` ping, `3` pong, `6` noop).
pub(crate) fn engine_packet(kind: u8) -> Bytes {
    frame::text(&[kind])
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::subject::Audience;

    #[test]
    fn a_message_becomes_an_event_named_by_its_kind() {
        let message =
            Message::new(5, Audience::Topic("news".into()), "mail", "m-1", "t", Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(
            &encode_message(&message)[2..],
            br#"42["mail",{"a":1},{"seq":5,"to":"topic:news","id":"m-1","ts":"t"},"5"]"#
        );
        let kindless = Message::new(7, Audience::All, "", "", "t", Bytes::from_static(b"x"));
        assert_eq!(&encode_message(&kindless)[2..], br#"42["message","x",{"seq":7,"to":"all","ts":"t"},"7"]"#);
        let reserved = Message::new(6, Audience::All, "connect", "", "t", Bytes::from_static(b"x"));
        assert_eq!(
            &encode_message(&reserved)[2..],
            br#"42["message","x",{"seq":6,"to":"all","kind":"connect","ts":"t"},"6"]"#
        );
    }
}
