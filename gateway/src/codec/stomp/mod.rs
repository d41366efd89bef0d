//! STOMP 1.2 (and 1.1, 1.0) over WebSocket (docs/protocols.md, "STOMP"): one STOMP frame per
//! WebSocket text message from the gateway; the client's messages are read as a stream of frames
//! (several in one, or one in several), and over SockJS inside its framing ([`Transport`]).
//!
//! Encoding once per message: a MESSAGE frame carries two per-socket headers, `subscription` and
//! `destination`, so its shared encoding ([`encode_message`], cached per message like Herald's
//! frame) is everything after them: `message-id`, `content-type`, … and the body. Each socket
//! queues a small head of its own (the WebSocket header, `MESSAGE`, its two headers) followed by
//! the shared tail: two slices of the same vectored write, and the body is never copied per socket.
//! Broadcast messages do better: connections whose subscriptions have the same head (stomp.js
//! numbers them `sub-0`, `sub-1`… on every page) share whole frames, a burst of them in one buffer
//! (see [`Burst`]).
//!
//! [`Burst`]: crate::delivery::burst::Burst
//!
//! Where messages go: a user's own messages to the connection's first `/user/queue/…`
//! subscription, `push.all` to `/topic/all`, a topic to `/topic/<t>`. The session delivers from its
//! first moment (a resume replays before the client's SUBSCRIBE frames arrive), so messages with no
//! subscription yet wait here, in order and bounded, until one comes.

mod acks;
mod commands;
mod frame;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use herald_shared::frame::{RpcResult, ServerFrame};
use herald_shared::subject::Audience;

use super::{WireFormat, sockjs};
use crate::close::{Close, CloseCode};
use crate::delivery::message::Message;
use crate::websocket::frame as ws;

pub(crate) use frame::{Frame, Version, parse};

/// Messages held for a destination no subscription covers yet; past this the oldest are dropped
/// (and read again from the stream when a subscription comes, see [`StompCodec::refill`]).
const MAX_HELD: usize = 1024;
/// The start of the `message-id` of a function's reply (then its number), which is no stream seq.
const RPC_MESSAGE_ID: &str = "rpc-";
/// Bytes reserved at once for MESSAGE heads (about ten): fewer allocations per message, and little
/// kept by a connection between messages.
const HEAD_ROOM: usize = 512;

/// What a connection negotiated in CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    pub(crate) version: Version,
    /// The client's `heart-beat`: how often it can send, how often it wants to hear from us.
    pub(crate) client_sends: Duration,
    pub(crate) client_wants: Duration,
    /// The token's `topics` claim.
    pub(crate) allowed_topics: Vec<String>,
}

/// What carries a connection's STOMP frames: WebSocket messages, one frame each, or SockJS's
/// framing inside them (see [`sockjs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    SockJs,
}

impl Transport {
    /// The wire format of this transport's MESSAGE tails.
    pub(crate) fn format(self) -> WireFormat {
        match self {
            Transport::WebSocket => WireFormat::Stomp,
            Transport::SockJs => WireFormat::StompSockJs,
        }
    }

    /// A whole STOMP frame (see [`frame::encode`]) as this transport sends it.
    pub(crate) fn frame(self, stomp: &[u8]) -> Bytes {
        match self {
            Transport::WebSocket => ws::text(stomp),
            Transport::SockJs => sockjs::message(stomp),
        }
    }

    /// The close: the frame explaining it first, if any, then SockJS's close frame, then WebSocket's.
    pub(crate) fn close(self, explanation: Option<&[u8]>, code: u16, reason: &str) -> Bytes {
        let mut bytes = Vec::new();
        if let Some(explanation) = explanation {
            bytes.extend_from_slice(&self.frame(explanation));
        }
        match self {
            Transport::WebSocket => bytes.extend_from_slice(&ws::close(code, reason)),
            Transport::SockJs => bytes.extend_from_slice(&sockjs::close(code, reason)),
        }
        Bytes::from(bytes)
    }
}

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    User,
    All,
    Topic(String),
}

impl Target {
    fn of(destination: &str) -> Option<Target> {
        if let Some(queue) = destination.strip_prefix("/user/queue/") {
            return (!queue.is_empty()).then_some(Target::User);
        }
        match destination.strip_prefix("/topic/")? {
            "" => None,
            "all" => Some(Target::All),
            topic => Some(Target::Topic(topic.to_string())),
        }
    }

    fn of_audience(audience: &Audience) -> Target {
        match audience {
            Audience::User(_) => Target::User,
            Audience::All => Target::All,
            Audience::Topic(topic) => Target::Topic(topic.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

#[derive(Debug)]
struct Subscription {
    id: String,
    destination: String,
    target: Target,
    ack: AckMode,
    /// The per-socket start of its MESSAGE frames: `MESSAGE`, `subscription`, `destination` (for
    /// SockJS, escaped after the start of a message frame).
    head: Vec<u8>,
}

impl Subscription {
    fn new(
        id: &str,
        destination: &str,
        target: Target,
        ack: AckMode,
        transport: Transport,
        escaped: bool,
    ) -> Subscription {
        let mut text = Vec::with_capacity(32 + id.len() + destination.len());
        text.extend_from_slice(b"MESSAGE\n");
        frame::push_header_with(&mut text, "subscription", id, escaped);
        frame::push_header_with(&mut text, "destination", destination, escaped);
        let head = match transport {
            Transport::WebSocket => text,
            Transport::SockJs => {
                let mut head = sockjs::MESSAGES_START.to_vec();
                sockjs::escape_into(&mut head, &text);
                head
            }
        };
        Subscription { id: id.to_string(), destination: destination.to_string(), target, ack, head }
    }

    /// Whether its MESSAGE frames carry `ack`: STOMP 1.2 asks for one when the client acknowledges.
    fn acked(&self, version: Version) -> bool {
        self.ack != AckMode::Auto && version == Version::V12
    }

    fn message_head(&self, version: Version, transport: Transport) -> MessageHead<'_> {
        MessageHead { text: &self.head, transport, acked: self.acked(version), escaped: version.escapes() }
    }
}

/// An rpc in flight: where its reply goes.
#[derive(Debug)]
struct PendingRpc {
    reply_to: Option<String>,
    correlation: Option<String>,
}

/// A message waiting for a subscription.
#[derive(Debug)]
struct Held {
    target: Target,
    seq: u64,
    tail: Bytes,
    text: bool,
}

/// One STOMP connection's state.
#[derive(Debug)]
pub(crate) struct StompCodec {
    connected: Connected,
    transport: Transport,
    /// How often the server sends heart-beats and wants them (the gateway's heartbeat).
    server_beat: Duration,
    subscriptions: Vec<Subscription>,
    /// Some topic has more than one subscription (each gets a copy): checked per message only then.
    copies: bool,
    held: VecDeque<Held>,
    /// The first `seq` dropped from `held`, per destination, until its first subscription.
    dropped: Vec<(Target, u64)>,
    /// Destinations whose dropped messages the session reads again: what comes for them is
    /// dropped too (the refill reads it) until the refill starts.
    refilling: Vec<Target>,
    /// The connection's user (from the welcome), whose messages `/user/queue/…` receives.
    user: String,
    rpcs: HashMap<String, PendingRpc>,
    next_rpc: u64,
    /// RECEIPTs in the order of their frames. A RECEIPT tells the client that its frames up to
    /// that one were processed, so a topic's SUBSCRIBE or UNSUBSCRIBE (which the session answers
    /// later) holds its own and every later frame's receipt until the session's answer.
    receipts: VecDeque<Receipt>,
    /// Frames to send that answer no session notice (RECEIPTs, released messages).
    replies: Vec<Bytes>,
    /// The frame to send before the close (an ERROR, or the RECEIPT of a DISCONNECT).
    last: Option<Vec<u8>>,
    /// A notice that ends the connection (an ERROR).
    closing: Option<Close>,
    /// What its writes and the client's ACKs let the device's cursor pass.
    acks: acks::Acks,
    /// Where a new device's replay ended, until it counts as written (see `take_auto_ack`).
    caught_up: u64,
    /// Where MESSAGE heads are written (see [`StompCodec::head`]).
    arena: BytesMut,
    /// The client's frames, as its messages bring them.
    stream: frame::FrameStream,
}

/// A frame's place among the receipts: `topic` while the session has not answered for it, `id`
/// when the frame asked for a RECEIPT.
#[derive(Debug)]
struct Receipt {
    topic: Option<String>,
    id: Option<String>,
}

/// The start of a subscription's MESSAGE frames, which connections with the same one share: the
/// command and the two per-socket headers ([`Subscription::head`]), how they are carried, and
/// whether an `ack` header follows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageHead<'a> {
    pub(crate) text: &'a [u8],
    pub(crate) transport: Transport,
    pub(crate) acked: bool,
    /// Whether header values are escaped (not in STOMP 1.0).
    pub(crate) escaped: bool,
}

/// Appends the whole MESSAGE frame of `message` under `head`, WebSocket header included: the
/// head, the `ack` header if it has one, then the message's shared tail.
pub(crate) fn append_frame(out: &mut Vec<u8>, head: &MessageHead<'_>, message: &Message) {
    let tail = message_tail(message, head.transport, head.escaped);
    put_head(out, head, message.seq, Tail { len: tail.len(), text: message.is_text() });
    out.extend_from_slice(&tail);
}

/// The tail of `message`'s MESSAGE frames over `transport`: the one encoded once per gateway, or
/// for STOMP 1.0 (`escaped` false), when escaping would change its kind or id, one of its own.
fn message_tail(message: &Message, transport: Transport, escaped: bool) -> Bytes {
    let shared = message.encoded(transport.format());
    if escaped || !(frame::escapes(&message.kind) || frame::escapes(&message.id)) {
        return shared.clone();
    }
    match transport {
        Transport::WebSocket => encode_tail(message, &message.payload, false),
        Transport::SockJs => encode_sockjs(message, false),
    }
}

/// What a MESSAGE frame's head needs to know of its shared tail: its length, and whether the body
/// is UTF-8 (a text frame) or not (a binary frame: a text frame must be UTF-8; SockJS's tail is
/// always text).
#[derive(Debug, Clone, Copy)]
struct Tail {
    len: usize,
    text: bool,
}

/// Writes the start of the MESSAGE frame of message `seq` under `head`, before its shared `tail`:
/// the WebSocket header, the head's text, and the `ack` header if it has one.
fn put_head(out: &mut impl BufMut, head: &MessageHead<'_>, seq: u64, tail: Tail) {
    let ack = if head.acked { ack_header(head.transport, seq) } else { Vec::new() };
    let text = tail.text || head.transport == Transport::SockJs;
    let (header, header_len) = ws::data_header(text, head.text.len() + ack.len() + tail.len);
    out.put_slice(&header[..header_len]);
    out.put_slice(head.text);
    out.put_slice(&ack);
}

/// The `ack` header of message `seq` as `transport` carries it (its value is the seq, as the
/// `message-id`'s).
fn ack_header(transport: Transport, seq: u64) -> Vec<u8> {
    let header = format!("ack:{seq}\n");
    match transport {
        Transport::WebSocket => header.into_bytes(),
        Transport::SockJs => {
            let mut escaped = Vec::with_capacity(header.len() + 1);
            sockjs::escape_into(&mut escaped, header.as_bytes());
            escaped
        }
    }
}

/// The shared part of a MESSAGE frame of `message` in SockJS's framing: escaped, and the end of
/// the message frame.
pub(super) fn encode_message_sockjs(message: &Message) -> Bytes {
    encode_sockjs(message, true)
}

fn encode_sockjs(message: &Message, escaped: bool) -> Bytes {
    // SockJS carries text: a body that is not UTF-8 goes as its lossy text, with that length.
    let tail = encode_tail(message, String::from_utf8_lossy(&message.payload).as_bytes(), escaped);
    let mut out = Vec::with_capacity(tail.len() + tail.len() / 8 + 2);
    sockjs::escape_into(&mut out, &tail);
    out.extend_from_slice(sockjs::MESSAGES_END);
    Bytes::from(out)
}

/// The shared part of a MESSAGE frame of `message` (see the module's documentation).
pub(super) fn encode_message(message: &Message) -> Bytes {
    encode_tail(message, &message.payload, true)
}

/// The shared part of a MESSAGE frame of `message` with `body`, header values `escaped` or not.
/// Every header costs each delivery its bytes, so only what a client needs is there: no
/// `content-length` unless the body holds a NUL (without one, STOMP ends the body at the first
/// NUL, which is then the frame's end).
fn encode_tail(message: &Message, body: &[u8], escaped: bool) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 96);
    frame::push_header(&mut out, "message-id", &message.seq.to_string());
    frame::push_header(&mut out, "content-type", "application/json");
    if !message.kind.is_empty() {
        frame::push_header_with(&mut out, "herald-kind", &message.kind, escaped);
    }
    if !message.id.is_empty() {
        frame::push_header_with(&mut out, "herald-id", &message.id, escaped);
    }
    if body.contains(&0) {
        frame::push_header(&mut out, "content-length", &body.len().to_string());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    Bytes::from(out)
}

impl StompCodec {
    /// A connected session's codec: its heartbeat is the gateway's `server_beat`, frames from the
    /// client are at most `max_frame_bytes` long.
    pub(crate) fn new(
        connected: Connected,
        server_beat: Duration,
        transport: Transport,
        max_frame_bytes: usize,
    ) -> StompCodec {
        StompCodec {
            stream: frame::FrameStream::of(connected.version, max_frame_bytes),
            connected,
            transport,
            server_beat,
            subscriptions: Vec::new(),
            copies: false,
            held: VecDeque::new(),
            dropped: Vec::new(),
            refilling: Vec::new(),
            user: String::new(),
            rpcs: HashMap::new(),
            next_rpc: 0,
            receipts: VecDeque::new(),
            replies: Vec::new(),
            last: None,
            closing: None,
            acks: acks::Acks::default(),
            caught_up: 0,
            arena: BytesMut::new(),
        }
    }

    /// The heartbeat interval in both directions: the larger of the gateway's and the client's.
    pub(super) fn heartbeat(&self, gateway: Duration) -> Duration {
        gateway.max(self.connected.client_sends).max(self.connected.client_wants)
    }

    /// The wire format of this connection's MESSAGE tails.
    pub(super) fn format(&self) -> WireFormat {
        self.transport.format()
    }

    /// A client that asked for heart-beats gets STOMP's (an EOL), others over SockJS its heartbeat
    /// frame; and a client that sends no heart-beats also a WebSocket ping, whose pong tells the
    /// gateway it is still there (nothing else would: an EOL or SockJS's `h` gets no answer).
    pub(super) fn ping(&self) -> Bytes {
        let mut bytes = Vec::new();
        if !self.connected.client_wants.is_zero() {
            bytes.extend_from_slice(&self.transport.frame(b"\n"));
        } else if self.transport == Transport::SockJs {
            bytes.extend_from_slice(&sockjs::heartbeat());
        }
        if bytes.is_empty() || self.connected.client_sends.is_zero() {
            bytes.extend_from_slice(&ws::ping());
        }
        Bytes::from(bytes)
    }

    /// Queues `message` for its subscription, or holds it until one comes; returns bytes queued.
    pub(super) fn queue_message(&mut self, message: &Message, frames: &mut VecDeque<Bytes>) -> usize {
        let Some(first) = self.route(message) else { return 0 };
        let tail = &message_tail(message, self.transport, self.connected.version.escapes());
        let mut len = 0;
        for index in std::iter::once(first).chain(self.copies(first)) {
            self.note_sent(index, message.seq);
            let head = self.head(index, message.seq, Tail { len: tail.len(), text: message.is_text() });
            len += head.len() + tail.len();
            frames.push_back(head);
            frames.push_back(tail.clone());
        }
        len
    }

    /// The subscriptions after `first` to the same topic: each gets its own copy of a message, as
    /// Spring's broker gives each subscription (the user's own messages go to the first
    /// `/user/queue/…` subscription only: those destinations are one inbox).
    fn copies(&self, first: usize) -> Vec<usize> {
        let target = &self.subscriptions[first].target;
        if *target == Target::User {
            return Vec::new();
        }
        (first + 1..self.subscriptions.len()).filter(|&index| self.subscriptions[index].target == *target).collect()
    }

    /// Notes whether some topic is subscribed more than once, after the subscriptions changed.
    pub(super) fn count_copies(&mut self) {
        let subscriptions = &self.subscriptions;
        self.copies = subscriptions.iter().enumerate().any(|(at, subscription)| {
            subscription.target != Target::User && subscriptions[..at].iter().any(|s| s.target == subscription.target)
        });
    }

    /// Whether `message` goes out more than once (topics subscribed more than once): then it is
    /// queued by [`Self::queue_message`], not as one shared frame.
    pub(super) fn sends_copies(&self, message: &Message) -> bool {
        if !self.copies {
            return false;
        }
        let target = Target::of_audience(&message.audience);
        target != Target::User && self.subscriptions.iter().filter(|s| s.target == target).nth(1).is_some()
    }

    /// The head of the subscription `message` goes to now (the frame is the head and the shared
    /// tail, see [`append_frame`]), or none: then it is held until one comes.
    pub(super) fn shared_head(&mut self, message: &Message) -> Option<MessageHead<'_>> {
        let index = self.route(message)?;
        self.note_sent(index, message.seq);
        Some(self.message_head(index))
    }

    /// The head of the messages of `last`'s destination up to `last`, when an `ack:auto`
    /// subscription takes them now; none when they would be held, or each is owed an ACK.
    pub(super) fn head_of_run(&self, last: &Message) -> Option<MessageHead<'_>> {
        let target = Target::of_audience(&last.audience);
        let auto = |index: &usize| self.subscriptions[*index].ack == AckMode::Auto;
        let index = self.subscription(&target).filter(auto).filter(|_| !self.refilling.contains(&target))?;
        if self.sends_copies(last) {
            return None;
        }
        Some(self.message_head(index))
    }

    fn message_head(&self, index: usize) -> MessageHead<'_> {
        self.subscriptions[index].message_head(self.connected.version, self.transport)
    }

    /// Notes the messages [`Self::head_of_run`] gave a head for, up to `last`, as sent.
    pub(super) fn note_run_sent(&mut self, last: &Message) {
        if let Some(index) = self.subscription(&Target::of_audience(&last.audience)) {
            self.note_sent(index, last.seq);
        }
    }

    /// The (first) subscription `message` goes to now, or none: then it is held.
    fn route(&mut self, message: &Message) -> Option<usize> {
        let target = Target::of_audience(&message.audience);
        if self.refilling.contains(&target) {
            return None;
        }
        let index = self.subscription(&target);
        if index.is_none() {
            if self.held.len() == MAX_HELD
                && let Some(oldest) = self.held.pop_front()
                && !self.dropped.iter().any(|(target, _)| *target == oldest.target)
            {
                self.dropped.push((oldest.target, oldest.seq));
            }
            let tail = message_tail(message, self.transport, self.connected.version.escapes());
            self.held.push_back(Held { target, seq: message.seq, tail, text: message.is_text() });
        }
        index
    }

    /// The refill of `audience` starts: from now on its messages go to its subscription again.
    pub(super) fn refill_started(&mut self, audience: &Audience) {
        let target = Target::of_audience(audience);
        self.refilling.retain(|refilling| *refilling != target);
    }

    /// The subscription that receives `target`'s messages: for the user's own, the first
    /// `/user/queue/…` one.
    fn subscription(&self, target: &Target) -> Option<usize> {
        self.subscriptions.iter().position(|subscription| subscription.target == *target)
    }

    /// The per-socket start of a MESSAGE frame of message `seq` for subscription `index`, before
    /// its shared `tail`: the WebSocket header, the command, the two per-socket headers and the
    /// `ack` header if the subscription has one. Heads are cut from one buffer per connection: one
    /// allocation serves many messages.
    fn head(&mut self, index: usize, seq: u64, tail: Tail) -> Bytes {
        let head = self.subscriptions[index].message_head(self.connected.version, self.transport);
        // Room for the WebSocket header and an `ack` header too.
        self.arena.reserve(HEAD_ROOM.max(head.text.len() + 48));
        put_head(&mut self.arena, &head, seq, tail);
        self.arena.split().freeze()
    }

    fn note_sent(&mut self, index: usize, seq: u64) {
        self.acks.sent(seq, self.subscriptions[index].ack == AckMode::Auto);
    }

    /// Where what was written on `ack:auto` subscriptions moves the cursor (`bound` at most), if
    /// further than before.
    pub(super) fn take_auto_ack(&mut self, bound: u64) -> Option<u64> {
        // A new device's replay end counts as written on `ack:auto` once nothing waits for a
        // subscription (a message held, dropped or refilling would be passed).
        if self.caught_up > 0 && self.nothing_waits() && self.has_auto_subscription() {
            self.acks.sent(std::mem::take(&mut self.caught_up), true);
        }
        self.acks.take_auto(bound)
    }

    /// Whether no message is held, dropped or refilling for a subscription.
    fn nothing_waits(&self) -> bool {
        self.held.is_empty() && self.dropped.is_empty() && self.refilling.is_empty()
    }

    fn has_auto_subscription(&self) -> bool {
        self.subscriptions.iter().any(|subscription| subscription.ack == AckMode::Auto)
    }

    /// See [`super::Codec::new_device_caught_up`].
    pub(super) fn new_device_caught_up(&mut self, upto: u64) {
        self.caught_up = upto;
    }

    pub(super) fn has_no_subscription(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// Frames the codec answers with itself, to send now.
    pub(super) fn take_replies(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.replies)
    }

    /// Why the connection must close, once a notice said so.
    pub(super) fn take_closing(&mut self) -> Option<Close> {
        self.closing.take()
    }

    /// The last bytes: the frame that explains the close (an ERROR unless one was set), then the
    /// WebSocket close frame.
    pub(super) fn close(&self, close: &Close) -> Bytes {
        // The frames before the one that ends the connection (a DISCONNECT, a frame refused) were
        // done: their answers not sent yet, then the receipts still held behind a topic's answer
        // (the connection ends, so that answer would never come), go before its RECEIPT or ERROR.
        let mut held = Vec::new();
        for frame in &self.replies {
            held.extend_from_slice(frame);
        }
        let escaped = self.connected.version.escapes();
        for id in self.receipts.iter().filter_map(|receipt| receipt.id.as_deref()) {
            held.extend_from_slice(&self.transport.frame(&receipt_frame(id, escaped)));
        }
        let explanation = self.last.clone().or_else(|| explanation(close, escaped));
        let closing = self.transport.close(explanation.as_deref(), close.number(), &close.reason);
        if held.is_empty() {
            return closing;
        }
        held.extend_from_slice(&closing);
        Bytes::from(held)
    }

    /// A notice in STOMP terms, if it has one.
    pub(super) fn notice(&mut self, notice: &ServerFrame) -> Option<Bytes> {
        match notice {
            ServerFrame::Welcome { conn, user, device, seq, read, unread, .. } => {
                self.user = user.clone();
                let beat = self.server_beat.as_millis().to_string();
                let heart_beat = format!("{beat},{beat}");
                let (seq, read, unread) = (seq.to_string(), read.to_string(), unread.to_string());
                let headers = [
                    ("version", self.connected.version.number()),
                    ("heart-beat", &heart_beat),
                    ("server", "herald"),
                    ("session", conn),
                    ("user-name", user),
                    ("herald-device", device),
                    ("herald-seq", &seq),
                    ("herald-read", &read),
                    ("herald-unread", &unread),
                ];
                // Never escaped (1.2 "Value Encoding"): ids may hold a colon.
                Some(self.transport.frame(&frame::encode("CONNECTED", &headers, b"", false)))
            }
            ServerFrame::Subscribed { topic } | ServerFrame::Unsubscribed { topic } => {
                if let Some(waiting) = self.receipts.iter_mut().find(|r| r.topic.as_ref() == Some(topic)) {
                    waiting.topic = None;
                }
                self.release_receipts();
                None
            }
            ServerFrame::RpcResult(result) => self.rpc_result(result),
            ServerFrame::Error { code, message, topic } => {
                // A refused topic SUBSCRIBE: its receipt, if it asked for one, names the frame.
                let receipt = topic.as_deref().and_then(|topic| self.take_topic_receipt(topic));
                self.fail(code, message, receipt.as_deref());
                None
            }
            _ => None,
        }
    }

    /// Queues a frame's receipt (if it asked for one) behind the topic answers still awaited.
    pub(super) fn queue_receipt(&mut self, topic: Option<String>, id: Option<String>) {
        self.receipts.push_back(Receipt { topic, id });
        self.release_receipts();
    }

    /// Sends the receipts no topic answer holds back any longer.
    fn release_receipts(&mut self) {
        while self.receipts.front().is_some_and(|receipt| receipt.topic.is_none()) {
            if let Some(id) = self.receipts.pop_front().and_then(|receipt| receipt.id) {
                let receipt = receipt_frame(&id, self.connected.version.escapes());
                self.replies.push(self.transport.frame(&receipt));
            }
        }
    }

    /// The receipt the oldest waiting SUBSCRIBE or UNSUBSCRIBE of `topic` asked for, if any, for
    /// the ERROR that refuses it; the frames after it are not done, so their receipts go too.
    fn take_topic_receipt(&mut self, topic: &str) -> Option<String> {
        let index = self.receipts.iter().position(|receipt| receipt.topic.as_deref() == Some(topic))?;
        let mut refused_and_later = self.receipts.split_off(index);
        refused_and_later.pop_front().and_then(|receipt| receipt.id)
    }

    /// A call's answer, or its failure (`herald-error:<code>`, the body `{"code","message"}`), as
    /// a MESSAGE on the subscription its `reply-to` names; without one, it is dropped. A failed
    /// call does not end the session: Spring reports a handler's failure and goes on, and apps
    /// moved from it resend their calls when they reconnect.
    fn rpc_result(&mut self, result: &RpcResult) -> Option<Bytes> {
        let rpc = self.rpcs.remove(&result.id)?;
        let index = rpc.reply_to.as_ref().and_then(|reply_to| {
            self.subscriptions
                .iter()
                .position(|s| s.destination == *reply_to)
                .or_else(|| self.subscriptions.iter().position(|s| s.id == *reply_to))
        })?;
        let subscription = &self.subscriptions[index];
        let body = match (&result.error, &result.data) {
            (Some(error), _) => serde_json::json!({"code": error.code, "message": error.message}).to_string(),
            (None, Some(data)) => data.to_string(),
            (None, None) => "null".into(),
        };
        let message_id = format!("{RPC_MESSAGE_ID}{}", result.id);
        let mut headers =
            vec![("subscription", subscription.id.as_str()), ("destination", subscription.destination.as_str())];
        if subscription.acked(self.connected.version) {
            headers.push(("ack", &message_id));
        }
        headers.extend([("message-id", message_id.as_str()), ("content-type", "application/json")]);
        if let Some(error) = &result.error {
            headers.push(("herald-error", &error.code));
        }
        if let Some(correlation) = &rpc.correlation {
            headers.push(("correlation-id", correlation));
        }
        let escaped = self.connected.version.escapes();
        Some(self.transport.frame(&frame::encode("MESSAGE", &headers, body.as_bytes(), escaped)))
    }

    /// Ends the connection with an ERROR frame: `message` is its `message` header (a Herald error
    /// code), `detail` its body.
    fn fail(&mut self, message: &str, detail: &str, receipt: Option<&str>) -> Close {
        self.last = Some(error_frame_with(message, detail, receipt, self.connected.version.escapes()));
        let close = Close::new(CloseCode::Policy, format!("{message}: {detail}"));
        self.closing = Some(close.clone());
        close
    }
}

/// An ERROR frame: `message` is a Herald error code, `detail` the body.
pub(crate) fn error_frame(message: &str, detail: &str) -> Vec<u8> {
    error_frame_with(message, detail, None, true)
}

fn error_frame_with(message: &str, detail: &str, receipt: Option<&str>, escaped: bool) -> Vec<u8> {
    let mut headers = vec![("message", message), ("content-type", "text/plain")];
    if let Some(receipt) = receipt {
        headers.push(("receipt-id", receipt));
    }
    frame::encode("ERROR", &headers, detail.as_bytes(), escaped)
}

/// The RECEIPT of `receipt`, its value escaped unless (`escaped` false) the connection is STOMP 1.0.
pub(super) fn receipt_frame(receipt: &str, escaped: bool) -> Vec<u8> {
    frame::encode("RECEIPT", &[("receipt-id", receipt)], b"", escaped)
}

/// Whether a close deserves an ERROR frame saying why (not a normal close, a restart, or one the
/// client started).
fn explained(code: CloseCode) -> bool {
    !matches!(code, CloseCode::Restart | CloseCode::Echo(_) | CloseCode::Abnormal)
}

/// The ERROR that explains `close`, if it is one that is explained.
fn explanation(close: &Close, escaped: bool) -> Option<Vec<u8>> {
    let code = close.number().to_string();
    let headers = [("message", &*close.reason), ("herald-close", &code)];
    explained(close.code).then(|| frame::encode("ERROR", &headers, close.reason.as_bytes(), escaped))
}

/// The last bytes of a connection closed before its session opened (before CONNECTED): the ERROR
/// that explains the close, as for an open one, then the transport's close.
pub(crate) fn close_unopened(transport: Transport, close: &Close) -> Bytes {
    transport.close(explanation(close, true).as_deref(), close.number(), &close.reason)
}

#[cfg(test)]
mod tests;
