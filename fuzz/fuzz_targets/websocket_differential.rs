//! The gateway's WebSocket reader against tungstenite's (server role, no limits) on streams of whole
//! frames, some well formed and some not: both must return the same messages and end the same way
//! (a refusal's close code, or the stream running out).
//!
//! Where Herald decides otherwise by its contract, the comparison says so: a binary message is
//! refused (1008) at its first frame, so there the reader must agree with tungstenite on everything
//! before that frame; and close code 1014 (Bad Gateway, in the IANA registry) is accepted, where
//! tungstenite replaces it with 1002 as it does every code it refuses.

#![no_main]

use std::io::{Read, Write};

use herald_gateway::fuzzing::{Message, read_websocket};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

#[derive(Debug, Arbitrary)]
struct Input {
    items: Vec<Item>,
    /// Sizes of the reads the gateway's reader gets the stream in.
    reads: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum Item {
    /// One frame, anything in it.
    Frame(Frame),
    /// A text message cut into fragments at these offsets (inside code points too), with a ping
    /// after the first fragment when `ping`.
    Fragmented { text: String, cuts: Vec<u8>, ping: bool },
}

#[derive(Debug, Arbitrary)]
struct Frame {
    fin: bool,
    /// Reserved bits: only 0-7 is used as they are, anything else is no bits.
    rsv: u8,
    opcode: Opcode,
    /// 0: unmasked; anything else is a mask key of those bytes.
    mask: u32,
    length: Length,
    payload: Payload,
}

#[derive(Debug, Arbitrary)]
enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
    Any(u8),
}

#[derive(Debug, Arbitrary)]
enum Length {
    Shortest,
    Bits16,
    Bits64,
}

#[derive(Debug, Arbitrary)]
enum Payload {
    Text(String),
    Bytes(Vec<u8>),
    /// A close frame's payload.
    Close {
        code: CloseCode,
        reason: String,
    },
}

#[derive(Debug, Arbitrary)]
enum CloseCode {
    Listed(u8),
    Any(u16),
}

/// Codes at the edges of RFC 6455 §7.4's ranges.
const CODES: [u16; 24] = [
    0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015, 1016, 2999,
    3000, 4999, 5000, 65535,
];

const OPCODE_BINARY: u8 = 0x2;

impl Frame {
    fn opcode(&self) -> u8 {
        match self.opcode {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => OPCODE_BINARY,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
            Opcode::Any(opcode) => opcode & 0x0F,
        }
    }

    fn payload(&self) -> Vec<u8> {
        match &self.payload {
            Payload::Text(text) => text.as_bytes().to_vec(),
            Payload::Bytes(bytes) => bytes.clone(),
            Payload::Close { code, reason } => {
                let code = match code {
                    CloseCode::Listed(i) => CODES[usize::from(*i) % CODES.len()],
                    CloseCode::Any(code) => *code,
                };
                [&code.to_be_bytes()[..], reason.as_bytes()].concat()
            }
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let rsv = if self.rsv < 8 { self.rsv << 4 } else { 0 };
        let payload = self.payload();
        let masked = if self.mask != 0 { 0x80 } else { 0 };
        let mut out = vec![u8::from(self.fin) << 7 | rsv | self.opcode()];
        match self.length {
            Length::Shortest if payload.len() < 126 => out.push(masked | payload.len() as u8),
            Length::Shortest | Length::Bits16 if payload.len() <= 0xFFFF => {
                out.push(masked | 126);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                out.push(masked | 127);
                out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        let key = self.mask.to_be_bytes();
        if self.mask != 0 {
            out.extend_from_slice(&key);
        }
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }
}

/// A well-formed frame.
fn frame(first: u8, payload: &[u8]) -> Frame {
    Frame {
        fin: first & 0x80 != 0,
        rsv: 0,
        opcode: Opcode::Any(first & 0x0F),
        mask: 0x37fa213d,
        length: Length::Shortest,
        payload: Payload::Bytes(payload.to_vec()),
    }
}

/// Where a frame is in the stream, and what it is.
#[derive(Debug)]
struct Placed {
    start: usize,
    end: usize,
    opcode: u8,
    /// The code of a close frame that has one.
    close_code: Option<u16>,
}

/// The stream, and its frames.
fn stream(items: &[Item]) -> (Vec<u8>, Vec<Placed>) {
    let mut stream = Vec::new();
    let mut placed = Vec::new();
    let mut add = |frame: &Frame| {
        let start = stream.len();
        stream.extend_from_slice(&frame.bytes());
        let close_code = match (frame.opcode(), frame.payload().as_slice()) {
            (0x8, [high, low, ..]) => Some(u16::from_be_bytes([*high, *low])),
            _ => None,
        };
        placed.push(Placed { start, end: stream.len(), opcode: frame.opcode(), close_code });
    };
    for item in items {
        match item {
            Item::Frame(frame) => add(frame),
            Item::Fragmented { text, cuts, ping } => {
                let bytes = text.as_bytes();
                let mut cuts: Vec<usize> = cuts.iter().map(|cut| usize::from(*cut).min(bytes.len())).collect();
                cuts.push(bytes.len());
                cuts.sort();
                cuts.dedup();
                let mut start = 0;
                for (i, cut) in cuts.iter().enumerate() {
                    let fin = if i + 1 == cuts.len() { 0x80 } else { 0 };
                    let opcode = if i == 0 { 0x1 } else { 0x0 };
                    add(&frame(fin | opcode, &bytes[start..*cut]));
                    start = *cut;
                    if i == 0 && *ping {
                        add(&frame(0x89, b"between"));
                    }
                }
            }
        }
    }
    (stream, placed)
}

/// How reading ended, as the gateway's reader reports it: a close code, or none after a close.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    messages: Vec<Message>,
    end: Option<u16>,
}

/// tungstenite, server role, no size limits, on the stream.
fn tungstenite(stream: &[u8]) -> (Reading, bool) {
    struct Io<'a>(&'a [u8]);
    impl Read for Io<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Io<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
    let mut socket = WebSocket::from_raw_socket(Io(stream), Role::Server, Some(config));
    let mut messages = Vec::new();
    loop {
        use tungstenite::{Error, error::ProtocolError, protocol::frame::coding::CloseCode};
        let end = match socket.read() {
            Ok(tungstenite::Message::Text(text)) => {
                messages.push(Message::Text(text.as_bytes().to_vec()));
                continue;
            }
            Ok(tungstenite::Message::Ping(payload)) => {
                messages.push(Message::Ping(payload.to_vec()));
                continue;
            }
            Ok(tungstenite::Message::Pong(_)) => {
                messages.push(Message::Pong);
                continue;
            }
            Ok(tungstenite::Message::Binary(_)) => return (Reading { messages, end: Some(1008) }, true),
            Ok(tungstenite::Message::Close(close)) => {
                messages.push(Message::Close(close.map(|close| u16::from(close.code))));
                None
            }
            Ok(tungstenite::Message::Frame(_)) => unreachable!("tungstenite returns no raw frame when reading"),
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => Some(1006),
            Err(Error::Protocol(_)) => Some(u16::from(CloseCode::Protocol)),
            Err(Error::Utf8(_)) => Some(u16::from(CloseCode::Invalid)),
            Err(Error::Capacity(_)) => Some(u16::from(CloseCode::Size)),
            Err(other) => panic!("tungstenite: {other}"),
        };
        return (Reading { messages, end }, false);
    }
}

fuzz_target!(|input: Input| {
    let (stream, frames) = stream(&input.items);
    let reads: Vec<usize> = input.reads.iter().map(|r| usize::from(*r)).collect();
    let herald = read_websocket(&stream, &reads, 1 << 30);
    if herald.end == Some(1008) {
        // Binary, refused at its first frame: before it, both agree, and the stream ran out.
        let refused = frames.iter().find(|frame| frame.start == herald.consumed);
        assert_eq!(refused.map(|frame| frame.opcode), Some(OPCODE_BINARY), "1008 at byte {}", herald.consumed);
        let (before, _) = tungstenite(&stream[..herald.consumed]);
        assert_eq!(before, Reading { messages: herald.messages, end: Some(1006) }, "before the binary frame");
        return;
    }
    let (mut reference, binary) = tungstenite(&stream);
    assert!(!binary, "tungstenite read a binary message, the gateway's reader did not refuse it: {herald:?}");
    // tungstenite turns a close code it refuses into 1002 and returns the close; the gateway's
    // reader refuses the frame with 1002 (and accepts 1014).
    if reference.messages.last() == Some(&Message::Close(Some(1002))) {
        let sent = frames.iter().find(|frame| frame.end == herald.consumed).and_then(|frame| frame.close_code);
        match (sent, herald.messages.last(), herald.end) {
            (Some(code), _, Some(1002)) if code != 1002 => {
                reference.messages.pop();
                reference.end = Some(1002);
            }
            (Some(1014), Some(Message::Close(Some(1014))), None) => {
                reference.messages.pop();
                reference.messages.push(Message::Close(Some(1014)));
            }
            _ => {}
        }
    }
    assert_eq!(Reading { messages: herald.messages, end: herald.end }, reference);
});
