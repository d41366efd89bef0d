//! The seam between a session and the bytes on the wire. A session speaks in protocol-neutral
//! terms: it sends messages and notices (`welcome`, `replayed`, errors, rpc results…) and receives
//! [`Command`]s; a [`Codec`] turns those into one protocol's frames and back. Messages are encoded
//! once per [`WireFormat`] in use on the gateway (see [`Message::encoded`]), never per socket; a
//! broadcast burst once per [`FrameKey`] in one buffer (see [`Burst`]).
//!
//! [`Message::encoded`]: crate::delivery::message::Message::encoded
//! [`Burst`]: crate::delivery::burst::Burst

pub(crate) mod centrifugal;
mod herald;
pub(crate) mod socketio;
pub(crate) mod sockjs;
pub(crate) mod sse;
pub(crate) mod stomp;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use herald_shared::frame::ServerFrame;
use herald_shared::subject::Audience;

use crate::close::Close;
use crate::delivery::message::Message;

pub(crate) use centrifugal::CentrifugalCodec;
pub(crate) use herald::HeraldCodec;
pub(crate) use socketio::SocketIoCodec;
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
    /// A Centrifugal publication push in a WebSocket text frame.
    Centrifugal,
    /// A Socket.IO event in an Engine.IO message, in a WebSocket text frame.
    SocketIo,
    /// A Centrifugal publication push in the protocol's Protobuf encoding, in a binary frame.
    CentrifugalProtobuf,
    /// The shared part of a STOMP MESSAGE frame in SockJS's framing (see [`sockjs`]).
    StompSockJs,
}

impl WireFormat {
    /// How many formats there are (the size of a message's encoding cache).
    pub(crate) const COUNT: usize = 7;

    /// The format's slot in a message's encoding cache.
    pub(crate) fn index(self) -> usize {
        match self {
            WireFormat::Herald => 0,
            WireFormat::Stomp => 1,
            WireFormat::Sse => 2,
            WireFormat::Centrifugal => 3,
            WireFormat::SocketIo => 4,
            WireFormat::CentrifugalProtobuf => 5,
            WireFormat::StompSockJs => 6,
        }
    }
}

/// Encodes `message` in `format` (called once per message and format).
pub(crate) fn encode_message(format: WireFormat, message: &Message) -> Bytes {
    match format {
        WireFormat::Herald => herald::encode_message(message),
        WireFormat::Stomp => stomp::encode_message(message),
        WireFormat::Sse => sse::encode_message(message),
        WireFormat::Centrifugal => centrifugal::wire::encode_message(message),
        WireFormat::SocketIo => socketio::wire::encode_message(message),
        WireFormat::CentrifugalProtobuf => centrifugal::wire::encode_message_protobuf(message),
        WireFormat::StompSockJs => stomp::encode_message_sockjs(message),
    }
}

/// What a connection's frame of a message depends on: the wire format, or for STOMP the head of
/// the subscription it goes to. Connections with the same key send the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKey<'a> {
    Format(WireFormat),
    /// A STOMP MESSAGE frame's per-subscription start (see [`stomp`]), before the shared tail.
    StompHead(stomp::MessageHead<'a>),
}

/// Appends the frame of `message` for `key` to `out` (`scratch` is space to reuse).
pub(crate) fn append_frame(key: &FrameKey<'_>, message: &Message, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    match key {
        FrameKey::Format(WireFormat::Herald) => herald::append_message(out, message, scratch),
        FrameKey::Format(format) => out.extend_from_slice(&encode_message(*format, message)),
        FrameKey::StompHead(head) => stomp::append_frame(out, head, message),
    }
}

/// The close frame of `close` in `format`'s protocol, if one can be sent.
pub(crate) fn close_frame(format: WireFormat, close: &Close) -> Option<Bytes> {
    if !close.code.is_sent() {
        return None;
    }
    match format {
        WireFormat::Herald | WireFormat::Stomp => Some(crate::websocket::frame::close(close.number(), &close.reason)),
        WireFormat::Sse => Some(SseCodec::close(close)),
        WireFormat::Centrifugal | WireFormat::CentrifugalProtobuf => Some(centrifugal::wire::close_frame(close)),
        WireFormat::SocketIo => Some(socketio::close_frame(close)),
        WireFormat::StompSockJs => Some(sockjs::close(close.number(), &close.reason)),
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
    /// Read `audience`'s messages after `since` again from the stream, up to what the session has
    /// taken: the codec dropped some for want of a subscription, and one came.
    Refill {
        audience: Audience,
        since: u64,
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
    /// How many sockets the user (or, without one, everyone) has; answered as an rpc result `id`.
    Presence {
        id: String,
        user: Option<String>,
    },
    /// A new token for the connection (same user): the connection now ends at its expiry.
    Refresh {
        token: String,
    },
}

/// A client message the codec could not turn into a command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Answer with this notice (an `error`) and keep the connection.
    Notice(Box<ServerFrame>),
    /// Close the connection.
    Close(Close),
    /// Answer with these bytes (the protocol's own error reply) and keep the connection.
    Reply(Bytes),
}

/// One connection's protocol.
#[derive(Debug)]
pub(crate) enum Codec {
    Herald(HeraldCodec),
    Stomp(Box<StompCodec>),
    Sse(SseCodec),
    Centrifugal(Box<CentrifugalCodec>),
    SocketIo(Box<SocketIoCodec>),
}

impl Codec {
    /// Whether a refreshed token that leaves out a topic the connection has is refused. Centrifugal
    /// takes it, as Centrifugo's connection refresh leaves subscriptions alone (centrifuge-js ends
    /// the connection for good on a refused refresh); the topic ends with the connection.
    pub(crate) fn refuses_narrower_refresh(&self) -> bool {
        !matches!(self, Codec::Centrifugal(_))
    }

    /// Whether the connection's topics are kept for its client to recover them (Socket.IO's
    /// connection state recovery; see [`crate::cluster::recovery`]).
    pub(crate) fn remembers_topics(&self) -> bool {
        matches!(self, Codec::SocketIo(_))
    }

    /// The wire format messages take on this connection.
    pub(crate) fn format(&self) -> WireFormat {
        match self {
            Codec::Herald(_) => WireFormat::Herald,
            Codec::Stomp(codec) => codec.format(),
            Codec::Sse(_) => WireFormat::Sse,
            Codec::Centrifugal(codec) => codec.format(),
            Codec::SocketIo(_) => WireFormat::SocketIo,
        }
    }

    /// Whether messages wait for the client's first subscription (STOMP's before any SUBSCRIBE).
    pub(crate) fn awaits_first_subscription(&self) -> bool {
        matches!(self, Codec::Stomp(codec) if codec.has_no_subscription())
    }

    /// Whether the protocol can tell a resuming client that something after its resume point may
    /// be missing (`replayed.complete`, Centrifugal's and Socket.IO's `recovered`). STOMP cannot.
    pub(crate) fn reports_incomplete_resumes(&self) -> bool {
        !matches!(self, Codec::Stomp(_))
    }

    /// Queues the frame(s) of `message` for this connection in `frames` (the bytes shared with every
    /// connection of the format, after a small head of this connection's own for STOMP; none when
    /// Centrifugal holds it back to send it inside a reply); returns the bytes queued.
    pub(crate) fn queue_message(&mut self, message: &Message, frames: &mut VecDeque<Bytes>) -> usize {
        let format = self.format();
        match self {
            Codec::Herald(_) | Codec::SocketIo(_) => {
                let encoded = message.encoded(format);
                frames.push_back(encoded.clone());
                encoded.len()
            }
            Codec::Centrifugal(codec) => match codec.message(message) {
                Some(frame) => {
                    let len = frame.len();
                    frames.push_back(frame);
                    len
                }
                None => 0,
            },
            // Its tail depends on the connection's STOMP version too.
            Codec::Stomp(codec) => codec.queue_message(message, frames),
            Codec::Sse(codec) => {
                codec.note_sent(message.seq);
                let encoded = message.encoded(format);
                frames.push_back(encoded.clone());
                encoded.len()
            }
        }
    }

    /// Whether `message` goes out as more than one frame (a STOMP topic subscribed twice): then
    /// [`Codec::queue_message`] queues it, not a shared frame.
    pub(crate) fn sends_copies(&self, message: &Message) -> bool {
        matches!(self, Codec::Stomp(codec) if codec.sends_copies(message))
    }

    /// Takes `message` for this connection like [`Codec::queue_message`], but queues nothing: the
    /// key of the frame it goes out as, which connections with the same key share; none when the
    /// codec holds the message back.
    pub(crate) fn shared_key(&mut self, message: &Message) -> Option<FrameKey<'_>> {
        match self {
            Codec::Herald(_) => Some(FrameKey::Format(WireFormat::Herald)),
            Codec::SocketIo(_) => Some(FrameKey::Format(WireFormat::SocketIo)),
            Codec::Sse(codec) => {
                codec.note_sent(message.seq);
                Some(FrameKey::Format(WireFormat::Sse))
            }
            Codec::Centrifugal(codec) => codec.takes(message).then(|| FrameKey::Format(codec.format())),
            Codec::Stomp(codec) => codec.shared_head(message).map(FrameKey::StompHead),
        }
    }

    /// The key the messages of `last`'s audience up to `last` all go out as when the codec takes
    /// them all alike now (none held back), as [`Codec::shared_key`] would give each; none when it
    /// may hold some back (take them one by one then). Notes nothing: [`Codec::note_run_sent`]
    /// does, once they are taken.
    pub(crate) fn run_key(&self, last: &Message) -> Option<FrameKey<'_>> {
        match self {
            Codec::Herald(_) => Some(FrameKey::Format(WireFormat::Herald)),
            Codec::SocketIo(_) => Some(FrameKey::Format(WireFormat::SocketIo)),
            Codec::Sse(_) => Some(FrameKey::Format(WireFormat::Sse)),
            Codec::Centrifugal(codec) => codec.takes_run(last).then(|| FrameKey::Format(codec.format())),
            Codec::Stomp(codec) => codec.head_of_run(last).map(FrameKey::StompHead),
        }
    }

    /// Notes the messages [`Codec::run_key`] gave a key for, up to `last`, as sent.
    pub(crate) fn note_run_sent(&mut self, last: &Message) {
        match self {
            Codec::Herald(_) | Codec::SocketIo(_) => {}
            Codec::Sse(codec) => codec.note_sent(last.seq),
            Codec::Centrifugal(codec) => codec.note_taken(last),
            Codec::Stomp(codec) => codec.note_run_sent(last),
        }
    }

    /// Client commands the codec was handed before the session ran (Centrifugal's sent with its
    /// `connect`), once.
    pub(crate) fn take_first_input(&mut self) -> Option<Vec<u8>> {
        match self {
            Codec::Centrifugal(codec) => codec.take_first_input(),
            _ => None,
        }
    }

    /// Topics the session is to leave of the codec's accord (a Centrifugal subscribe refused with
    /// error 112 after the session had subscribed).
    pub(crate) fn take_topics_to_leave(&mut self) -> Vec<String> {
        match self {
            Codec::Centrifugal(codec) => codec.take_to_leave(),
            _ => Vec::new(),
        }
    }

    /// Frames the codec sends of its own accord after a client message (receipts and the like).
    pub(crate) fn take_replies(&mut self) -> Vec<Bytes> {
        match self {
            Codec::Stomp(codec) => codec.take_replies(),
            _ => Vec::new(),
        }
    }

    /// Why the connection must close, when a notice ended it (a STOMP ERROR).
    pub(crate) fn take_closing(&mut self) -> Option<Close> {
        match self {
            Codec::Stomp(codec) => codec.take_closing(),
            _ => None,
        }
    }

    /// A new device's replay read everything up to `upto`: what it did not send up to there
    /// (`push.all` and topic messages from before the device's first connection) is not owed to the
    /// device, so receiving what was queued moves the cursor that far (STOMP `ack:auto`, SSE).
    pub(crate) fn new_device_caught_up(&mut self, upto: u64) {
        match self {
            Codec::Stomp(codec) => codec.new_device_caught_up(upto),
            Codec::Sse(codec) => codec.note_sent(upto),
            _ => {}
        }
    }

    /// The highest `seq` the client acknowledged by receiving it (STOMP `ack:auto`, SSE), once all
    /// that was queued is written, `bound` at most; if further than before.
    pub(crate) fn take_auto_ack(&mut self, bound: u64) -> Option<u64> {
        match self {
            Codec::Stomp(codec) => codec.take_auto_ack(bound),
            Codec::Sse(codec) => codec.take_sent().map(|sent| sent.min(bound)),
            _ => None,
        }
    }

    /// The frame the codec answered a resume with (its `replayed` notice's) was dropped unsent,
    /// with the rest of the queue, by a close.
    pub(crate) fn answer_dropped(&mut self) {
        if let Codec::SocketIo(codec) = self {
            codec.answer_dropped();
        }
    }

    /// A refill of `audience` ([`Command::Refill`]) starts reading the stream.
    pub(crate) fn refill_started(&mut self, audience: &Audience) {
        if let Codec::Stomp(codec) = self {
            codec.refill_started(audience);
        }
    }

    /// How often to ping, given the gateway's heartbeat (a protocol may negotiate a longer one).
    pub(crate) fn heartbeat(&self, gateway: Duration) -> Duration {
        match self {
            Codec::Stomp(codec) => codec.heartbeat(gateway),
            _ => gateway,
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
            Codec::Centrifugal(codec) => codec.notice(notice),
            Codec::SocketIo(codec) => codec.notice(notice),
        }
    }

    /// A keepalive the server sends.
    pub(crate) fn ping(&self) -> Bytes {
        match self {
            Codec::Herald(_) => crate::websocket::frame::ping(),
            Codec::Stomp(codec) => codec.ping(),
            Codec::Sse(codec) => codec.ping(),
            // The protocol's own ping, which the client answers with `{}`.
            Codec::Centrifugal(codec) => codec.ping(),
            // Engine.IO's ping, answered with `3`.
            Codec::SocketIo(_) => socketio::wire::engine_packet(socketio::wire::engine::PING),
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
            Codec::Centrifugal(_) => close_frame(self.format(), close),
            Codec::SocketIo(codec) => Some(codec.close(close)),
        }
    }

    /// The last bytes of a connection in `format` whose session never opened (no codec is left).
    pub(crate) fn close_unopened(format: WireFormat, close: &Close) -> Option<Bytes> {
        match format {
            WireFormat::Sse => close.code.is_sent().then(|| SseCodec::close(close)),
            WireFormat::Stomp if close.code.is_sent() => {
                Some(stomp::close_unopened(stomp::Transport::WebSocket, close))
            }
            WireFormat::StompSockJs if close.code.is_sent() => {
                Some(stomp::close_unopened(stomp::Transport::SockJs, close))
            }
            _ => close_frame(format, close),
        }
    }

    /// Reads one text (or binary) message from the client: the commands it holds (a Centrifugal
    /// frame may hold several, or none).
    pub(crate) fn decode(&mut self, text: &[u8]) -> Vec<Result<Command, Refusal>> {
        match self {
            Codec::Herald(codec) => vec![codec.decode(text)],
            Codec::Stomp(codec) => codec.decode_message(text),
            Codec::Sse(codec) => vec![codec.decode()],
            Codec::Centrifugal(codec) => codec.decode(text),
            Codec::SocketIo(codec) => codec.decode(text),
        }
    }

    /// The answer to a `Refresh`: the new expiry, or an error code and message.
    pub(crate) fn refreshed(&mut self, outcome: Result<u64, (u32, String)>) -> Option<Bytes> {
        match self {
            Codec::Centrifugal(codec) => codec.refreshed(outcome),
            Codec::Herald(codec) => Some(codec.notice(&herald::refreshed(outcome))),
            _ => None,
        }
    }
}
