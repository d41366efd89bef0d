//! A stored message (live from the stream's republish, or read back for a replay) becomes one
//! complete WebSocket frame, built once and shared by every socket it goes to.

use bytes::Bytes;
use herald_shared::frame::{MsgMeta, write_msg};
use herald_shared::subject::{Audience, header};

use crate::delivery::feed::Delivered;
use crate::session::replay::Stored;
use crate::websocket::frame::FrameBuf;

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

/// Encodes a message the stream republished to a `herald.deliver.…` subject.
pub(crate) fn from_live(message: &Delivered, audience: &Audience) -> Option<Delivery> {
    let number = |name: &str| message.header(name)?.parse::<u64>().ok();
    let seq = number(header::NATS_SEQUENCE)?;
    let text = |name: &str| message.header(name).unwrap_or("");
    let meta =
        Meta { seq, ts: text(header::NATS_TIME_STAMP), id: text(header::NATS_MSG_ID), kind: text(header::HERALD_TYPE) };
    let mut delivery = encode(audience, &meta, &message.payload);
    delivery.previous_on_subject = number(header::NATS_LAST_SEQUENCE);
    Some(delivery)
}

/// Encodes a message read back from the stream.
pub(crate) fn from_stored(stored: &Stored) -> Delivery {
    let text = |name: &str| stored.headers.get(name).map(|value| value.as_str()).unwrap_or("");
    let meta = Meta { seq: stored.seq, ts: &stored.ts, id: text(header::NATS_MSG_ID), kind: text(header::HERALD_TYPE) };
    encode(&stored.audience, &meta, &stored.payload)
}

/// What a `msg` frame says about its message besides the payload.
struct Meta<'a> {
    seq: u64,
    ts: &'a str,
    id: &'a str,
    kind: &'a str,
}

fn encode(audience: &Audience, meta: &Meta<'_>, payload: &[u8]) -> Delivery {
    let to = audience.frame_to();
    let frame_meta = MsgMeta { seq: meta.seq, to: &to, id: meta.id, kind: meta.kind, ts: meta.ts };
    let mut frame = FrameBuf::with_capacity(payload.len() + 160);
    write_msg(frame.body(), &frame_meta, payload);
    Delivery { seq: meta.seq, previous_on_subject: None, kind: meta.kind.to_string(), frame: frame.finish_text() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::frame::ServerFrame;

    #[test]
    fn a_republished_message_becomes_one_msg_frame() {
        let headers = "NATS/1.0\r\nNats-Sequence: 125\r\nNats-Last-Sequence: 120\r\n\
                       Nats-Time-Stamp: 2026-11-22T10:00:00.123456789Z\r\nNats-Msg-Id: order-7\r\n\
                       Herald-Type: mail\r\n\r\n";
        let message = Delivered {
            sid: 2,
            subject: Bytes::from_static(b"herald.deliver.user.42"),
            headers: Bytes::from(headers),
            payload: Bytes::from_static(br#"{"text":"hi"}"#),
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
