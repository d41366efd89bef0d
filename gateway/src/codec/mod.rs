//! The seam between a session and the bytes on the wire. A session speaks in protocol-neutral
//! terms: it sends messages and notices (`welcome`, `replayed`, errors, rpc results…) and receives
//! [`Command`]s; a [`Codec`] turns those into one protocol's frames and back. Messages are encoded
//! once per [`WireFormat`] in use on the gateway (see [`Message::encoded`]), never per socket.
//!
//! [`Message::encoded`]: crate::delivery::message::Message::encoded

mod herald;
pub(crate) mod sse;
pub(crate) mod stomp;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use herald_shared::frame::ServerFrame;

use crate::close::Close;
use crate::delivery::message::Message;

pub(crate) use herald::HeraldCodec;
pub(crate) use sse::SseCodec;
pub(crate) use stomp::StompCodec;

/// The encodings a message can have; each is computed at most once per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireFormat {
    /// Herald's JSON `msg` frame in a WebSocket text frame.
    Herald,
    /// The shared part of a STOMP MESSAGE frame (see [`stomp`]).
    Stomp,
    /// A Server-Sent Events event.
    Sse,
}

impl WireFormat {
    /// How many formats there are (the size of a message's encoding cache).
    pub(crate) const COUNT: usize = 3;

    /// The format's slot in a message's encoding cache.
    pub(crate) fn index(self) -> usize {
        match self {
            WireFormat::Herald => 0,
            WireFormat::Stomp => 1,
            WireFormat::Sse => 2,
        }
    }
}

/// Encodes `message` in `format` (called once per message and format).
pub(crate) fn encode_message(format: WireFormat, message: &Message) -> Bytes {
    match format {
        WireFormat::Herald => herald::encode_message(message),
        WireFormat::Stomp => stomp::encode_message(message),
        WireFormat::Sse => sse::encode_message(message),
    }
}

/// Encodes the messages of a burst for one broadcast log in one buffer, in Herald's format (the
/// format of most sockets): each message's frame is a slice of it, and a session that sends several
/// of them in a row sends one slice (one reference count, one entry of a vectored write).
pub(crate) fn encode_burst(messages: &[&Message]) {
    let mut chunk = Vec::with_capacity(messages.iter().map(|m| m.payload.len() + 128).sum());
    let mut json = Vec::new();
    let mut ends = Vec::with_capacity(messages.len());
    for message in messages {
        herald::append_message(&mut chunk, message, &mut json);
        ends.push(chunk.len());
    }
    let chunk = Bytes::from(chunk);
    let mut start = 0;
    for (message, end) in messages.iter().zip(ends) {
        message.set_burst(WireFormat::Herald, chunk.clone(), start..end);
        start = end;
    }
}

/// What a client asks of its session, whatever protocol it speaks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// Move the device cursor forward to `seq`.
    Ack(u64),
    /// The user read everything personal up to `seq` (implies `Ack`).
    Read(u64),
    Subscribe {
        topic: String,
        since: Option<u64>,
    },
    Unsubscribe {
        topic: String,
    },
    /// Call push function `function`; the answer carries `id`.
    Rpc {
        id: String,
        function: String,
        data: serde_json::Value,
    },
    /// An application-level ping, answered with a pong notice.
    Ping,
    /// Nothing for the session (a heart-beat, or a frame the codec answered itself).
    Nothing,
    /// The client ends the connection.
    Close,
}

/// A client message the codec could not turn into a command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Answer with this notice (an `error`) and keep the connection.
    Notice(Box<ServerFrame>),
    /// Close the connection.
    Close(Close),
}

/// One connection's protocol.
#[derive(Debug)]
pub(crate) enum Codec {
    Herald(HeraldCodec),
    Stomp(Box<StompCodec>),
    Sse(SseCodec),
}

impl Codec {
    /// The wire format messages take on this connection.
    pub(crate) fn format(&self) -> WireFormat {
        match self {
            Codec::Herald(_) => WireFormat::Herald,
            Codec::Stomp(_) => WireFormat::Stomp,
            Codec::Sse(_) => WireFormat::Sse,
        }
    }

    /// Queues the frame(s) of `message` for this connection in `frames` (the bytes shared with every
    /// connection of the format, after a small head of this connection's own for STOMP); returns
    /// the bytes queued.
    pub(crate) fn queue_message(&mut self, message: &Message, frames: &mut VecDeque<Bytes>) -> usize {
        let encoded = message.encoded(self.format());
        match self {
            Codec::Herald(_) => {
                frames.push_back(encoded.clone());
                encoded.len()
            }
            Codec::Stomp(codec) => codec.queue_message(message, encoded, frames),
            Codec::Sse(codec) => {
                codec.note_sent(message.seq);
                frames.push_back(encoded.clone());
                encoded.len()
            }
        }
    }

    /// Frames the codec sends of its own accord after a client message (receipts and the like).
    pub(crate) fn take_replies(&mut self) -> Vec<Bytes> {
        match self {
            Codec::Herald(_) | Codec::Sse(_) => Vec::new(),
            Codec::Stomp(codec) => codec.take_replies(),
        }
    }

    /// Why the connection must close, when a notice ended it (a STOMP ERROR).
    pub(crate) fn take_closing(&mut self) -> Option<Close> {
        match self {
            Codec::Herald(_) | Codec::Sse(_) => None,
            Codec::Stomp(codec) => codec.take_closing(),
        }
    }

    /// The highest `seq` the client acknowledged by receiving it (STOMP `ack:auto`, SSE), once all
    /// that was queued is written.
    pub(crate) fn take_auto_ack(&mut self) -> Option<u64> {
        match self {
            Codec::Herald(_) => None,
            Codec::Stomp(codec) => codec.take_auto_ack(),
            Codec::Sse(codec) => codec.take_sent(),
        }
    }

    /// How often to ping, given the gateway's heartbeat (a protocol may negotiate a longer one).
    pub(crate) fn heartbeat(&self, gateway: Duration) -> Duration {
        match self {
            Codec::Herald(_) | Codec::Sse(_) => gateway,
            Codec::Stomp(codec) => codec.heartbeat(gateway),
        }
    }

    /// How long the client may stay silent past a heartbeat, given the gateway's timeout. An SSE
    /// client never speaks: only a failed write tells that it left.
    pub(crate) fn silence(&self, gateway: Duration) -> Duration {
        match self {
            Codec::Sse(_) => Duration::from_secs(365 * 24 * 3600),
            _ => gateway,
        }
    }

    /// The bytes of a notice (`welcome`, `replayed`, an `error`…), if the protocol has one.
    pub(crate) fn notice(&mut self, notice: &ServerFrame) -> Option<Bytes> {
        match self {
            Codec::Herald(codec) => Some(codec.notice(notice)),
            Codec::Stomp(codec) => codec.notice(notice),
            Codec::Sse(codec) => codec.notice(notice),
        }
    }

    /// A keepalive the server sends.
    pub(crate) fn ping(&self) -> Bytes {
        match self {
            Codec::Herald(_) => crate::websocket::frame::ping(),
            Codec::Stomp(codec) => codec.ping(),
            Codec::Sse(codec) => codec.ping(),
        }
    }

    /// The answer to a WebSocket ping carrying `payload`.
    pub(crate) fn pong(&self, payload: &[u8]) -> Bytes {
        crate::websocket::frame::pong(payload)
    }

    /// The last bytes before the connection ends, if any can be sent.
    pub(crate) fn close(&self, close: &Close) -> Option<Bytes> {
        if !close.code.is_sent() {
            return None;
        }
        match self {
            Codec::Herald(_) => Some(crate::websocket::frame::close(close.number(), &close.reason)),
            Codec::Stomp(codec) => Some(codec.close(close)),
            Codec::Sse(_) => Some(SseCodec::close(close)),
        }
    }

    /// The last bytes of a connection in `format` whose session never opened (no codec is left).
    pub(crate) fn close_unopened(format: WireFormat, close: &Close) -> Option<Bytes> {
        match format {
            WireFormat::Sse => close.code.is_sent().then(|| SseCodec::close(close)),
            WireFormat::Herald | WireFormat::Stomp => Codec::Herald(HeraldCodec).close(close),
        }
    }

    /// Reads one text message from the client.
    pub(crate) fn decode(&mut self, text: &[u8]) -> Result<Command, Refusal> {
        match self {
            Codec::Herald(codec) => codec.decode(text),
            Codec::Stomp(codec) => codec.decode(text),
            Codec::Sse(codec) => codec.decode(),
        }
    }
}
