//! Reading client messages (RFC 6455, server side): frames reassembled from fragments, a size limit
//! on the whole message checked before its payload is read, control frames surfaced so the session
//! can answer them and track liveness.
//!
//! Written here rather than taken from fastwebsockets' reader, which keeps an 8 KiB buffer per
//! socket: at tens of thousands of mostly idle sockets that was a quarter of the gateway's memory.
//! This one reads through a per-thread scratch buffer and keeps only the bytes of an unfinished
//! frame, so an idle socket holds no buffer at all. It is also cancel-safe: every byte read is kept
//! in the reader, so a session can `select!` on [`MessageReader::next`].
//!
//! A frame that breaks the protocol fails the connection (RFC 6455 §7.1.7) with the close code the
//! RFC gives (§7.4.1): 1002 for a broken frame, 1007 for text that is not UTF-8 (checked fragment by
//! fragment, so a bad message fails before its end arrives), 1009 for a message over the limit.
//! Binary messages are refused with 1008, by Herald's contract. Everything that can be decided from
//! a frame's header is, before its payload is read. A length written in more bytes than it needs
//! (§5.2 says a sender MUST NOT) is accepted: the length is the same, and nothing depends on it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

use crate::close::{Close, CloseCode};

/// Bytes read from the socket at most at once (per worker thread, not per socket).
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// The longest payload of a control frame (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// What a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A complete text message (valid UTF-8).
    Text(Vec<u8>),
    /// A complete binary message (only from a reader that accepts them: [`MessageReader::accept_binary`]).
    Binary(Vec<u8>),
    /// A ping with its payload; answer with a pong.
    Ping(Vec<u8>),
    /// A pong: the client is alive.
    Pong,
    /// The client closes with this code (one a peer may send: [`valid_close_code`]) or none.
    Close(Option<u16>),
}

/// Reads whole client messages, refusing any over `limit` bytes.
pub(crate) struct MessageReader<R> {
    io: R,
    limit: usize,
    /// Bytes read and not yet part of a returned message, from `start` on (usually empty between
    /// messages: then it has no capacity either).
    buffered: Vec<u8>,
    /// How much of `buffered` was parsed already (dropped at the next read, not frame by frame).
    start: usize,
    /// A fragmented text message being assembled.
    partial: Option<PartialText>,
    /// Binary messages are taken (protocols with a binary encoding), not refused with 1008.
    binary: bool,
}

/// One parsed frame header.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub(crate) fn new(io: R, limit: usize) -> MessageReader<R> {
        MessageReader { io, limit, buffered: Vec::new(), start: 0, partial: None, binary: false }
    }

    /// From now on binary messages are returned as [`Inbound::Binary`].
    pub(crate) fn accept_binary(&mut self) {
        self.binary = true;
    }

    /// The next client message; an error says how to close the connection.
    pub(crate) async fn next(&mut self) -> Result<Inbound, Close> {
        loop {
            if let Some(inbound) = self.take_message()? {
                return Ok(inbound);
            }
            self.fill().await?;
        }
    }

    /// Bytes held by the reader (buffer capacities), for the tests and fuzz targets.
    pub(crate) fn held_bytes(&self) -> usize {
        self.buffered.capacity() + self.partial.as_ref().map_or(0, |partial| partial.text.capacity())
    }

    /// Bytes read and not yet taken as a whole frame.
    pub(crate) fn unread(&self) -> usize {
        self.buffered.len() - self.start
    }

    /// A fragmented message is being assembled.
    pub(crate) fn assembling(&self) -> bool {
        self.partial.is_some()
    }

    /// Parses what is buffered; `None` if a frame is incomplete or a message is unfinished.
    fn take_message(&mut self) -> Result<Option<Inbound>, Close> {
        loop {
            let unread = &self.buffered[self.start..];
            let Some(header) = parse_header(unread)? else { return Ok(None) };
            self.check(&header)?;
            let end = header.header_len + header.payload_len;
            if unread.len() < end {
                return Ok(None);
            }
            let mut payload = unread[header.header_len..end].to_vec();
            self.start += end;
            if self.start == self.buffered.len() {
                // Idle sockets keep no buffer.
                self.buffered = Vec::new();
                self.start = 0;
            }
            unmask(&mut payload, header.mask);
            if let Some(inbound) = self.message(&header, payload)? {
                return Ok(Some(inbound));
            }
        }
    }

    /// What the header alone tells: a frame this connection must refuse, whatever its payload.
    fn check(&self, header: &Header) -> Result<(), Close> {
        let assembling = self.partial.as_ref().map(|partial| partial.text.len());
        match header.opcode {
            CLOSE | PING | PONG if !header.fin => Err(protocol("fragmented control frame")),
            CLOSE | PING | PONG if header.payload_len > MAX_CONTROL_PAYLOAD => {
                Err(protocol("control frame over 125 bytes"))
            }
            CLOSE | PING | PONG => Ok(()),
            CONTINUATION if assembling.is_none() => Err(protocol("continuation frame without a message")),
            TEXT | BINARY if assembling.is_some() => Err(protocol("new message inside a fragmented one")),
            BINARY if !self.binary => Err(Close::new(CloseCode::Policy, "binary messages are not accepted")),
            CONTINUATION | TEXT | BINARY => {
                if assembling.unwrap_or(0).saturating_add(header.payload_len) > self.limit {
                    return Err(Close::new(CloseCode::TooBig, format!("message over {} bytes", self.limit)));
                }
                Ok(())
            }
            opcode => Err(protocol(&format!("reserved opcode {opcode:#x}"))),
        }
    }

    /// Turns a frame that passed [`Self::check`] into a message, or adds it to the one being
    /// assembled.
    fn message(&mut self, header: &Header, payload: Vec<u8>) -> Result<Option<Inbound>, Close> {
        match header.opcode {
            PING => Ok(Some(Inbound::Ping(payload))),
            PONG => Ok(Some(Inbound::Pong)),
            CLOSE => close_frame(&payload).map(Some),
            TEXT | BINARY => {
                let partial = PartialText::new(payload, header.opcode == BINARY)?;
                if header.fin {
                    return partial.finish().map(Some);
                }
                self.partial = Some(partial);
                Ok(None)
            }
            CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(protocol("continuation frame without a message"));
                };
                partial.extend(&payload)?;
                if header.fin {
                    return partial.finish().map(Some);
                }
                self.partial = Some(partial);
                Ok(None)
            }
            opcode => Err(protocol(&format!("unexpected opcode {opcode:#x}"))),
        }
    }

    /// Reads what the socket has through the thread's scratch buffer; keeps only those bytes.
    async fn fill(&mut self) -> Result<(), Close> {
        // Frames already parsed are dropped once per read, not one by one.
        self.buffered.drain(..self.start);
        self.start = 0;
        let read = poll_fn(|cx| {
            SCRATCH_BUFFER.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        self.buffered.extend_from_slice(buf.filled());
                        Poll::Ready(Ok(buf.filled().len()))
                    }
                    Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                    Poll::Pending => Poll::Pending,
                }
            })
        })
        .await;
        match read {
            Ok(0) | Err(_) => Err(Close::gone("connection lost")),
            Ok(_) => Ok(()),
        }
    }
}

/// A text message arriving in fragments: its bytes so far, checked as they come (RFC 6455 §8.1);
/// or a binary message, not checked.
struct PartialText {
    text: Vec<u8>,
    /// How many bytes of `text` are known to be UTF-8; after them at most an unfinished code point.
    valid: usize,
    binary: bool,
}

impl PartialText {
    fn new(first: Vec<u8>, binary: bool) -> Result<PartialText, Close> {
        let mut partial = PartialText { text: first, valid: 0, binary };
        partial.check()?;
        Ok(partial)
    }

    fn extend(&mut self, fragment: &[u8]) -> Result<(), Close> {
        self.text.extend_from_slice(fragment);
        self.check()
    }

    /// Fails as soon as the bytes cannot be the start of UTF-8 text; a code point cut at the end
    /// may be completed by the next fragment.
    fn check(&mut self) -> Result<(), Close> {
        if self.binary {
            self.valid = self.text.len();
            return Ok(());
        }
        match std::str::from_utf8(&self.text[self.valid..]) {
            Ok(_) => self.valid = self.text.len(),
            Err(error) if error.error_len().is_none() => self.valid += error.valid_up_to(),
            Err(_) => return Err(invalid_utf8("text message is not UTF-8")),
        }
        Ok(())
    }

    /// The whole message, which must not end inside a code point.
    fn finish(self) -> Result<Inbound, Close> {
        if self.valid != self.text.len() {
            return Err(invalid_utf8("text message ends inside a UTF-8 sequence"));
        }
        Ok(if self.binary { Inbound::Binary(self.text) } else { Inbound::Text(self.text) })
    }
}

/// A close frame's payload: nothing, or a code a peer may send and a UTF-8 reason (RFC 6455 §5.5.1).
fn close_frame(payload: &[u8]) -> Result<Inbound, Close> {
    let [high, low, reason @ ..] = payload else {
        return if payload.is_empty() { Ok(Inbound::Close(None)) } else { Err(protocol("close frame of one byte")) };
    };
    if std::str::from_utf8(reason).is_err() {
        return Err(invalid_utf8("close reason is not UTF-8"));
    }
    let code = u16::from_be_bytes([*high, *low]);
    if !valid_close_code(code) {
        return Err(protocol(&format!("close code {code} is not one a peer may send")));
    }
    Ok(Inbound::Close(Some(code)))
}

/// Codes a peer may put in a close frame (RFC 6455 §7.4.1, §7.4.2 and the IANA registry, which adds
/// 1012-1014): 1004 is reserved, 1005, 1006 and 1015 must never be sent, 1016-2999 are unassigned
/// and 0-999 and 5000 and above are not used.
pub(crate) fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The header at the start of `bytes`, once complete. Client frames must be masked (RFC 6455 §5.1)
/// and must not use the reserved bits (§5.2: no extension is negotiated).
fn parse_header(bytes: &[u8]) -> Result<Option<Header>, Close> {
    let [first, second, rest @ ..] = bytes else { return Ok(None) };
    let (fin, reserved, opcode) = (first & 0x80 != 0, first & 0x70, first & 0x0F);
    if reserved != 0 {
        return Err(protocol("reserved bits set"));
    }
    if second & 0x80 == 0 {
        return Err(protocol("client frames must be masked"));
    }
    let (length_bytes, short) = match second & 0x7F {
        126 => (2, None),
        127 => (8, None),
        short => (0, Some(usize::from(short))),
    };
    let Some((length, rest)) = rest.split_at_checked(length_bytes) else { return Ok(None) };
    let Some((mask, _)) = rest.split_first_chunk::<4>() else { return Ok(None) };
    let payload_len = match short {
        Some(len) => len,
        None => {
            let len = length.iter().fold(0u64, |len, b| (len << 8) | u64::from(*b));
            if len >> 63 != 0 {
                return Err(protocol("64-bit length with its most significant bit set"));
            }
            // Beyond the address space: over any limit.
            usize::try_from(len).unwrap_or(usize::MAX)
        }
    };
    Ok(Some(Header { fin, opcode, mask: *mask, header_len: 2 + length_bytes + 4, payload_len }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

fn protocol(reason: &str) -> Close {
    Close::new(CloseCode::ProtocolError, reason.to_string())
}

fn invalid_utf8(reason: &str) -> Close {
    Close::new(CloseCode::InvalidData, reason.to_string())
}

/// What the protocol forbids, case by case, is in `super::conformance`.
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A client frame: masked with a fixed key.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            len if len < 126 => out.push(0x80 | len as u8),
            len if len <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, limit: usize) -> Vec<Result<Inbound, Close>> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            // Dribble the bytes to exercise partial headers and payloads.
            for chunk in bytes.chunks(3) {
                if client.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = MessageReader::new(server, limit);
        let mut got = Vec::new();
        loop {
            let next = reader.next().await;
            let end = next.is_err();
            got.push(next);
            if end {
                break;
            }
        }
        writer.abort();
        got
    }

    #[tokio::test]
    async fn binary_messages_are_refused_unless_accepted() {
        let mut bytes = frame(0x02, &[0xff, 0x00]);
        bytes.extend(frame(0x80, &[0xfe]));
        let mut refusing = MessageReader::new(std::io::Cursor::new(bytes.clone()), 1024);
        assert_eq!(refusing.next().await.map_err(|c| c.code), Err(CloseCode::Policy));
        let mut accepting = MessageReader::new(std::io::Cursor::new(bytes), 1024);
        accepting.accept_binary();
        assert_eq!(accepting.next().await, Ok(Inbound::Binary(vec![0xff, 0x00, 0xfe])));
    }

    #[tokio::test]
    async fn reads_messages_control_frames_and_fragments() {
        let mut bytes = frame(0x81, b"hello");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x01, b"frag"));
        bytes.extend(frame(0x8A, b""));
        bytes.extend(frame(0x80, b"mented"));
        bytes.extend(frame(0x81, &[b'x'; 300]));
        bytes.extend(frame(0x88, &[0x03, 0xE8]));
        let got = read_all(bytes, 1024).await;
        assert_eq!(got[0], Ok(Inbound::Text(b"hello".to_vec())));
        assert_eq!(got[1], Ok(Inbound::Ping(b"p".to_vec())));
        assert_eq!(got[2], Ok(Inbound::Pong));
        assert_eq!(got[3], Ok(Inbound::Text(b"fragmented".to_vec())));
        assert_eq!(got[4], Ok(Inbound::Text(vec![b'x'; 300])));
        assert_eq!(got[5], Ok(Inbound::Close(Some(1000))));
        assert_eq!(got[6].as_ref().err().map(|c| c.code), Some(CloseCode::Abnormal));
    }

    #[tokio::test]
    async fn refuses_oversized_messages_before_reading_them() {
        let exactly = read_all(frame(0x81, &[b'a'; 100]), 100).await;
        assert_eq!(exactly[0], Ok(Inbound::Text(vec![b'a'; 100])));
        let over = read_all(frame(0x81, &[b'a'; 101]), 100).await;
        assert_eq!(over[0].as_ref().err().map(|c| c.code), Some(CloseCode::TooBig));
        let mut fragments = frame(0x01, &[b'a'; 60]);
        fragments.extend(frame(0x80, &[b'a'; 60]));
        assert_eq!(read_all(fragments, 100).await[0].as_ref().err().map(|c| c.code), Some(CloseCode::TooBig));
        // A 64-bit length far beyond the limit is refused from the header alone.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(huge, 100).await[0].as_ref().err().map(|c| c.code), Some(CloseCode::TooBig));
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = MessageReader::new(server, 1024);
        client.write_all(&frame(0x81, b"one")).await.unwrap();
        assert_eq!(reader.next().await, Ok(Inbound::Text(b"one".to_vec())));
        assert_eq!(reader.buffered.capacity(), 0);
    }
}
