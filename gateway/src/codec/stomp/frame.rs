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
    /// Whether header values are escaped (1.1, 1.2 "Value Encoding"; 1.0 has no escapes), but in
    /// CONNECT and CONNECTED frames, which never are.
    pub(crate) fn escapes(self) -> bool {
        self != Version::V10
    }

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
    next_frame_with(text, true)
}

/// [`next_frame`], with header values unescaped or (STOMP 1.0) taken as they are.
fn next_frame_with(text: &[u8], escaped: bool) -> Result<Next, String> {
    let start = text.len() - skip_eols(text).len();
    let Some((command, mut rest)) = line(&text[start..]) else {
        return Ok(Next::Incomplete("a frame needs a command line"));
    };
    let command = utf8(command)?.to_string();
    if command.is_empty() || !command.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("bad command {command:?}"));
    }
    // CONNECT and CONNECTED headers are not escaped, for 1.0 servers' sake (1.2 "Value Encoding").
    let escaped = escaped && command != "CONNECT" && command != "STOMP";
    let mut headers = Vec::new();
    loop {
        let Some((header, after)) = line(rest) else {
            return Ok(Next::Incomplete("the headers have no end (a blank line)"));
        };
        rest = after;
        if header.is_empty() {
            break;
        }
        // A NUL ends a frame: in a header, echoed (a receipt, a subscription id), it would cut the
        // client's frames short.
        if header.contains(&0) {
            return Err("a header holds a NUL byte".into());
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

/// The client's bytes read as a stream of frames: STOMP is a stream, and clients may split a frame
/// over WebSocket messages (stomp.js 2 splits frames over 16 KiB) or send several in one. Each byte
/// of a frame that comes in pieces is looked at a bounded number of times, whatever the pieces.
#[derive(Debug)]
pub(crate) struct FrameStream {
    /// The start of a frame the next bytes complete (no EOLs before it).
    kept: Vec<u8>,
    /// Where the kept frame ends, as far as its bytes tell yet.
    end: FrameEnd,
    max_frame_bytes: usize,
    /// Whether header values are escaped (not in STOMP 1.0).
    escaped: bool,
}

impl FrameStream {
    /// A stream whose frames may be at most `max_frame_bytes` long.
    pub(crate) fn new(max_frame_bytes: usize) -> FrameStream {
        FrameStream { kept: Vec::new(), end: FrameEnd::default(), max_frame_bytes, escaped: true }
    }

    /// The stream of a connection of `version`: its header values are escaped unless it is 1.0.
    pub(crate) fn of(version: Version, max_frame_bytes: usize) -> FrameStream {
        FrameStream { escaped: version.escapes(), ..FrameStream::new(max_frame_bytes) }
    }

    /// Reads the next `bytes`: the frames they complete, in order, and then the error that ends
    /// the stream, if any (a frame that cannot be read, or one longer than the limit).
    pub(crate) fn read(&mut self, bytes: &[u8]) -> (Vec<Frame>, Result<(), String>) {
        let mut frames = Vec::new();
        let read = self.read_into(bytes, &mut frames);
        if read.is_err() {
            (self.kept, self.end) = (Vec::new(), FrameEnd::default());
        }
        (frames, read)
    }

    fn read_into(&mut self, bytes: &[u8], frames: &mut Vec<Frame>) -> Result<(), String> {
        if self.kept.is_empty() {
            return self.read_whole(bytes, frames);
        }
        self.kept.extend_from_slice(bytes);
        // An EOL cut in two (`\r`, then `\n`) is known only now.
        let frame_start = self.kept.len() - skip_eols(&self.kept).len();
        if frame_start > 0 {
            self.kept.drain(..frame_start);
            self.end = FrameEnd::default();
            if self.kept.is_empty() {
                return Ok(());
            }
        }
        let Some(end) = self.end.find(&self.kept) else {
            return self.check_len(self.kept.len().max(self.end.declared()));
        };
        let kept = std::mem::take(&mut self.kept);
        self.end = FrameEnd::default();
        let (frame, rest) = kept.split_at(end);
        self.check_len(frame.len())?;
        match next_frame_with(frame, self.escaped)? {
            Next::Frame(frame, _) => frames.push(frame),
            Next::Incomplete(why) => return Err(why.into()),
        }
        self.read_whole(rest, frames)
    }

    /// Reads `bytes` when nothing is kept: whole frames, then the start of one to keep. A frame is
    /// refused once it is all there (or past the limit), however it came.
    fn read_whole(&mut self, bytes: &[u8], frames: &mut Vec<Frame>) -> Result<(), String> {
        let mut rest = skip_eols(bytes);
        while !rest.is_empty() {
            match next_frame_with(rest, self.escaped) {
                Ok(Next::Frame(frame, used)) => {
                    self.check_len(used)?;
                    frames.push(frame);
                    rest = skip_eols(&rest[used..]);
                }
                Err(error) if self.end.find(rest).is_some() => return Err(error),
                Ok(Next::Incomplete(_)) | Err(_) => {
                    self.check_len(rest.len())?;
                    // A length past the limit is refused from the headers, not once that much came.
                    self.end.find(rest);
                    self.check_len(self.end.declared())?;
                    self.kept = rest.to_vec();
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn check_len(&self, len: usize) -> Result<(), String> {
        if len > self.max_frame_bytes {
            return Err(format!("a frame longer than {} bytes", self.max_frame_bytes));
        }
        Ok(())
    }
}

/// Where a frame that comes in pieces ends, found without reading its bytes again: first the blank
/// line after its headers, then its `content-length` or the NUL after its body.
#[derive(Debug, Default)]
struct FrameEnd {
    /// How far the bytes were searched.
    scanned: usize,
    /// Where the body starts and its `content-length`, once the headers are all there.
    body: Option<(usize, Option<usize>)>,
}

impl FrameEnd {
    /// The length of the frame `bytes` start with (no EOLs before it), once it is all there.
    fn find(&mut self, bytes: &[u8]) -> Option<usize> {
        let (start, length) = match self.body {
            Some(body) => body,
            None => {
                // From two bytes back: the blank line may have begun in the last piece.
                let from = self.scanned.saturating_sub(2);
                let Some(start) = body_start(&bytes[from..]).map(|at| from + at) else {
                    self.scanned = bytes.len();
                    return None;
                };
                let body = (start, content_length(&bytes[..start]));
                (self.body, self.scanned) = (Some(body), start);
                body
            }
        };
        if let Some(length) = length {
            // A length past any buffer is never all there: the stream's limit ends the frame.
            let end = start.checked_add(length)?;
            return (bytes.len() > end).then_some(end + 1);
        }
        let from = self.scanned.max(start);
        match memchr::memchr(0, &bytes[from..]) {
            Some(at) => Some(from + at + 1),
            None => {
                self.scanned = bytes.len();
                None
            }
        }
    }
}

impl FrameEnd {
    /// The length of the whole frame its `content-length` declares, once its headers are all there
    /// (0 before).
    fn declared(&self) -> usize {
        match self.body {
            Some((start, Some(length))) => start.saturating_add(length).saturating_add(1),
            _ => 0,
        }
    }
}

/// Where the body starts after the blank line that ends the headers (`\n\n` or `\n\r\n`).
fn body_start(text: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', text).find_map(|at| match &text[at + 1..] {
        [b'\n', ..] => Some(at + 2),
        [b'\r', b'\n', ..] => Some(at + 3),
        _ => None,
    })
}

/// The first `content-length` among `head`'s headers, if it is a number.
fn content_length(head: &[u8]) -> Option<usize> {
    let line = head.split(|byte| *byte == b'\n').skip(1).find(|line| line.starts_with(b"content-length:"))?;
    let value = &line[b"content-length:".len()..];
    std::str::from_utf8(value.strip_suffix(b"\r").unwrap_or(value)).ok()?.parse().ok()
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

/// Whether escaping changes `value` (STOMP 1.1 and 1.2 escape a backslash, line breaks and `:`).
pub(crate) fn escapes(value: &str) -> bool {
    value.contains(['\\', '\n', '\r', ':'])
}

/// A header value as written in a frame (1.1, 1.2 "Value Encoding").
pub(crate) fn escape(value: &str) -> Cow<'_, str> {
    if !escapes(value) {
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
    push_header_with(out, name, value, true);
}

/// Appends `name:value\n`, the value escaped or (`escaped` false: STOMP 1.0, CONNECTED) as it is.
pub(crate) fn push_header_with(out: &mut Vec<u8>, name: &str, value: &str, escaped: bool) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    match escaped {
        true => out.extend_from_slice(escape(value).as_bytes()),
        // A line break would end the header (ids cannot hold one; a close's reason might).
        false => out.extend(value.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b })),
    }
    out.push(b'\n');
}

/// A whole server frame (its transport puts it in a WebSocket message, see [`super::Transport`]).
/// Header values are escaped, or (`escaped` false: STOMP 1.0, CONNECTED) written as they are.
pub(crate) fn encode(command: &str, headers: &[(&str, &str)], body: &[u8], escaped: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 64 + body.len());
    out.extend_from_slice(command.as_bytes());
    out.push(b'\n');
    for (name, value) in headers {
        push_header_with(&mut out, name, value, escaped);
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
        assert_eq!(
            next_frame(b"SUBSCRIBE\nid:1\0x\ndestination:/topic/all\n\n\0"),
            Err("a header holds a NUL byte".into())
        );
    }

    fn read_in_pieces(stream: &mut FrameStream, pieces: &[&[u8]]) -> (Vec<Frame>, Result<(), String>) {
        let mut frames = Vec::new();
        for piece in pieces {
            let (read, outcome) = stream.read(piece);
            frames.extend(read);
            if outcome.is_err() {
                return (frames, outcome);
            }
        }
        (frames, Ok(()))
    }

    #[test]
    fn a_stream_reads_the_same_frames_however_it_is_cut() {
        let stream = b"\nSEND\r\ndestination:/a\r\n\r\nx\0\n\nSEND\ncontent-length:3\n\n\0y\0\0ACK\nid:1\n\n\0\n";
        let (whole, outcome) = FrameStream::new(1024).read(stream);
        assert_eq!((whole.len(), outcome), (3, Ok(())));
        assert_eq!((whole[0].body.as_slice(), whole[1].body.as_slice()), (&b"x"[..], &b"\0y\0"[..]));
        for first in 0..stream.len() {
            for second in first..stream.len() {
                let pieces = [&stream[..first], &stream[first..second], &stream[second..]];
                let mut reader = FrameStream::new(1024);
                assert_eq!(read_in_pieces(&mut reader, &pieces), (whole.clone(), Ok(())), "cut at {first}, {second}");
                assert!(reader.kept.is_empty());
            }
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(read_in_pieces(&mut FrameStream::new(1024), &bytes).0, whole, "byte by byte");
    }

    #[test]
    fn a_frame_longer_than_the_limit_is_refused_whole_or_in_pieces() {
        let frame = |len: usize| {
            let mut frame = b"SEND\n\n".to_vec();
            frame.resize(len - 1, b'x');
            frame.push(0);
            frame
        };
        let (exact, longer) = (frame(100), frame(101));
        let mut eols = b"\n\n\n".to_vec();
        eols.extend_from_slice(&exact);
        assert_eq!(FrameStream::new(100).read(&eols).1, Ok(()), "EOLs before a frame are not in it");
        let refused = Err("a frame longer than 100 bytes".to_string());
        assert_eq!(FrameStream::new(100).read(&longer).1, refused);
        for cut in [1, 50, 100] {
            let mut stream = FrameStream::new(100);
            let (frames, outcome) = read_in_pieces(&mut stream, &[&exact[..cut], &exact[cut..]]);
            assert_eq!((frames.len(), outcome), (1, Ok(())), "cut at {cut}");
            let (frames, outcome) = read_in_pieces(&mut stream, &[&longer[..cut], &longer[cut..]]);
            assert_eq!((frames.len(), outcome), (0, refused.clone()), "cut at {cut}");
            assert!(stream.kept.is_empty(), "nothing is kept after an error");
        }
    }

    #[test]
    fn a_content_length_past_the_limit_is_refused_once_the_headers_are_there() {
        let refused = Err("a frame longer than 100 bytes".to_string());
        for length in [usize::MAX, 99_999_999_999, 76] {
            let head = format!("SEND\ncontent-length:{length}\n\nabc");
            for pieces in [vec![head.as_bytes()], vec![&head.as_bytes()[..10], &head.as_bytes()[10..]]] {
                let mut stream = FrameStream::new(100);
                assert_eq!(read_in_pieces(&mut stream, &pieces), (Vec::new(), refused.clone()), "{length}");
                assert!(stream.kept.is_empty(), "nothing is kept after an error");
            }
        }
        // A length within the limit waits for its body.
        let mut stream = FrameStream::new(100);
        assert_eq!(stream.read(b"SEND\ncontent-length:75\n\nabc"), (Vec::new(), Ok(())));
    }

    #[test]
    fn a_value_written_unescaped_keeps_to_its_line() {
        let bytes = encode("ERROR", &[("message", "a:b\r\nc")], b"", false);
        assert_eq!(&bytes[..], b"ERROR\nmessage:a:b  c\n\n\0");
    }

    #[test]
    fn encodes_a_frame_with_escaped_headers_and_its_length() {
        let bytes = encode("RECEIPT", &[("receipt-id", "a:b")], b"", true);
        assert_eq!(&bytes[..], b"RECEIPT\nreceipt-id:a\\cb\n\n\0");
        let bytes = encode("ERROR", &[("message", "bad")], b"why", true);
        assert_eq!(&bytes[..], b"ERROR\nmessage:bad\ncontent-length:3\n\nwhy\0");
    }
}
