//! STOMP frames as a client sends them, one per WebSocket text message, and the codec that reads
//! them on a connected session.

use std::time::Duration;

use crate::codec::stomp::{Connected, Frame, StompCodec, Transport, Version, parse};
use crate::codec::{Codec, Command, Refusal, sockjs};
use crate::http::stomp::heart_beat;

/// Any WebSocket text messages: `parse` never panics, a frame it reads written out again reads the
/// same, a `heart-beat` header is accepted only as two numbers (capped at 10 minutes), and the codec of a connected
/// session makes at most one command of each message.
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
    let mut codec = Codec::Stomp(Box::new(StompCodec::new(connected, Duration::ZERO, Transport::WebSocket)));
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
        assert_eq!(decoded.len(), 1, "one message, one outcome");
        if let [Ok(Command::Subscribe { topic, .. })] = decoded.as_slice() {
            assert!(topic == "news" || topic.starts_with("room-"), "topic {topic:?} outside the claim");
        }
        if matches!(decoded.as_slice(), [Err(Refusal::Close(_))]) {
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
    let mut codec = Codec::Stomp(Box::new(StompCodec::new(connected, Duration::ZERO, Transport::SockJs)));
    for message in data[1..].split(|byte| *byte == 0xFF) {
        if let Ok(text) = std::str::from_utf8(message) {
            let mut escaped = b"[\"".to_vec();
            sockjs::escape_into(&mut escaped, message);
            escaped.extend_from_slice(b"\"]");
            assert_eq!(sockjs::parse(&escaped), Ok(vec![text.to_string()]), "{text:?} escaped as {escaped:?}");
        }
        let decoded = codec.decode(message);
        match sockjs::parse(message) {
            Ok(frames) => {
                assert!(decoded.len() <= frames.len(), "{} outcomes of {} frames", decoded.len(), frames.len())
            }
            Err(_) => assert!(matches!(decoded.as_slice(), [Err(Refusal::Close(_))]), "bad framing closes"),
        }
        if matches!(decoded.last(), Some(Err(Refusal::Close(_)))) {
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
