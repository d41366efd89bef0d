//! STOMP frames as a client sends them in WebSocket text messages, and the codec that reads them
//! on a connected session.

use std::time::Duration;

use crate::codec::stomp::{Connected, Frame, StompCodec, Transport, Version, parse};
use crate::codec::{Codec, Command, Refusal, sockjs};
use crate::http::stomp::heart_beat;

/// Any WebSocket text messages: `parse` never panics, a frame it reads written out again reads the
/// same, a `heart-beat` header is accepted only as two numbers (capped at 10 minutes); the codec of
/// a connected session makes at most one command of each frame a message completes, the same
/// whether a message comes whole or in two pieces, and never one for a topic outside the claim.
///
/// The input: messages separated by 0xFF (never in UTF-8 text); the first byte of the input also
/// chooses the version the session negotiated (its value modulo 3), and its top bit SockJS's
/// framing around the frames: then each message, escaped as SockJS escapes, reads back as itself,
/// and the codec makes at most one command of each frame in it.
pub fn stomp_frame(data: &[u8]) {
    let Some(first) = data.first() else { return };
    if first & 0x80 != 0 {
        return sockjs_messages(data);
    }
    let version = [Version::V10, Version::V11, Version::V12][usize::from(*first) % 3];
    let connected = Connected {
        version,
        client_sends: Duration::ZERO,
        client_wants: Duration::ZERO,
        allowed_topics: vec!["news".into(), "room-*".into()],
    };
    let codec =
        || Codec::Stomp(Box::new(StompCodec::new(connected.clone(), Duration::ZERO, Transport::WebSocket, 1024)));
    let (mut codec, mut split_codec) = (codec(), codec());
    for message in data.split(|byte| *byte == 0xFF) {
        if let Ok(Some(frame)) = parse(message) {
            let written = write(&frame);
            assert_eq!(parse(&written), Ok(Some(frame.clone())), "{frame:?} written as {written:?}");
            if let Some(value) = frame.header("heart-beat")
                && let Some((sends, wants)) = heart_beat(value)
            {
                let (x, y) = value.split_once(',').expect("two numbers");
                let capped = |text: &str| text.trim().parse::<u64>().map(|ms| ms.min(600_000));
                assert_eq!((capped(x), capped(y)), (Ok(sends.as_millis() as u64), Ok(wants.as_millis() as u64)));
            }
        }
        let decoded = codec.decode(message);
        let frame_ends = message.iter().filter(|byte| **byte == 0).count();
        assert!(decoded.len() <= frame_ends + 1, "{} outcomes of {frame_ends} NULs", decoded.len());
        // The same bytes split over two messages make the same commands, and a refusal if whole
        // they do (its reason may differ: a frame past the length limit in pieces is refused for its
        // length before the line that is wrong in it comes).
        let (head, tail) = message.split_at(usize::from(*first) % (message.len() + 1));
        let ends = |outcome: &Result<Command, Refusal>| matches!(outcome, Ok(Command::Close) | Err(_));
        let mut split = split_codec.decode(head);
        if !split.iter().any(ends) {
            split.extend(split_codec.decode(tail));
        }
        // Up to the first outcome that ends the connection: nothing after it counts.
        let commands = |outcomes: &[Result<Command, Refusal>]| {
            let end = outcomes.iter().position(ends).map_or(outcomes.len(), |at| at + 1);
            outcomes[..end].iter().map(|o| o.as_ref().ok().cloned()).collect::<Vec<_>>()
        };
        assert_eq!(commands(&split), commands(&decoded), "split at {}", head.len());
        for command in &decoded {
            if let Ok(Command::Subscribe { topic, .. }) = command {
                assert!(topic == "news" || topic.starts_with("room-"), "topic {topic:?} outside the claim");
            }
        }
        if decoded.iter().any(ends) {
            return;
        }
    }
}

fn sockjs_messages(data: &[u8]) {
    let connected = Connected {
        version: Version::V12,
        client_sends: Duration::ZERO,
        client_wants: Duration::ZERO,
        allowed_topics: vec!["news".into()],
    };
    let mut codec = Codec::Stomp(Box::new(StompCodec::new(connected, Duration::ZERO, Transport::SockJs, 64 * 1024)));
    for message in data[1..].split(|byte| *byte == 0xFF) {
        if let Ok(text) = std::str::from_utf8(message) {
            let mut escaped = b"[\"".to_vec();
            sockjs::escape_into(&mut escaped, message);
            escaped.extend_from_slice(b"\"]");
            assert_eq!(sockjs::parse(&escaped), Ok(vec![text.to_string()]), "{text:?} escaped as {escaped:?}");
        }
        let decoded = codec.decode(message);
        match sockjs::parse(message) {
            Ok(messages) => {
                let frame_ends: usize =
                    messages.iter().map(|message| message.bytes().filter(|b| *b == 0).count()).sum();
                assert!(decoded.len() <= frame_ends + 1, "{} outcomes of {frame_ends} NULs", decoded.len());
            }
            Err(_) => assert!(matches!(decoded.as_slice(), [Err(Refusal::Close(_))]), "bad framing closes"),
        }
        if decoded.iter().any(Result::is_err) {
            return;
        }
    }
}

/// `frame` as a client writes it: escaped headers but in CONNECT and STOMP frames, whose values
/// are written as they are with `\r\n` line ends (a value may end with `\r`).
fn write(frame: &Frame) -> Vec<u8> {
    let raw = frame.command == "CONNECT" || frame.command == "STOMP";
    let mut out = frame.command.as_bytes().to_vec();
    out.push(b'\n');
    for (name, value) in &frame.headers {
        if raw {
            out.extend_from_slice(format!("{name}:{value}\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("{}:{}\n", escape(name), escape(value)).as_bytes());
        }
    }
    out.push(b'\n');
    out.extend_from_slice(&frame.body);
    out.push(0);
    out
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace(':', "\\c")
}
