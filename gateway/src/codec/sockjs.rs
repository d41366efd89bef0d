//! SockJS framing over its WebSocket transport (the SockJS protocol 0.3, as sockjs-client and
//! Spring's `withSockJS()` speak it): what STOMP pages written for Spring's SockJS endpoints need
//! to connect unchanged (docs/protocols.md, "STOMP over SockJS").
//!
//! Inside each WebSocket text message the server sends `o` once when the session opens, `h` as a
//! heartbeat, `a[…]` with messages (a JSON array of strings) and `c[code,"reason"]` before it
//! closes. The client sends a JSON array of strings (or one string). A message is JSON-escaped
//! piece by piece: escaping is done per character, so the escaped pieces of a frame concatenate to
//! the escaped frame, and a STOMP MESSAGE keeps its per-socket head apart from its shared tail.

use std::borrow::Cow;

use bytes::Bytes;

use crate::websocket::frame as ws;

/// The start of a message frame, before the first message's escaped text.
pub(crate) const MESSAGES_START: &[u8] = b"a[\"";
/// The end of a message frame holding one message, after its escaped text.
pub(crate) const MESSAGES_END: &[u8] = b"\"]";

/// The frame that opens a session.
pub(crate) fn open() -> Bytes {
    ws::text(b"o")
}

/// A SockJS heartbeat.
pub(crate) fn heartbeat() -> Bytes {
    ws::text(b"h")
}

/// One message in one WebSocket text frame: `a["<message>"]`.
pub(crate) fn message(text: &[u8]) -> Bytes {
    let mut payload = Vec::with_capacity(text.len() + text.len() / 8 + 8);
    payload.extend_from_slice(MESSAGES_START);
    escape_into(&mut payload, text);
    payload.extend_from_slice(MESSAGES_END);
    ws::text(&payload)
}

/// The close frame's payload: `c[code,"reason"]`, for the client's close event.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let reason = serde_json::to_string(reason).unwrap_or_else(|_| "\"\"".into());
    format!("c[{code},{reason}]").into_bytes()
}

/// The close frame, then the WebSocket close.
pub(crate) fn close(code: u16, reason: &str) -> Bytes {
    let mut bytes = ws::text(&close_payload(code, reason)).to_vec();
    bytes.extend_from_slice(&ws::close(code, reason));
    Bytes::from(bytes)
}

/// Appends `text` as the inside of a JSON string. Bytes that are not UTF-8 (a SockJS message is
/// text) become U+FFFD.
pub(crate) fn escape_into(out: &mut Vec<u8>, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            // Control characters, and the line separators some JavaScript parsers took for line ends.
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
}

/// The messages of what a client sent: a JSON array of strings, or one JSON string. An empty
/// WebSocket message holds none. A lone surrogate escape (a client that cut a string between the
/// two halves of a character, as stomp.js 2 cuts long frames) reads as U+FFFD, as browsers and
/// Spring read it.
pub(crate) fn parse(text: &[u8]) -> Result<Vec<String>, String> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let text = &*without_lone_surrogates(text);
    if let Ok(messages) = serde_json::from_slice::<Vec<String>>(text) {
        return Ok(messages);
    }
    serde_json::from_slice::<String>(text)
        .map(|message| vec![message])
        .map_err(|_| "a SockJS message must be a JSON array of strings".to_string())
}

/// `text` with each `\uXXXX` escape of a surrogate that is not half of a pair replaced by `\ufffd`.
fn without_lone_surrogates(text: &[u8]) -> Cow<'_, [u8]> {
    let unit_at = |at: usize| -> Option<u16> {
        let hex = text.get(at..at + 6)?.strip_prefix(b"\\u")?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let (mut out, mut copied, mut at) = (Vec::new(), 0, 0);
    while let Some(found) = memchr::memchr(b'\\', &text[at..]) {
        let start = at + found;
        at = match unit_at(start) {
            Some(0xD800..=0xDBFF) if matches!(unit_at(start + 6), Some(0xDC00..=0xDFFF)) => start + 12,
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(&text[copied..start]);
                out.extend_from_slice(b"\\ufffd");
                copied = start + 6;
                copied
            }
            // Any other escape is two bytes at least (so `\\` never starts another).
            _ => (start + 2).min(text.len()),
        };
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.extend_from_slice(&text[copied..]);
    Cow::Owned(out)
}

/// The longest server or session name (sockjs-client's are 3 digits and 8 characters).
const MAX_SEGMENT_BYTES: usize = 64;

/// Whether a path segment can name a SockJS server or session: not empty, no dot, no slash, at
/// most 64 bytes (session names are kept in memory, by name).
pub(crate) fn valid_segment(segment: &str) -> bool {
    !segment.is_empty() && segment.len() <= MAX_SEGMENT_BYTES && !segment.contains(['.', '/'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> &[u8] {
        &frame[2..]
    }

    #[test]
    fn frames_as_the_protocol_writes_them() {
        assert_eq!(payload(&open()), b"o");
        assert_eq!(payload(&heartbeat()), b"h");
        assert_eq!(
            payload(&message(b"MESSAGE\nid:1\n\n{\"a\":\"\\\"}\0")),
            br#"a["MESSAGE\nid:1\n\n{\"a\":\"\\\"}\u0000"]"#
        );
        assert_eq!(close_payload(4008, "too \"slow\""), br#"c[4008,"too \"slow\""]"#);
    }

    #[test]
    fn escaped_pieces_concatenate_to_the_escaped_whole() {
        let whole = "MESSAGE\nsubscription:é\n\n\u{2028}{\"x\":1}\0";
        let (head, tail) = whole.split_at(whole.find("\n\n").unwrap());
        let mut pieces = Vec::new();
        escape_into(&mut pieces, head.as_bytes());
        escape_into(&mut pieces, tail.as_bytes());
        let mut at_once = Vec::new();
        escape_into(&mut at_once, whole.as_bytes());
        assert_eq!(pieces, at_once);
        let decoded: String = serde_json::from_slice(&[b"\"", &at_once[..], b"\""].concat()).unwrap();
        assert_eq!(decoded, whole);
    }

    #[test]
    fn client_messages_are_an_array_or_one_string() {
        assert_eq!(parse(br#"["CONNECT\n\n\u0000","\n"]"#), Ok(vec!["CONNECT\n\n\0".to_string(), "\n".to_string()]));
        assert_eq!(parse(br#""SEND\n\n\u0000""#), Ok(vec!["SEND\n\n\0".to_string()]));
        assert_eq!(parse(b""), Ok(vec![]));
        assert!(parse(b"CONNECT\n\n\0").is_err());
        assert!(parse(br#"[1,2]"#).is_err());
        assert!(valid_segment("123") && !valid_segment("") && !valid_segment("a.b") && !valid_segment("a/b"));
    }

    #[test]
    fn a_lone_surrogate_reads_as_the_replacement_character() {
        let lone = [r#"["a\ud83d"]"#, r#"["\ude00b"]"#, r#"["\ud83d\ud83d\ude00"]"#, r#"["\udc00\\ud800"]"#];
        let read = ["a\u{fffd}", "\u{fffd}b", "\u{fffd}\u{1f600}", "\u{fffd}\\ud800"];
        for (lone, read) in lone.iter().zip(read) {
            assert_eq!(parse(lone.as_bytes()), Ok(vec![read.to_string()]), "{lone}");
        }
        assert_eq!(parse(br#"["\ud83d\ude00 \\ \u00e9"]"#), Ok(vec!["\u{1f600} \\ \u{e9}".to_string()]));
        assert!(parse(br#"["\"#).is_err());
    }
}
