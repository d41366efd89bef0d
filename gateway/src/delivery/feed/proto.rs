//! The part of the NATS client protocol the delivery feed speaks: parsing what the server sends
//! (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`) from a read buffer, and writing what the
//! feed sends (`CONNECT`, `SUB`, `UNSUB`, `PUB`, `PING`, `PONG`). Pure: no I/O, no clock.

use bytes::{Buf, Bytes, BytesMut};

/// A message the server delivered on one of the feed's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) sid: u64,
    pub(crate) subject: Bytes,
    /// The header block (`NATS/1.0…\r\n\r\n`), empty for a `MSG`.
    pub(crate) headers: Bytes,
    pub(crate) payload: Bytes,
}

impl Delivered {
    /// The last value of header `name` (case-insensitive), read in place (see [`header`]).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The status of an answer from the server: none for a stored message, which carries its
    /// `Nats-Sequence` whatever its first line says (NATS servers before 2.14 keep a publisher's
    /// status line in what they store, and a direct get answers with it).
    pub(crate) fn answer_status(&self) -> Option<u16> {
        self.header("Nats-Sequence").is_none().then(|| self.status()).flatten()
    }

    /// The status code of the header block's first line (`NATS/1.0 503` → 503), if any.
    pub(crate) fn status(&self) -> Option<u16> {
        let text = std::str::from_utf8(&self.headers).ok()?;
        let first = text.split("\r\n").next()?;
        first.strip_prefix("NATS/1.0")?.split_whitespace().next()?.parse().ok()
    }
}

/// The last value of header `name` (in any case) in a NATS header block, when it is text. The
/// last: the stream adds its own headers (`Nats-Sequence`, `Nats-Time-Stamp`, …) after the
/// publisher's, who may have set the same names. Each line is read on its own: a publisher's line
/// that is not text, or has no `:`, hides nothing else.
pub(crate) fn header<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    let value = block
        .split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (key, value) = (&line[..colon], &line[colon + 1..]);
            key.trim_ascii().eq_ignore_ascii_case(name.as_bytes()).then_some(value)
        })
        .last()?;
    std::str::from_utf8(value.trim_ascii()).ok()
}

/// One operation from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerOp {
    Info(Bytes),
    Msg(Delivered),
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// The server sent something this client cannot read: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS protocol error: {0}")]
pub(crate) struct ProtocolError(pub(crate) String);

/// Control lines longer than this are refused (the server's own limit is 4 KiB).
const MAX_CONTROL_LINE: usize = 16 * 1024;

/// Takes the next complete operation out of `buf`, or `None` if more bytes are needed.
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<ServerOp>, ProtocolError> {
    // Looked for where the longest line would end, so that a longer one is refused however the
    // bytes arrive (not only while its CRLF has not).
    let Some(end) = memchr::memmem::find(&buf[..buf.len().min(MAX_CONTROL_LINE + 2)], b"\r\n") else {
        if buf.len() >= MAX_CONTROL_LINE + 2 {
            return Err(ProtocolError("control line too long".into()));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProtocolError("control line not UTF-8".into()))?;
    let (op, args) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let op = op.to_ascii_uppercase();
    let simple = match op.as_str() {
        "PING" => Some(ServerOp::Ping),
        "PONG" => Some(ServerOp::Pong),
        "+OK" => Some(ServerOp::Ok),
        "-ERR" => Some(ServerOp::Err(args.trim().trim_matches('\'').to_string())),
        "INFO" => Some(ServerOp::Info(Bytes::copy_from_slice(args.trim().as_bytes()))),
        "MSG" | "HMSG" => None,
        other => return Err(ProtocolError(format!("unknown operation {other:?}"))),
    };
    if let Some(op) = simple {
        buf.advance(end + 2);
        return Ok(Some(op));
    }
    let header = parse_msg_line(args, op == "HMSG")?;
    // The control line, the message and the CRLFs after each; a size near usize::MAX overflows.
    let total = header.total.checked_add(end + 4).ok_or_else(|| ProtocolError(format!("message size {args:?}")))?;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let subject = frame.slice(header.subject.0..header.subject.1);
    frame.advance(end + 2);
    let headers = frame.split_to(header.header_len);
    let payload = frame.split_to(header.total - header.header_len);
    if &frame[..] != b"\r\n" {
        return Err(ProtocolError("message not followed by CRLF".into()));
    }
    Ok(Some(ServerOp::Msg(Delivered { sid: header.sid, subject, headers, payload })))
}

struct MsgLine {
    /// Byte range of the subject within the control line (= within the buffer).
    subject: (usize, usize),
    sid: u64,
    header_len: usize,
    total: usize,
}

/// `<subject> <sid> [reply] <size>` or, for `HMSG`, `<subject> <sid> [reply] <header size> <size>`.
fn parse_msg_line(args: &str, with_headers: bool) -> Result<MsgLine, ProtocolError> {
    let bad = || ProtocolError(format!("bad message line {args:?}"));
    let fields: Vec<&str> = args.split_ascii_whitespace().collect();
    let sizes = if with_headers { 2 } else { 1 };
    if fields.len() != 2 + sizes && fields.len() != 3 + sizes {
        return Err(bad());
    }
    let number = |text: &str| text.parse::<usize>().map_err(|_| bad());
    let total = number(fields[fields.len() - 1])?;
    let header_len = if with_headers { number(fields[fields.len() - 2])? } else { 0 };
    if header_len > total {
        return Err(bad());
    }
    let sid = fields[1].parse::<u64>().map_err(|_| bad())?;
    // The subject's offset: the op name and one separator come before the arguments.
    let prefix = if with_headers { "HMSG ".len() } else { "MSG ".len() };
    // The same whitespace as the split above: `trim_start` would also skip a vertical tab or a
    // Unicode space, which are part of the subject there.
    let start = prefix + (args.len() - args.trim_start_matches(|c: char| c.is_ascii_whitespace()).len());
    Ok(MsgLine { subject: (start, start + fields[0].len()), sid, header_len, total })
}

/// Appends `CONNECT <json>\r\nPING\r\n`: the PING's PONG confirms the server accepted us.
pub(crate) fn connect(out: &mut BytesMut, options: &serde_json::Value) {
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(options.to_string().as_bytes());
    out.extend_from_slice(b"\r\nPING\r\n");
}

/// Appends `SUB <subject> <sid>\r\n`.
pub(crate) fn sub(out: &mut BytesMut, subject: &str, sid: u64) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

/// Appends `UNSUB <sid>\r\n`.
pub(crate) fn unsub(out: &mut BytesMut, sid: u64) {
    out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
}

/// Appends `PUB <subject> <reply> <size>\r\n<payload>\r\n`.
pub(crate) fn publish(out: &mut BytesMut, subject: &str, reply: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub(crate) const PING: &[u8] = b"PING\r\n";
pub(crate) const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<ServerOp> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buf).unwrap() {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        ops
    }

    #[test]
    fn parses_every_operation() {
        let headers = "NATS/1.0\r\nNats-Sequence: 125\r\nnats-last-sequence: 120\r\n\r\n";
        let input = format!(
            "INFO {{\"max_payload\":1048576}}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Authorization Violation'\r\n\
             MSG herald.deliver.all 7 5\r\nhello\r\n\
             HMSG herald.deliver.user.42 9 _INBOX.x {} {}\r\n{headers}{{\"a\":1}}\r\n",
            headers.len(),
            headers.len() + 7
        );
        let ops = parse_all(input.as_bytes());
        assert_eq!(ops[0], ServerOp::Info(Bytes::from_static(b"{\"max_payload\":1048576}")));
        assert_eq!(ops[1..4], [ServerOp::Ping, ServerOp::Pong, ServerOp::Ok]);
        assert_eq!(ops[4], ServerOp::Err("Authorization Violation".into()));
        let ServerOp::Msg(plain) = &ops[5] else { panic!("{:?}", ops[5]) };
        assert_eq!((plain.sid, &plain.subject[..], &plain.payload[..]), (7, &b"herald.deliver.all"[..], &b"hello"[..]));
        assert!(plain.headers.is_empty());
        let ServerOp::Msg(with_headers) = &ops[6] else { panic!("{:?}", ops[6]) };
        assert_eq!((with_headers.sid, &with_headers.subject[..]), (9, &b"herald.deliver.user.42"[..]));
        assert_eq!(&with_headers.payload[..], b"{\"a\":1}");
        assert_eq!(with_headers.header("Nats-Sequence"), Some("125"));
        assert_eq!(with_headers.header("NATS-LAST-SEQUENCE"), Some("120"));
        assert_eq!(with_headers.header("Herald-Type"), None);
        assert_eq!(with_headers.status(), None);
    }

    #[test]
    fn a_stored_message_has_no_status_whatever_its_first_line_says() {
        let delivered = |headers: &'static str| Delivered {
            sid: 1,
            subject: Bytes::from_static(b"_INBOX.x"),
            headers: Bytes::from_static(headers.as_bytes()),
            payload: Bytes::new(),
        };
        let stored = delivered("NATS/1.0 503 No Responders\r\nHerald-Type: a\r\nNats-Sequence: 7\r\n\r\n");
        assert_eq!((stored.status(), stored.answer_status()), (Some(503), None));
        assert_eq!(delivered("NATS/1.0 404 No Messages\r\n\r\n").answer_status(), Some(404));
        assert_eq!(delivered("NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\n\r\n").answer_status(), Some(204));
    }

    #[test]
    fn the_streams_own_headers_win_and_a_publishers_bad_line_hides_nothing() {
        let block = b"NATS/1.0\r\nNats-Sequence: 900000000\r\nX-Custom: caf\xe9\r\nno colon\r\n\
                      Herald-Type: mail\r\nNats-Sequence: 247\r\n\r\n";
        assert_eq!(header(block, "Nats-Sequence"), Some("247"), "the stream's, added after the publisher's");
        assert_eq!(header(block, "herald-type"), Some("mail"));
        assert_eq!(header(block, "X-Custom"), None, "not text");
    }

    #[test]
    fn waits_for_whole_messages_however_the_bytes_are_cut() {
        let input = b"MSG a.b 1 3\r\nabc\r\nHMSG c 2 12 14\r\nNATS/1.0\r\n\r\nhi\r\nPING\r\n";
        for cut in 0..input.len() {
            let mut buf = BytesMut::from(&input[..cut]);
            let mut ops = Vec::new();
            while let Some(op) = parse(&mut buf).unwrap() {
                ops.push(op);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(op) = parse(&mut buf).unwrap() {
                ops.push(op);
            }
            assert_eq!(ops.len(), 3, "cut at {cut}");
            assert_eq!(ops[2], ServerOp::Ping);
        }
    }

    #[test]
    fn reads_no_responders_status() {
        let input = b"HMSG _INBOX.x.1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n";
        let ServerOp::Msg(message) = &parse_all(input)[0] else { panic!() };
        assert_eq!(message.status(), Some(503));
        assert!(message.payload.is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            &b"WHAT\r\n"[..],
            b"MSG a 1\r\n",
            b"MSG a x 3\r\nabc\r\n",
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"MSG a 1 3\r\nabcXY",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(parse(&mut buf).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut endless = BytesMut::from(&vec![b'x'; MAX_CONTROL_LINE + 2][..]);
        assert!(parse(&mut endless).is_err());
    }

    #[test]
    fn a_long_control_line_is_refused_however_it_arrives() {
        let line = |len: usize| format!("-ERR {}\r\n", "x".repeat(len - 5)).into_bytes();
        let longest = line(MAX_CONTROL_LINE);
        assert_eq!(parse_all(&longest).len(), 1);
        let mut whole = BytesMut::from(&line(MAX_CONTROL_LINE + 1)[..]);
        assert!(parse(&mut whole).is_err(), "refused with its CRLF");
        let mut cut = BytesMut::from(&line(MAX_CONTROL_LINE + 1)[..MAX_CONTROL_LINE + 2]);
        assert!(parse(&mut cut).is_err(), "refused before its CRLF");
    }

    #[test]
    fn the_subject_is_the_first_field_whatever_whitespace_comes_before() {
        // Found by fuzzing (scripts/fuzz nats_parse): a vertical tab before the subject shifted it.
        for line in ["MSG \x0ba 1 3\r\nabc\r\n", "MSG \u{a0}a 1 3\r\nabc\r\n", "MSG \t a 1 3\r\nabc\r\n"] {
            let ServerOp::Msg(message) = &parse_all(line.as_bytes())[0] else { panic!() };
            let expected = line.split_ascii_whitespace().nth(1).unwrap();
            assert_eq!(&message.subject[..], expected.as_bytes(), "{line:?}");
        }
    }

    #[test]
    fn refuses_a_size_that_overflows() {
        // Found by fuzzing (scripts/fuzz nats_parse): the size was added to the line's length unchecked.
        let mut buf = BytesMut::from(&b"HMSG _INBOX.x.1 1 1 18446744073709551615\n\r\n"[..]);
        assert!(parse(&mut buf).is_err());
    }

    #[test]
    fn writes_client_operations() {
        let mut out = BytesMut::new();
        sub(&mut out, "herald.deliver.user.42", 3);
        unsub(&mut out, 3);
        publish(&mut out, "$JS.API.STREAM.INFO.HERALD", "_INBOX.f.1", b"");
        connect(&mut out, &serde_json::json!({"verbose": false}));
        assert_eq!(
            &out[..],
            &b"SUB herald.deliver.user.42 3\r\nUNSUB 3\r\nPUB $JS.API.STREAM.INFO.HERALD _INBOX.f.1 0\r\n\r\n\
               CONNECT {\"verbose\":false}\r\nPING\r\n"[..]
        );
    }
}
