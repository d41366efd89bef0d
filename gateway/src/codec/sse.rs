//! Server-Sent Events (docs/protocols.md, "Server-Sent Events"): a one-way stream, so no client
//! frames. A message is `id: <seq>`, `event: <kind>` (`message` without one) and its payload in
//! `data:` lines; the browser sends the last `id` back as `Last-Event-ID` when it reconnects, which
//! resumes exactly. Messages carry no per-connection part: every SSE stream shares the same bytes.

use bytes::Bytes;
use herald_shared::frame::ServerFrame;

use super::{Command, Refusal};
use crate::close::{Close, CloseCode};
use crate::delivery::message::Message;

/// How long a browser waits before reconnecting a stream that ended (the `retry:` field), in ms.
pub(crate) const RETRY_MS: u64 = 1000;

/// One SSE stream: what it sent, to move the device cursor once written (an SSE client cannot
/// acknowledge; what reached its socket counts as received, and `Last-Event-ID` says exactly).
#[derive(Debug, Default)]
pub(crate) struct SseCodec {
    sent: Option<u64>,
}

/// Event names a message's kind cannot take: the stream's own events, and those EventSource
/// fires itself (a message of kind `close` would run a page's close handler). Such a message is a
/// `message` event.
const RESERVED: [&str; 5] = ["welcome", "replayed", "close", "error", "open"];

/// The event of `message`.
pub(super) fn encode_message(message: &Message) -> Bytes {
    let mut out = Vec::with_capacity(message.payload.len() + 48 + message.kind.len());
    out.extend_from_slice(format!("id: {}\n", message.seq).as_bytes());
    let kind = if message.kind.is_empty() || RESERVED.contains(&&*message.kind) { "message" } else { &message.kind };
    push_field(&mut out, "event", kind.as_bytes());
    push_data(&mut out, &message.payload);
    out.push(b'\n');
    Bytes::from(out)
}

/// `data:` lines for `payload`: one per line, at any of the spec's line ends (CRLF, LF, CR).
fn push_data(out: &mut Vec<u8>, payload: &[u8]) {
    let mut rest = payload;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(rest.len());
        push_field(out, "data", &rest[..end]);
        if end == rest.len() {
            return;
        }
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
        rest = &rest[end + skip..];
    }
}

/// `name: value\n` (the value must hold no line end).
fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A named event with a JSON `data` line.
fn event(name: &str, json: &str) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 24);
    push_field(&mut out, "event", name.as_bytes());
    push_data(&mut out, json.as_bytes());
    out.push(b'\n');
    Bytes::from(out)
}

impl SseCodec {
    pub(super) fn note_sent(&mut self, seq: u64) {
        self.sent = Some(self.sent.unwrap_or(0).max(seq));
    }

    pub(super) fn take_sent(&mut self) -> Option<u64> {
        self.sent.take()
    }

    /// `welcome` (with `retry:`) and `replayed` as events; the others have no use on a one-way
    /// stream.
    pub(super) fn notice(&self, notice: &ServerFrame) -> Option<Bytes> {
        match notice {
            ServerFrame::Welcome { .. } => {
                let mut out = format!("retry: {RETRY_MS}\n").into_bytes();
                out.extend_from_slice(&event("welcome", &notice.to_json()));
                Some(Bytes::from(out))
            }
            ServerFrame::Replayed { .. } => Some(event("replayed", &notice.to_json())),
            _ => None,
        }
    }

    /// A comment: keeps proxies from timing the stream out and finds a browser that left.
    pub(super) fn ping(&self) -> Bytes {
        Bytes::from_static(b": ping\n\n")
    }

    /// A `close` event saying why the stream ends (the browser reconnects unless told otherwise).
    pub(super) fn close(close: &Close) -> Bytes {
        close_event(close)
    }

    pub(super) fn decode(&self) -> Result<Command, Refusal> {
        Err(Refusal::Close(Close::new(CloseCode::Policy, "an SSE stream takes no client messages")))
    }
}

/// The `close` event of `close`.
pub(crate) fn close_event(close: &Close) -> Bytes {
    let json = serde_json::json!({"code": close.number(), "reason": close.reason}).to_string();
    event("close", &json)
}

#[cfg(test)]
mod tests {
    use herald_shared::subject::Audience;

    use super::*;

    #[test]
    fn a_message_is_one_event_with_a_data_line_per_payload_line() {
        let payload = Bytes::from_static(b"{\n  \"a\": 1,\r\n  \"b\": 2\r}");
        let message = Message::new(12, Audience::All, "", "", "t", payload);
        assert_eq!(
            &encode_message(&message)[..],
            b"id: 12\nevent: message\ndata: {\ndata:   \"a\": 1,\ndata:   \"b\": 2\ndata: }\n\n"
        );
        let message = Message::new(13, Audience::All, "mail", "", "t", Bytes::from_static(b"{}"));
        assert_eq!(&encode_message(&message)[..], b"id: 13\nevent: mail\ndata: {}\n\n");
        for reserved in RESERVED {
            let message = Message::new(14, Audience::All, reserved, "", "", Bytes::from_static(b"{}"));
            assert_eq!(&encode_message(&message)[..], b"id: 14\nevent: message\ndata: {}\n\n", "{reserved}");
        }
        let replayed = ServerFrame::Replayed { from: 1, to: 2, count: 2, complete: true, topic: None };
        let bytes = SseCodec::default().notice(&replayed).unwrap();
        assert!(bytes.starts_with(b"event: replayed\ndata: {\"type\":\"replayed\""));
    }
}
