//! STOMP frames as text (STOMP 1.2 "Frames and headers", also 1.1 and 1.0): parsing what a client
//! sends in one message, and writing frames.

use std::borrow::Cow;

/// A protocol version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    V10,
    V11,
    V12,
}

impl Version {
    /// The version of an `accept-version` value or a `vNN.stomp` subprotocol.
    pub(crate) fn parse(text: &str) -> Option<Version> {
        match text.trim() {
            "1.0" | "v10.stomp" => Some(Version::V10),
            "1.1" | "v11.stomp" => Some(Version::V11),
            "1.2" | "v12.stomp" => Some(Version::V12),
            _ => None,
        }
    }

    pub(crate) fn number(self) -> &'static str {
        match self {
            Version::V10 => "1.0",
            Version::V11 => "1.1",
            Version::V12 => "1.2",
        }
    }

    pub(crate) fn subprotocol(self) -> &'static str {
        match self {
            Version::V10 => "v10.stomp",
            Version::V11 => "v11.stomp",
            Version::V12 => "v12.stomp",
        }
    }
}

/// A client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) command: String,
    /// In order; a repeated header's first value is the one that counts (1.2 "Repeated Header
    /// Entries").
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Frame {
    /// The value of header `name`, if the frame has it.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// Reads the frame in one WebSocket text message: `None` when it holds only heart-beats (EOLs).
/// One whole frame; anything but EOLs after it is refused (the first frame of a connection, which
/// must come alone).
pub(crate) fn parse(text: &[u8]) -> Result<Option<Frame>, String> {
    if skip_eols(text).is_empty() {
        return Ok(None);
    }
    match next_frame(text)? {
        Next::Frame(frame, used) if skip_eols(&text[used..]).is_empty() => Ok(Some(frame)),
        Next::Frame(..) => Err("one frame per WebSocket message".into()),
        Next::Incomplete(why) => Err(why.into()),
    }
}

/// What the start of a client's bytes holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// A whole frame, and how many bytes it took (with the EOLs before it).
    Frame(Frame, usize),
    /// The start of a frame (or nothing but EOLs): what it still lacks.
    Incomplete(&'static str),
}

/// Reads the frame at the start of `text`, which may be a part of the client's bytes: STOMP is a
/// stream, and clients may split a frame over WebSocket messages (stomp.js 2 splits frames over
/// 16 KiB) or send several in one.
pub(crate) fn next_frame(text: &[u8]) -> Result<Next, String> {
    let start = text.len() - skip_eols(text).len();
    let Some((command, mut rest)) = line(&text[start..]) else {
        return Ok(Next::Incomplete("a frame needs a command line"));
    };
    let command = utf8(command)?.to_string();
    if command.is_empty() || !command.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("bad command {command:?}"));
    }
    // CONNECT and CONNECTED headers are not escaped, for 1.0 servers' sake (1.2 "Value Encoding").
    let escaped = command != "CONNECT" && command != "STOMP";
    let mut headers = Vec::new();
    loop {
        let Some((header, after)) = line(rest) else {
            return Ok(Next::Incomplete("the headers have no end (a blank line)"));
        };
        rest = after;
        if header.is_empty() {
            break;
        }
        let header = utf8(header)?;
        let (name, value) = header.split_once(':').ok_or_else(|| format!("header {header:?} has no colon"))?;
        let (name, value) = if escaped { (unescape(name)?, unescape(value)?) } else { (name.into(), value.into()) };
        headers.push((name, value));
    }
    let frame = Frame { command, headers, body: Vec::new() };
    let body_len = match frame.header("content-length") {
        Some(length) => {
            let length: usize = length.parse().map_err(|_| format!("bad content-length {length:?}"))?;
            match rest.get(length) {
                None => return Ok(Next::Incomplete("the body does not end with NUL at its content-length")),
                Some(0) => length,
                Some(_) => return Err("the body does not end with NUL at its content-length".into()),
            }
        }
        None => match memchr::memchr(0, rest) {
            Some(end) => end,
            None => return Ok(Next::Incomplete("the frame does not end with NUL")),
        },
    };
    let used = text.len() - rest.len() + body_len + 1;
    Ok(Next::Frame(Frame { body: rest[..body_len].to_vec(), ..frame }, used))
}

/// The line at the start of `text` (without its `\n` or `\r\n`), and what follows it.
fn line(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(b'\n', text)?;
    let line = &text[..end];
    Some((line.strip_suffix(b"\r").unwrap_or(line), &text[end + 1..]))
}

/// `text` after the EOLs (heart-beats) it starts with.
pub(crate) fn skip_eols(mut text: &[u8]) -> &[u8] {
    loop {
        text = match text {
            [b'\n', rest @ ..] | [b'\r', b'\n', rest @ ..] => rest,
            _ => return text,
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|_| "a header is not UTF-8".to_string())
}

fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('r') => '\r',
            Some('c') => ':',
            Some('\\') => '\\',
            other => return Err(format!("undefined escape \\{}", other.map(String::from).unwrap_or_default())),
        });
    }
    Ok(out)
}

/// A header value as written in a frame (1.1, 1.2 "Value Encoding").
pub(crate) fn escape(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '\n', '\r', ':']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' => out.push_str("\\c"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Appends `name:value\n`, the value escaped.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    out.extend_from_slice(escape(value).as_bytes());
    out.push(b'\n');
}

/// A whole server frame (its transport puts it in a WebSocket message, see [`super::Transport`]).
pub(crate) fn encode(command: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 64 + body.len());
    out.extend_from_slice(command.as_bytes());
    out.push(b'\n');
    for (name, value) in headers {
        push_header(&mut out, name, value);
    }
    if !body.is_empty() {
        push_header(&mut out, "content-length", &body.len().to_string());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Frame {
        parse(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn parses_frames_with_and_without_content_length() {
        let send = frame("\n\r\nSEND\r\ndestination:/app/echo\nreceipt:r\\c1\n\n{\"a\":1}\0\n");
        assert_eq!(send.command, "SEND");
        assert_eq!(send.header("destination"), Some("/app/echo"));
        assert_eq!(send.header("receipt"), Some("r:1"));
        assert_eq!(send.body, b"{\"a\":1}");
        let binary = frame("SEND\ndestination:/app/x\ncontent-length:3\n\na\0b\0");
        assert_eq!(binary.body, b"a\0b");
        let connect = frame("CONNECT\npasscode:a\\b\nhost:h\nhost:other\n\n\0");
        assert_eq!((connect.header("passcode"), connect.header("host")), (Some("a\\b"), Some("h")));
        assert_eq!(parse(b"\n"), Ok(None));
    }

    #[test]
    fn refuses_malformed_frames() {
        for bad in [
            "SEND\ndestination:/app/x\n\nno nul",
            "SEND\ndestination /app/x\n\n\0",
            "send\n\n\0",
            "SEND\nreceipt:\\t\n\n\0",
            "SEND\ncontent-length:9\n\nshort\0",
            "SEND\n\n\0SEND\n\n\0",
            "SEND\nno blank line",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_a_stream_of_frames_split_anywhere() {
        let stream = b"\nSEND\ndestination:/a\n\nx\0\nSEND\ncontent-length:2\n\n\0y\0";
        let Ok(Next::Frame(first, used)) = next_frame(stream) else { panic!() };
        assert_eq!((first.body.as_slice(), used), (&b"x"[..], 24));
        let Ok(Next::Frame(second, _)) = next_frame(&stream[used..]) else { panic!() };
        assert_eq!(second.body, b"\0y");
        for cut in 0..stream.len() {
            if let Ok(Next::Frame(_, used)) = next_frame(&stream[..cut]) {
                assert!(used <= cut);
            } else {
                assert!(matches!(next_frame(&stream[..cut]), Ok(Next::Incomplete(_))), "cut at {cut}");
            }
        }
        assert!(next_frame(b"SEND\ncontent-length:1\n\nab\0").is_err(), "no NUL at the length");
        assert!(next_frame(b"send\n").is_err(), "a bad command is known at once");
    }

    #[test]
    fn encodes_a_frame_with_escaped_headers_and_its_length() {
        let bytes = encode("RECEIPT", &[("receipt-id", "a:b")], b"");
        assert_eq!(&bytes[..], b"RECEIPT\nreceipt-id:a\\cb\n\n\0");
        let bytes = encode("ERROR", &[("message", "bad")], b"why");
        assert_eq!(&bytes[..], b"ERROR\nmessage:bad\ncontent-length:3\n\nwhy\0");
    }
}
