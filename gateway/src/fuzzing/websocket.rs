//! The WebSocket reader on bytes held in memory, read in pieces of any size, with every read future
//! dropped at every point where it waits (as a session's `select!` does).

use std::cell::Cell;
use std::future::Future;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

use super::Rng;
use crate::close::Close;
use crate::websocket::reader::{Inbound, MAX_CONTROL_PAYLOAD, MessageReader, valid_close_code};

/// A client message as the reader returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

/// What the reader made of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub messages: Vec<Message>,
    /// The close code the reader ended with: a refusal, or 1006 when the bytes ran out. `None`
    /// after a close message (a session reads no further).
    pub end: Option<u16>,
    /// Bytes of the stream the reader had taken as whole frames when it stopped: where the frame it
    /// refused for its header starts.
    pub consumed: usize,
}

/// Reads `stream` as a session would, until a close message or an error: in reads of the sizes in
/// `reads` (in turn, again and again; empty: all at once; 0 counts as 1), each after a read that
/// waits, at which the reader's future is dropped and made again.
pub fn read_websocket(stream: &[u8], reads: &[usize], limit: usize) -> Outcome {
    read_checked(stream, reads, true, limit, |_, _, _| {})
}

/// Any bytes, read in any pieces: the reader never panics, decides the same whatever the pieces and
/// the dropped futures, holds no more than it was sent (never a frame's claimed length), holds
/// nothing once idle, and returns only what the protocol allows.
///
/// The input: a byte for the size limit (0-127, or 1 MiB from 128 on), a byte that seeds the read
/// sizes (0: all at once, n: pieces of 1 to n bytes), then the stream.
pub fn websocket_reader(data: &[u8]) {
    let [limit, seed, stream @ ..] = data else { return };
    let limit = if *limit < 128 { usize::from(*limit) } else { 1 << 20 };
    let reads = match *seed {
        0 => Vec::new(),
        max => {
            let mut rng = Rng::new(max);
            (0..64).map(|_| rng.between_one_and(usize::from(max))).collect()
        }
    };
    let whole = read_checked(stream, &[], false, limit, |_, _, _| {});
    let pieces = read_checked(stream, &reads, true, limit, |reader, sent, inbound| {
        let held = reader.held_bytes();
        assert!(held <= 4 * sent + 64, "the reader holds {held} bytes after {sent} were sent");
        if reader.unread() == 0 && !reader.assembling() {
            assert_eq!(held, 0, "an idle reader holds a buffer");
        }
        match inbound {
            Inbound::Text(text) => {
                assert!(std::str::from_utf8(text).is_ok(), "text that is not UTF-8");
                assert!(text.len() <= limit, "a text of {} bytes over the limit {limit}", text.len());
            }
            Inbound::Ping(payload) => assert!(payload.len() <= MAX_CONTROL_PAYLOAD),
            Inbound::Close(Some(code)) => assert!(valid_close_code(*code), "close code {code} let through"),
            Inbound::Close(None) | Inbound::Pong => {}
            Inbound::Binary(_) => panic!("a binary message from a reader that refuses them"),
        }
    });
    assert_eq!(whole, pieces, "read whole and in pieces of at most {seed}");
    if let Some(code) = whole.end {
        assert!(matches!(code, 1002 | 1006 | 1007 | 1008 | 1009), "closed with {code}");
    }
}

/// Reads until a close message or an error, calling `check` after each message.
fn read_checked(
    stream: &[u8],
    reads: &[usize],
    waits: bool,
    limit: usize,
    mut check: impl FnMut(&MessageReader<Pieces<'_>>, usize, &Inbound),
) -> Outcome {
    let pieces = Pieces { stream, reads, turn: 0, sent: Rc::new(Cell::new(0)), waits, waited: false };
    let sent = pieces.sent.clone();
    let mut reader = MessageReader::new(pieces, limit);
    let mut messages = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let next = {
            let mut future = pin!(reader.next());
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(next) => next,
                // Dropped while waiting: the reader must lose nothing.
                Poll::Pending => continue,
            }
        };
        let consumed = sent.get() - reader.unread();
        let inbound = match next {
            Ok(inbound) => inbound,
            Err(Close { code, .. }) => return Outcome { messages, end: Some(code.number()), consumed },
        };
        check(&reader, sent.get(), &inbound);
        let close = matches!(inbound, Inbound::Close(_));
        messages.push(match inbound {
            Inbound::Text(text) => Message::Text(text),
            Inbound::Ping(payload) => Message::Ping(payload),
            Inbound::Pong => Message::Pong,
            Inbound::Close(code) => Message::Close(code),
            Inbound::Binary(_) => unreachable!("checked above"),
        });
        if close {
            return Outcome { messages, end: None, consumed };
        }
    }
}

/// A stream in memory, sent in pieces; every other read waits first when `waits`.
pub(crate) struct Pieces<'a> {
    stream: &'a [u8],
    reads: &'a [usize],
    turn: usize,
    /// Bytes handed to the reader so far.
    sent: Rc<Cell<usize>>,
    waits: bool,
    waited: bool,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.waits && !self.waited {
            self.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.waited = false;
        let sent = self.sent.get();
        let left = self.stream.len() - sent;
        let size = match self.reads {
            [] => left,
            reads => reads[self.turn % reads.len()].max(1),
        };
        self.turn += 1;
        let size = size.min(left).min(buf.remaining());
        buf.put_slice(&self.stream[sent..sent + size]);
        self.sent.set(sent + size);
        Poll::Ready(Ok(()))
    }
}
