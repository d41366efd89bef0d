//! Herald's own protocol: one JSON object per WebSocket text frame (docs/protocol.md, "Frames").

use bytes::Bytes;
use herald_shared::frame::{ClientFrame, MsgMeta, ServerFrame, error_code, write_msg};

use super::{Command, Refusal};
use crate::close::{Close, CloseCode};
use crate::delivery::message::Message;
use crate::websocket::frame::{self, FrameBuf};

/// Herald JSON has no per-connection state: every socket gets the same bytes.
#[derive(Debug, Default)]
pub(crate) struct HeraldCodec;

/// The `msg` frame of `message`, WebSocket header included.
pub(super) fn encode_message(message: &Message) -> Bytes {
    let to = message.audience.frame_to();
    let mut frame = FrameBuf::with_capacity(message.payload.len() + 96 + to.len() + message.ts.len());
    write_msg(frame.body(), &meta(message, &to), &message.payload);
    frame.finish_text()
}

/// Appends the `msg` frame of `message` to `out`; `json` is scratch space.
pub(super) fn append_message(out: &mut Vec<u8>, message: &Message, json: &mut Vec<u8>) {
    let to = message.audience.frame_to();
    json.clear();
    write_msg(json, &meta(message, &to), &message.payload);
    frame::append_text(out, json);
}

fn meta<'a>(message: &'a Message, to: &'a str) -> MsgMeta<'a> {
    MsgMeta { seq: message.seq, to, id: &message.id, kind: &message.kind, ts: &message.ts }
}

impl HeraldCodec {
    pub(super) fn notice(&self, notice: &ServerFrame) -> Bytes {
        frame::text(notice.to_json().as_bytes())
    }

    /// A client frame; refusals as docs/protocol.md's "Bad frames" says.
    pub(super) fn decode(&self, text: &[u8]) -> Result<Command, Refusal> {
        match serde_json::from_slice::<ClientFrame>(text) {
            Ok(frame) => Ok(command(frame)),
            Err(error) => Err(refusal(text, error)),
        }
    }
}

fn command(frame: ClientFrame) -> Command {
    match frame {
        ClientFrame::Ack { seq } => Command::Ack(seq),
        ClientFrame::Read { seq } => Command::Read(seq),
        ClientFrame::Sub { topic, since } => Command::Subscribe { topic, since },
        ClientFrame::Unsub { topic } => Command::Unsubscribe { topic },
        ClientFrame::Rpc { id, function, data } => Command::Rpc { id, function, data },
        ClientFrame::Ping => Command::Ping,
        ClientFrame::Refresh { token } => Command::Refresh { token },
    }
}

/// The answer to a `refresh`: `refreshed` with the new expiry and the seconds left until it by
/// the gateway's clock (a client's may be off), or an `error` (the connection goes on, and ends
/// at the expiry it had).
pub(super) fn refreshed(outcome: Result<u64, (u32, String)>) -> ServerFrame {
    use crate::codec::centrifugal::wire::error;
    match outcome {
        Ok(exp) => ServerFrame::Refreshed { exp, ttl: exp.saturating_sub(herald_shared::token::now_secs()) },
        Err((error::PERMISSION_DENIED, message)) => ServerFrame::error(error_code::FORBIDDEN, message),
        Err((_, message)) => ServerFrame::error(error_code::UNAUTHORIZED, message),
    }
}

/// A text message that is not a valid client frame: an `error` frame when it is a JSON object with a
/// `type` (so newer clients survive older gateways), a 1008 close when it cannot be parsed at all.
fn refusal(text: &[u8], error: serde_json::Error) -> Refusal {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: String,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(text) else {
        return Refusal::Close(Close::new(CloseCode::Policy, "not a JSON frame with a type"));
    };
    const KNOWN: [&str; 7] = ["ack", "read", "sub", "unsub", "rpc", "ping", "refresh"];
    if KNOWN.contains(&probe.kind.as_str()) {
        let message = format!("bad {} frame: {error}", probe.kind);
        Refusal::Notice(Box::new(ServerFrame::error(error_code::BAD_REQUEST, message)))
    } else {
        let message = format!("unknown frame type {:?}", probe.kind);
        Refusal::Notice(Box::new(ServerFrame::error(error_code::UNKNOWN_TYPE, message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::subject::Audience;

    #[test]
    fn a_message_becomes_one_text_frame() {
        let message = Message::new(9, Audience::Topic("news".into()), "mail", "", "t", Bytes::from_static(b"{}"));
        let frame = encode_message(&message);
        assert_eq!(frame[0], 0x81);
        assert_eq!(&frame[2..], br#"{"type":"msg","seq":9,"to":"topic:news","kind":"mail","ts":"t","data":{}}"#);
    }

    #[test]
    fn client_frames_become_commands_or_refusals() {
        let codec = HeraldCodec;
        assert_eq!(codec.decode(br#"{"type":"ack","seq":3}"#), Ok(Command::Ack(3)));
        assert_eq!(
            codec.decode(br#"{"type":"sub","topic":"news","since":2}"#),
            Ok(Command::Subscribe { topic: "news".into(), since: Some(2) })
        );
        let code = |text: &[u8]| match codec.decode(text) {
            Err(Refusal::Notice(notice)) => match *notice {
                ServerFrame::Error { code, .. } => code,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(code(br#"{"type":"ack"}"#), error_code::BAD_REQUEST);
        assert_eq!(code(br#"{"type":"dance"}"#), error_code::UNKNOWN_TYPE);
        assert!(matches!(codec.decode(b"[1]"), Err(Refusal::Close(close)) if close.code == CloseCode::Policy));
    }
}
