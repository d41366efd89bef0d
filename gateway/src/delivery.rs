//! A stored message (live from the stream's republish, or read back for a replay) becomes one
//! complete WebSocket frame, built once and shared by every socket it goes to.

use async_nats::HeaderMap;
use bytes::Bytes;
use herald_shared::frame::{MsgMeta, write_msg};
use herald_shared::subject::{Audience, header};

use crate::replay::Stored;
use crate::wire::FrameBuf;

/// One message ready for sockets.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// Stream sequence.
    pub(crate) seq: u64,
    /// The previous sequence on the same subject, when the stream said (live messages only).
    pub(crate) previous_on_subject: Option<u64>,
    /// The publisher's `Herald-Type`, or empty.
    pub(crate) kind: String,
    /// The `msg` frame, header included.
    pub(crate) frame: Bytes,
}

/// The stream sequence a republished message carries (0 when it carries none).
pub(crate) fn live_seq(message: &async_nats::Message) -> u64 {
    message.headers.as_ref().and_then(|h| header_u64(h, header::NATS_SEQUENCE)).unwrap_or(0)
}

/// Encodes a message the stream republished to a `herald.deliver.…` subject.
pub(crate) fn from_live(message: &async_nats::Message, audience: &Audience) -> Option<Delivery> {
    let headers = message.headers.as_ref()?;
    let seq = header_u64(headers, header::NATS_SEQUENCE)?;
    let ts = header_str(headers, header::NATS_TIME_STAMP);
    let mut delivery = encode(audience, seq, ts, headers, &message.payload);
    delivery.previous_on_subject = header_u64(headers, header::NATS_LAST_SEQUENCE);
    Some(delivery)
}

/// Encodes a message read back from the stream.
pub(crate) fn from_stored(stored: &Stored) -> Delivery {
    encode(&stored.audience, stored.seq, &stored.ts, &stored.headers, &stored.payload)
}

fn encode(audience: &Audience, seq: u64, ts: &str, headers: &HeaderMap, payload: &[u8]) -> Delivery {
    let kind = header_str(headers, header::HERALD_TYPE);
    let to = audience.frame_to();
    let meta = MsgMeta { seq, to: &to, id: header_str(headers, header::NATS_MSG_ID), kind, ts };
    let mut frame = FrameBuf::with_capacity(payload.len() + 160);
    write_msg(frame.body(), &meta, payload);
    Delivery { seq, previous_on_subject: None, kind: kind.to_string(), frame: frame.finish_text() }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map(|value| value.as_str()).unwrap_or("")
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::frame::ServerFrame;

    #[test]
    fn a_republished_message_becomes_one_msg_frame() {
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_SEQUENCE, "125");
        headers.insert(header::NATS_LAST_SEQUENCE, "120");
        headers.insert(header::NATS_TIME_STAMP, "2026-11-22T10:00:00.123456789Z");
        headers.insert(header::NATS_MSG_ID, "order-7");
        headers.insert(header::HERALD_TYPE, "mail");
        let message = async_nats::Message {
            subject: "herald.deliver.user.42".into(),
            reply: None,
            payload: Bytes::from_static(br#"{"text":"hi"}"#),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let delivery = from_live(&message, &Audience::User("42".into())).unwrap();
        assert_eq!((delivery.seq, delivery.previous_on_subject, delivery.kind.as_str()), (125, Some(120), "mail"));
        assert_eq!(delivery.frame[0], 0x81);
        let json: ServerFrame = serde_json::from_slice(&delivery.frame[2..]).unwrap();
        let ServerFrame::Msg(msg) = json else { panic!("not a msg: {json:?}") };
        assert_eq!(msg.seq, 125);
        assert_eq!(msg.to, "user");
        assert_eq!(msg.id, "order-7");
        assert_eq!(msg.ts, "2026-11-22T10:00:00.123456789Z");
        assert_eq!(msg.data, serde_json::json!({"text":"hi"}));
    }
}
