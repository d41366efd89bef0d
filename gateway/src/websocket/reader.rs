//! Reading client messages (RFC 6455, server side): frames reassembled from fragments, a size limit
//! on the whole message checked before its payload is read, control frames surfaced so the session
//! can answer them and track liveness.
//!
//! Written here rather than taken from fastwebsockets' reader, which keeps an 8 KiB buffer per
//! socket: at tens of thousands of mostly idle sockets that was a quarter of the gateway's memory.
//! This one reads through a per-thread scratch buffer and keeps only the bytes of an unfinished
//! frame, so an idle socket holds no buffer at all. It is also cancel-safe: every byte read is kept
//! in the reader, so a session can `select!` on [`MessageReader::next`].

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

/// What a client sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A complete text message.
    Text(Vec<u8>),
    /// A ping with its payload; answer with a pong.
    Ping(Vec<u8>),
    /// A pong: the client is alive.
    Pong,
    /// The client closes with this code (or none).
    Close(Option<u16>),
}

/// Reads whole client messages, refusing any over `limit` bytes.
pub(crate) struct MessageReader<R> {
    io: R,
    limit: usize,
    /// Bytes read and not yet part of a returned message (usually empty between messages).
    buffered: Vec<u8>,
    /// A fragmented text message being assembled.
    partial: Option<Vec<u8>>,
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
        MessageReader { io, limit, buffered: Vec::new(), partial: None }
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

    /// Parses what is buffered; `None` if a frame is incomplete or a message is unfinished.
    fn take_message(&mut self) -> Result<Option<Inbound>, Close> {
        loop {
            let Some(header) = parse_header(&self.buffered)? else { return Ok(None) };
            let limit = if is_control(header.opcode) { 125 } else { self.limit };
            let assembled = self.partial.as_ref().map_or(0, Vec::len);
            if header.payload_len > limit || assembled + header.payload_len > self.limit {
                return Err(too_big(self.limit));
            }
            let end = header.header_len + header.payload_len;
            if self.buffered.len() < end {
                return Ok(None);
            }
            let mut payload: Vec<u8> = self.buffered.drain(..end).skip(header.header_len).collect();
            if self.buffered.is_empty() {
                // Idle sockets keep no buffer.
                self.buffered = Vec::new();
            }
            unmask(&mut payload, header.mask);
            if let Some(inbound) = self.message(header, payload)? {
                return Ok(Some(inbound));
            }
        }
    }

    /// Turns a frame into a message, or adds it to the one being assembled.
    fn message(&mut self, header: Header, payload: Vec<u8>) -> Result<Option<Inbound>, Close> {
        match (header.opcode, self.partial.is_some()) {
            (TEXT, false) if header.fin => text(payload).map(Some),
            (TEXT, false) => {
                self.partial = Some(payload);
                Ok(None)
            }
            (CONTINUATION, true) => {
                let partial = self.partial.as_mut().expect("a message is being assembled");
                partial.extend_from_slice(&payload);
                if header.fin { text(self.partial.take().unwrap_or_default()).map(Some) } else { Ok(None) }
            }
            (CONTINUATION, false) => Err(policy("continuation without a message")),
            (TEXT, true) => Err(policy("new message inside a fragmented one")),
            (BINARY, _) => Err(policy("binary frames are not accepted")),
            (PING, _) => Ok(Some(Inbound::Ping(payload))),
            (PONG, _) => Ok(Some(Inbound::Pong)),
            (CLOSE, _) => match payload.len() {
                0 => Ok(Some(Inbound::Close(None))),
                1 => Err(policy("close frame of one byte")),
                _ => Ok(Some(Inbound::Close(Some(u16::from_be_bytes([payload[0], payload[1]]))))),
            },
            (opcode, _) => Err(policy(&format!("unknown opcode {opcode:#x}"))),
        }
    }

    /// Reads what the socket has through the thread's scratch buffer; keeps only those bytes.
    async fn fill(&mut self) -> Result<(), Close> {
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

/// The header at the start of `bytes`, once complete. Client frames must be masked and must not
/// use extension bits.
fn parse_header(bytes: &[u8]) -> Result<Option<Header>, Close> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let (fin, reserved, opcode) = (bytes[0] & 0x80 != 0, bytes[0] & 0x70, bytes[0] & 0x0F);
    if reserved != 0 {
        return Err(policy("reserved bits set"));
    }
    if bytes[1] & 0x80 == 0 {
        return Err(policy("client frames must be masked"));
    }
    if is_control(opcode) && !fin {
        return Err(policy("fragmented control frame"));
    }
    let (length_bytes, short) = match bytes[1] & 0x7F {
        126 => (2, None),
        127 => (8, None),
        short => (0, Some(short as usize)),
    };
    let header_len = 2 + length_bytes + 4;
    if bytes.len() < header_len {
        return Ok(None);
    }
    let payload_len = match short {
        Some(len) => len,
        None => bytes[2..2 + length_bytes]
            .iter()
            .fold(0u64, |len, b| (len << 8) | u64::from(*b))
            .try_into()
            .unwrap_or(usize::MAX),
    };
    let mut mask = [0; 4];
    mask.copy_from_slice(&bytes[header_len - 4..header_len]);
    Ok(Some(Header { fin, opcode, mask, header_len, payload_len }))
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

fn text(payload: Vec<u8>) -> Result<Inbound, Close> {
    if std::str::from_utf8(&payload).is_err() {
        return Err(policy("text message is not UTF-8"));
    }
    Ok(Inbound::Text(payload))
}

fn policy(reason: &str) -> Close {
    Close::new(CloseCode::Policy, reason.to_string())
}

fn too_big(limit: usize) -> Close {
    Close::new(CloseCode::TooBig, format!("message over {limit} bytes"))
}

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
    async fn refuses_what_the_protocol_forbids() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let cases = [
            unmasked,
            frame(0x82, b"bin"),
            frame(0xC1, b"rsv"),
            frame(0x09, b"fragmented ping"),
            frame(0x80, b"orphan continuation"),
            frame(0x83, b"reserved opcode"),
            frame(0x81, &[0xff, 0xfe]),
            frame(0x88, &[0x03]),
            frame(0x89, &[0; 126]),
        ];
        for bytes in cases {
            let got = read_all(bytes.clone(), 1024).await;
            let code = got[0].as_ref().err().map(|c| c.code);
            assert!(matches!(code, Some(CloseCode::Policy | CloseCode::TooBig)), "{bytes:?}: {:?}", got[0]);
        }
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
