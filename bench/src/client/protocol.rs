//! What a client says and listens for on top of WebSocket, per target: Herald's JSON frames, the
//! NATS protocol carried over WebSocket, or the raw broadcaster's bare payloads; and on top of an
//! HTTP response, Herald's Server-Sent Events. Each decoder turns data frames (or events) into
//! [`Event`]s and may ask for bytes to be sent back.

use std::sync::LazyLock;

use herald_shared::frame::ServerFrame;

use super::sse;
use super::ws::{OP_BINARY, OP_CONTINUATION, OP_TEXT};

/// The application protocol a client speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// Herald's frames. `resume`: the client connected with `since` and is live only after its
    /// `replayed` frame.
    Herald {
        /// Whether the connection resumes (so waits for `replayed`).
        resume: bool,
    },
    /// The NATS client protocol over WebSocket, subscribed to `subjects`.
    Nats {
        /// Subjects to subscribe to after `CONNECT`.
        subjects: Vec<String>,
    },
    /// The raw broadcaster: a `ready` frame, then one payload per frame.
    Raw,
    /// STOMP 1.2 at Herald's /stomp: CONNECT with `token` as passcode, then subscriptions to
    /// `/topic/all` and the user's queue; live once both are confirmed (RECEIPT).
    Stomp {
        /// The connect token.
        token: String,
        /// The device (`herald-device`).
        device: String,
        /// Whether the frames travel in SockJS's framing (its WebSocket transport).
        sockjs: bool,
    },
    /// The Centrifugal protocol (JSON): `connect` with `token`, then publication pushes.
    Centrifugal {
        /// The connect token.
        token: String,
    },
    /// Socket.IO over Engine.IO's WebSocket transport: CONNECT with `token`, then events.
    SocketIo {
        /// The connect token.
        token: String,
    },
    /// Server-Sent Events at Herald's /sse, not WebSocket: a `welcome` event, then one event per
    /// message; the client never speaks.
    Sse,
}

impl Protocol {
    /// The opcode of the frames the client sends: text for STOMP and the JSON protocols of other SDKs.
    pub fn send_opcode(&self) -> u8 {
        match self {
            Protocol::Stomp { .. } | Protocol::Centrifugal { .. } | Protocol::SocketIo { .. } => OP_TEXT,
            _ => OP_BINARY,
        }
    }
}

/// What a client learned from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Herald's `welcome` (with its stream sequence), NATS's first `PONG`, the raw `ready` frame.
    Welcome {
        /// The stream's last sequence when the connection went live (Herald only).
        seq: Option<u64>,
    },
    /// Herald's `replayed` frame.
    Replayed {
        /// Messages the gateway says it replayed.
        count: u64,
    },
    /// A delivered message; the bytes contain its payload.
    Msg(&'a [u8]),
    /// The server ends the connection (SSE's `close` event; WebSocket's close is a frame).
    Closed {
        /// The close code it gave.
        code: Option<u16>,
    },
    /// The server reported an error that ends the client (NATS `-ERR`).
    Failed(String),
}

/// A protocol's per-connection state.
#[derive(Debug)]
pub enum Decoder {
    /// See [`Protocol::Herald`].
    Herald,
    /// See [`Protocol::Nats`].
    Nats(NatsDecoder),
    /// See [`Protocol::Raw`].
    Raw {
        /// Whether the `ready` frame was seen.
        ready: bool,
    },
    /// See [`Protocol::Stomp`].
    Stomp {
        /// CONNECTED's `herald-seq`.
        seq: Option<u64>,
        /// See [`Protocol::Stomp`].
        sockjs: bool,
    },
    /// See [`Protocol::Centrifugal`].
    Centrifugal,
    /// See [`Protocol::SocketIo`]: the CONNECT to send after Engine.IO's open packet.
    SocketIo {
        /// `40{"token":…}`, until sent.
        connect: Option<Vec<u8>>,
    },
    /// See [`Protocol::Sse`]: one whole event per call of [`Decoder::on_data`].
    Sse,
}

impl Decoder {
    /// A decoder for `protocol`, and the bytes to send once the socket is open (NATS: `CONNECT`,
    /// `SUB`s and a `PING` whose `PONG` says the subscriptions are in place).
    pub fn new(protocol: &Protocol) -> (Decoder, Vec<u8>) {
        match protocol {
            Protocol::Herald { .. } => (Decoder::Herald, Vec::new()),
            Protocol::Raw => (Decoder::Raw { ready: false }, Vec::new()),
            Protocol::Sse => (Decoder::Sse, Vec::new()),
            Protocol::Stomp { token, device, sockjs } => {
                let connect =
                    format!("CONNECT\naccept-version:1.2\nhost:herald\npasscode:{token}\nherald-device:{device}\n\n\0");
                let connect = if *sockjs { sockjs_message(connect.as_bytes()) } else { connect.into_bytes() };
                (Decoder::Stomp { seq: None, sockjs: *sockjs }, connect)
            }
            Protocol::Centrifugal { token } => {
                let connect = serde_json::json!({"id": 1, "connect": {"token": token, "name": "herald-bench"}});
                (Decoder::Centrifugal, connect.to_string().into_bytes())
            }
            Protocol::SocketIo { token } => {
                let connect = format!("40{}", serde_json::json!({ "token": token })).into_bytes();
                (Decoder::SocketIo { connect: Some(connect) }, Vec::new())
            }
            Protocol::Nats { subjects } => {
                let mut hello =
                    br#"CONNECT {"verbose":false,"pedantic":false,"protocol":1,"name":"herald-bench"}"#.to_vec();
                hello.extend_from_slice(b"\r\n");
                for (sid, subject) in subjects.iter().enumerate() {
                    hello.extend_from_slice(format!("SUB {subject} {}\r\n", sid + 1).as_bytes());
                }
                hello.extend_from_slice(b"PING\r\n");
                (Decoder::Nats(NatsDecoder::default()), hello)
            }
        }
    }

    /// Handles one data frame (`opcode` text, binary or continuation); events go to `emit`, bytes
    /// to send back (one data frame's worth) to `reply`.
    pub fn on_data(&mut self, opcode: u8, payload: &[u8], reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) {
        if !matches!(opcode, OP_TEXT | OP_BINARY | OP_CONTINUATION) {
            return;
        }
        match self {
            Decoder::Herald => herald_frame(payload, emit),
            Decoder::Nats(nats) => nats.feed(payload, reply, emit),
            Decoder::Raw { ready } if !*ready => {
                *ready = true;
                emit(Event::Welcome { seq: None });
            }
            Decoder::Raw { .. } => emit(Event::Msg(payload)),
            Decoder::Stomp { seq, sockjs: false } => stomp_frame(payload, seq, reply, emit),
            Decoder::Stomp { seq, sockjs: true } => sockjs_frame(payload, seq, reply, emit),
            Decoder::Centrifugal => centrifugal_frame(payload, reply, emit),
            Decoder::SocketIo { connect } => socketio_packet(payload, connect, reply, emit),
            Decoder::Sse => sse_event(payload, emit),
        }
    }
}

/// Handles a STOMP frame: MESSAGE frames are messages; CONNECTED, then each RECEIPT, lead to the
/// next subscription, then to the welcome.
fn stomp_frame(payload: &[u8], seq: &mut Option<u64>, reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) {
    // A MESSAGE is known by its command, as a Herald `msg` by its start: its headers are not read
    // (the payload's stamp is found in the whole frame when a latency is sampled).
    if payload.starts_with(b"MESSAGE\n") {
        emit(Event::Msg(payload));
        return;
    }
    // Built once: `memmem::find` would build a searcher for every frame.
    static HEAD_END: LazyLock<memchr::memmem::Finder<'static>> = LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
    let Some(head_end) = HEAD_END.find(payload) else { return };
    let head = &payload[..head_end];
    let header = |name: &str| {
        head.split(|b| *b == b'\n').find_map(|line| line.strip_prefix(name.as_bytes())?.strip_prefix(b":"))
    };
    match head.split(|b| *b == b'\n').next().unwrap_or_default() {
        b"CONNECTED" => {
            *seq = header("herald-seq").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            reply.extend_from_slice(b"SUBSCRIBE\nid:all\ndestination:/topic/all\nreceipt:all\n\n\0");
        }
        b"RECEIPT" if header("receipt-id") == Some(b"all") => {
            reply.extend_from_slice(b"SUBSCRIBE\nid:q\ndestination:/user/queue/q\nreceipt:q\n\n\0");
        }
        b"RECEIPT" => emit(Event::Welcome { seq: *seq }),
        b"ERROR" => emit(Event::Failed(String::from_utf8_lossy(payload).into_owned())),
        _ => {}
    }
}

/// A SockJS frame around STOMP frames: `a[…]` holds them (a MESSAGE is known by its start, as
/// without SockJS), `c[…]` is the close; `o` and `h` say nothing.
fn sockjs_frame(payload: &[u8], seq: &mut Option<u64>, reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) {
    if payload.starts_with(br#"a["MESSAGE\n"#) {
        emit(Event::Msg(payload));
        return;
    }
    if payload.starts_with(b"c[") {
        emit(Event::Failed(String::from_utf8_lossy(payload).into_owned()));
        return;
    }
    let Some(messages) = payload.strip_prefix(b"a") else { return };
    let Ok(messages) = serde_json::from_slice::<Vec<String>>(messages) else { return };
    for message in messages {
        let mut stomp_reply = Vec::new();
        stomp_frame(message.as_bytes(), seq, &mut stomp_reply, emit);
        if !stomp_reply.is_empty() {
            reply.extend_from_slice(&sockjs_message(&stomp_reply));
        }
    }
}

/// One client message in SockJS's framing: a JSON array holding `text`.
fn sockjs_message(text: &[u8]) -> Vec<u8> {
    serde_json::json!([String::from_utf8_lossy(text)]).to_string().into_bytes()
}

/// A Centrifugal frame: lines of replies (the connect reply is the welcome) and pushes; `{}` is a
/// ping, answered with `{}`. Lines are found with `memchr` (vectorised), so that the tool's cost per
/// byte stays that of the other protocols.
fn centrifugal_frame(payload: &[u8], reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) {
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', payload).chain(std::iter::once(payload.len()));
    for end in ends {
        let line = &payload[start..end];
        start = end + 1;
        if line.starts_with(br#"{"push":"#) {
            emit(Event::Msg(line));
        } else if line == b"{}" {
            reply.extend_from_slice(b"{}");
        } else if line.starts_with(br#"{"id":1,"connect""#) || line.starts_with(br#"{"connect""#) {
            emit(Event::Welcome { seq: None });
        } else if line.starts_with(br#"{"id":1,"error""#) || line.starts_with(br#"{"error""#) {
            emit(Event::Failed(String::from_utf8_lossy(line).into_owned()));
        }
    }
}

/// An Engine.IO packet: the open packet (answered with the CONNECT), pings (answered with pongs),
/// the CONNECT answer (the welcome) and events.
fn socketio_packet(
    payload: &[u8],
    connect: &mut Option<Vec<u8>>,
    reply: &mut Vec<u8>,
    emit: &mut impl FnMut(Event<'_>),
) {
    match payload {
        [b'0', ..] => reply.extend(connect.take().unwrap_or_default()),
        [b'2'] => reply.push(b'3'),
        [b'4', b'0', ..] => emit(Event::Welcome { seq: None }),
        [b'4', b'2', ..] => emit(Event::Msg(payload)),
        [b'4', b'4', ..] => emit(Event::Failed(String::from_utf8_lossy(payload).into_owned())),
        _ => {}
    }
}

/// An event of Herald's stream: one with an `id` is a message (the gateway writes `id` first, so
/// a message is known by its start); `welcome`, `replayed` and `close` carry JSON, parsed only for
/// them. Comments and other events say nothing here.
fn sse_event(event: &[u8], emit: &mut impl FnMut(Event<'_>)) {
    if event.starts_with(b"id:") {
        emit(Event::Msg(event));
        return;
    }
    let mut name: &[u8] = b"message";
    for (field, value) in sse::fields(event) {
        match field {
            b"id" => {
                emit(Event::Msg(event));
                return;
            }
            b"event" => name = value,
            _ => {}
        }
    }
    match name {
        b"welcome" | b"replayed" => match serde_json::from_slice::<ServerFrame>(&sse::data(event)) {
            Ok(ServerFrame::Welcome { seq, .. }) => emit(Event::Welcome { seq: Some(seq) }),
            Ok(ServerFrame::Replayed { count, topic: None, .. }) => emit(Event::Replayed { count }),
            Ok(_) => {}
            Err(error) => emit(Event::Failed(format!("bad {} event: {error}", String::from_utf8_lossy(name)))),
        },
        b"close" => {
            let close = serde_json::from_slice::<serde_json::Value>(&sse::data(event)).ok();
            let code = close.and_then(|close| u16::try_from(close["code"].as_u64()?).ok());
            emit(Event::Closed { code });
        }
        _ => {}
    }
}

/// Classifies a Herald frame by its start (the gateway writes `type` first), parsing only the rare
/// frames whose fields matter.
fn herald_frame(payload: &[u8], emit: &mut impl FnMut(Event<'_>)) {
    if payload.starts_with(br#"{"type":"msg""#) {
        emit(Event::Msg(payload));
        return;
    }
    match serde_json::from_slice::<ServerFrame>(payload) {
        Ok(ServerFrame::Welcome { seq, .. }) => emit(Event::Welcome { seq: Some(seq) }),
        Ok(ServerFrame::Replayed { count, topic: None, .. }) => emit(Event::Replayed { count }),
        Ok(ServerFrame::Msg(_)) => emit(Event::Msg(payload)),
        // Pongs, errors, results and frames from a newer gateway do not matter here.
        _ => {}
    }
}

/// The NATS protocol as a byte stream spread over WebSocket frames.
#[derive(Debug, Default)]
pub struct NatsDecoder {
    /// Bytes of an operation that has not fully arrived.
    partial: Vec<u8>,
    /// Whether the first `PONG` (our subscriptions are in place) was seen.
    subscribed: bool,
}

impl NatsDecoder {
    fn feed(&mut self, data: &[u8], reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) {
        if self.partial.is_empty() {
            let used = self.ops(data, reply, emit);
            self.partial.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.ops(&buf, reply, emit);
            buf.drain(..used);
            self.partial = buf;
        }
    }

    /// Handles every complete operation at the start of `buf`; returns the bytes they took.
    fn ops(&mut self, buf: &[u8], reply: &mut Vec<u8>, emit: &mut impl FnMut(Event<'_>)) -> usize {
        let mut at = 0;
        while let Some(line_len) = memchr::memchr(b'\n', &buf[at..]) {
            let line = &buf[at..at + line_len + 1];
            let op = line.trim_ascii_end();
            if let Some(args) = op.strip_prefix(b"MSG ") {
                let Some(size) = last_number(args) else {
                    emit(Event::Failed(format!("bad MSG line {:?}", String::from_utf8_lossy(op))));
                    return buf.len();
                };
                let start = at + line.len();
                let Some(payload) = buf.get(start..start + size) else { break };
                // The payload is followed by CRLF.
                if buf.len() < start + size + 2 {
                    break;
                }
                emit(Event::Msg(payload));
                at = start + size + 2;
                continue;
            }
            at += line.len();
            if op == b"PING" {
                reply.extend_from_slice(b"PONG\r\n");
            } else if op == b"PONG" && !self.subscribed {
                self.subscribed = true;
                emit(Event::Welcome { seq: None });
            } else if op.starts_with(b"-ERR") {
                emit(Event::Failed(String::from_utf8_lossy(op).into_owned()));
            }
            // INFO, +OK and later PONGs need nothing.
        }
        at
    }
}

/// The number at the end of a space-separated argument list.
fn last_number(args: &[u8]) -> Option<usize> {
    let token = args.rsplit(|b| *b == b' ').next()?;
    std::str::from_utf8(token).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(decoder: &mut Decoder, chunks: &[&[u8]]) -> (Vec<String>, Vec<u8>) {
        let mut seen = Vec::new();
        let mut reply = Vec::new();
        for chunk in chunks {
            decoder.on_data(OP_BINARY, chunk, &mut reply, &mut |event| seen.push(format!("{event:?}")));
        }
        (seen, reply)
    }

    #[test]
    fn nats_messages_split_anywhere_across_frames() {
        let (mut decoder, hello) = Decoder::new(&Protocol::Nats { subjects: vec!["push.all".into()] });
        assert!(hello.ends_with(b"SUB push.all 1\r\nPING\r\n"));
        let stream = b"INFO {}\r\nPONG\r\nMSG push.all 1 5\r\nhello\r\nPING\r\nMSG push.all 1 2\r\nhi\r\n";
        for cut in 1..stream.len() {
            let (mut decoder, _) = Decoder::new(&Protocol::Nats { subjects: vec![] });
            let (seen, reply) = events(&mut decoder, &[&stream[..cut], &stream[cut..]]);
            assert_eq!(seen, ["Welcome { seq: None }", "Msg([104, 101, 108, 108, 111])", "Msg([104, 105])"], "{cut}");
            assert_eq!(reply, b"PONG\r\n");
        }
        let (seen, _) = events(&mut decoder, &[b"-ERR 'Authorization Violation'\r\n"]);
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn herald_frames_become_events() {
        let mut decoder = Decoder::Herald;
        let welcome = br#"{"type":"welcome","conn":"c","user":"u","device":"d","node":"n","seq":7,"heartbeat":25}"#;
        let replayed = br#"{"type":"replayed","from":1,"to":7,"count":3,"complete":true}"#;
        let msg = br#"{"type":"msg","seq":8,"to":"all","id":"","kind":"","ts":"x","data":{}}"#;
        let (seen, _) = events(&mut decoder, &[welcome, replayed, msg, br#"{"type":"pong"}"#]);
        assert_eq!(seen[..2], ["Welcome { seq: Some(7) }", "Replayed { count: 3 }"]);
        assert!(seen[2].starts_with("Msg("));
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn stomp_subscribes_then_welcomes_then_reads_messages() {
        let protocol = Protocol::Stomp { token: "t".into(), device: "d".into(), sockjs: false };
        let (mut decoder, hello) = Decoder::new(&protocol);
        assert!(hello.starts_with(b"CONNECT\n") && hello.ends_with(b"\n\n\0"));
        let (seen, reply) = events(&mut decoder, &[b"CONNECTED\nversion:1.2\nherald-seq:7\n\n\0"]);
        assert!(seen.is_empty() && reply.ends_with(b"receipt:all\n\n\0"));
        let (_, reply) = events(&mut decoder, &[b"RECEIPT\nreceipt-id:all\n\n\0"]);
        assert!(reply.ends_with(b"receipt:q\n\n\0"));
        let message = b"MESSAGE\nsubscription:all\nmessage-id:8\n\n{}\0";
        let (seen, _) = events(&mut decoder, &[b"RECEIPT\nreceipt-id:q\n\n\0", message]);
        assert_eq!(seen[0], "Welcome { seq: Some(7) }");
        assert_eq!(seen[1], format!("Msg({:?})", message.to_vec()), "the whole frame");
    }

    #[test]
    fn stomp_over_sockjs_frames_are_unwrapped_and_replies_wrapped() {
        let protocol = Protocol::Stomp { token: "t".into(), device: "d".into(), sockjs: true };
        let (mut decoder, hello) = Decoder::new(&protocol);
        assert!(hello.starts_with(br#"["CONNECT\n"#) && hello.ends_with(br#"\n\n\u0000"]"#));
        let (seen, reply) = events(&mut decoder, &[b"o", br#"a["CONNECTED\nversion:1.2\nherald-seq:7\n\n\u0000"]"#]);
        assert!(seen.is_empty());
        assert_eq!(reply, br#"["SUBSCRIBE\nid:all\ndestination:/topic/all\nreceipt:all\n\n\u0000"]"#);
        let (_, reply) = events(&mut decoder, &[br#"a["RECEIPT\nreceipt-id:all\n\n\u0000"]"#]);
        assert!(reply.ends_with(br#"receipt:q\n\n\u0000"]"#));
        let message = br#"a["MESSAGE\nsubscription:all\nmessage-id:8\n\n{\"t\":5}\u0000"]"#;
        let (seen, _) = events(&mut decoder, &[b"h", br#"a["RECEIPT\nreceipt-id:q\n\n\u0000"]"#, message]);
        assert_eq!(seen, ["Welcome { seq: Some(7) }".to_string(), format!("Msg({:?})", message.to_vec())]);
        let (seen, _) = events(&mut decoder, &[br#"c[4008,"slow"]"#]);
        assert!(seen[0].starts_with("Failed("), "{seen:?}");
    }

    #[test]
    fn centrifugal_frames_are_read_line_by_line() {
        let (mut decoder, _) = Decoder::new(&Protocol::Centrifugal { token: "t".into() });
        let frame = b"{\"id\":1,\"connect\":{}}\n{\"push\":{\"pub\":1}}\n{}\n{\"push\":{\"pub\":2}}";
        let (seen, reply) = events(&mut decoder, &[frame]);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], "Welcome { seq: None }");
        assert!(seen[1..].iter().all(|event| event.starts_with("Msg(")));
        assert_eq!(reply, b"{}", "the ping in the middle is answered");
    }

    #[test]
    fn sse_events_become_events() {
        let (mut decoder, hello) = Decoder::new(&Protocol::Sse);
        assert!(hello.is_empty(), "an SSE client never speaks");
        let welcome = br#"{"type":"welcome","conn":"c","user":"u","device":"d","node":"n","seq":7,"heartbeat":25}"#;
        let welcome = [&b"retry: 1000\nevent: welcome\ndata: "[..], welcome].concat();
        let replayed = br#"event: replayed
data: {"type":"replayed","from":1,"to":7,"count":3,"complete":true}"#;
        let close = br#"event: close
data: {"code":4008,"reason":"too slow"}"#;
        let (seen, reply) = events(&mut decoder, &[&welcome, b": ping", replayed, b"event: other\ndata: {}", close]);
        assert_eq!(seen, ["Welcome { seq: Some(7) }", "Replayed { count: 3 }", "Closed { code: Some(4008) }"]);
        assert!(reply.is_empty());
        let (seen, _) = events(&mut decoder, &[b"event: welcome\ndata: {\"type\":", b"event: close\ndata: ?"]);
        assert!(seen[0].starts_with("Failed(\"bad welcome event"), "{seen:?}");
        assert_eq!(seen[1], "Closed { code: None }");
    }

    #[test]
    fn sse_messages_are_events_with_an_id_and_carry_their_stamp() {
        let mut decoder = Decoder::Sse;
        let payload = crate::payload::stamped(42, 100);
        let message = [&b"id: 8\nevent: message\ndata: "[..], &payload].concat();
        let multi_line = b"id: 9\nevent: mail\ndata: {\"t\":43,\ndata:   \"p\": \"x\"\ndata: }";
        let id_later = b"event: mail\nid: 10\ndata: {\"t\":44}";
        let mut stamps = Vec::new();
        for event in [&message[..], multi_line, id_later] {
            decoder.on_data(OP_TEXT, event, &mut Vec::new(), &mut |event| match event {
                Event::Msg(bytes) => stamps.push(crate::payload::stamp_in(bytes)),
                other => panic!("not a message: {other:?}"),
            });
        }
        assert_eq!(stamps, [Some(42), Some(43), Some(44)]);
    }

    #[test]
    fn raw_frames_after_ready_are_messages() {
        let (mut decoder, _) = Decoder::new(&Protocol::Raw);
        let (seen, _) = events(&mut decoder, &[b"ready", b"payload"]);
        assert_eq!(seen, ["Welcome { seq: None }", "Msg([112, 97, 121, 108, 111, 97, 100])"]);
    }
}
