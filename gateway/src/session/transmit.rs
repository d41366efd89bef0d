//! Writing to the socket: a batch of frames goes out in as few vectored writes as the socket
//! allows. The write is a poll function over state kept here, so the connection's task can wait on
//! it in a `select!` with everything else and pick it up again where it left off.
//!
//! It also tells when the peer has what was written ([`Transmit::mark`]): a frame handed to the
//! kernel may still be in its send queue when the connection ends (a client that stopped reading,
//! a network gone), and is then lost; the peer's TCP acknowledgement is the last sign it arrived.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Slices handed to one `writev` at most.
const MAX_SLICES: usize = 64;
/// How often the socket is asked what its peer acknowledged while marks wait: as often as cursors
/// are written to KV (`cursor_flush_interval`'s default).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Marks kept at most: past that every other one goes, so that those left still span every byte in
/// flight, further apart (a mark settles later, never early).
const MAX_MARKS: usize = 64;

/// A writer that may tell how many of the bytes written its peer has not acknowledged yet.
pub(crate) trait Unacknowledged {
    /// Whether [`Unacknowledged::received`] can answer at all.
    fn tells(&self) -> bool;
    /// Of the first `written` bytes written, how many the peer is known to have received, if it
    /// can tell.
    fn received(&mut self, written: u64) -> Option<u64>;
}

pub(crate) struct Transmit<W> {
    io: W,
    /// The frames being written.
    batch: Vec<Bytes>,
    /// Frames of `batch` fully written.
    done: usize,
    /// Bytes of `batch[done]` written.
    offset: usize,
    /// When the socket last took bytes (or the batch started): a client that reads nothing for
    /// long is closed as a slow consumer.
    progressed: Instant,
    /// Whether the last write found the socket full.
    waited: bool,
    /// When the socket last took bytes after it was full: its unsent bytes left, which needs the
    /// peer to acknowledge what was sent, so the peer was alive then (what a client reading a
    /// long backlog slowly proves, while the gateway's ping waits behind that backlog).
    peer_alive: Option<Instant>,
    /// Bytes written since the start.
    written: u64,
    /// Sequences waiting for their bytes to be acknowledged, while some do (boxed: most connections
    /// never mark one).
    marks: Option<Box<Marks>>,
    /// The writer turned out unable to tell what its peer acknowledged: what is written counts.
    blind: bool,
}

struct Marks {
    /// Marked sequences, each with the bytes written when it was marked, oldest first.
    pending: VecDeque<(u64, u64)>,
    /// When the socket was last asked, or the first of these marks made.
    checked: Instant,
}

impl<W: AsyncWrite + Unpin + Unacknowledged> Transmit<W> {
    pub(crate) fn new(io: W) -> Transmit<W> {
        Transmit {
            io,
            batch: Vec::new(),
            done: 0,
            offset: 0,
            progressed: Instant::now(),
            waited: false,
            peer_alive: None,
            written: 0,
            marks: None,
            blind: false,
        }
    }

    /// Whether the writer tells what its peer acknowledged (else what is written counts).
    pub(crate) fn tells(&self) -> bool {
        !self.blind && self.io.tells()
    }

    /// Marks what was written so far, and the batch in flight, as carrying `seq`: returned by
    /// [`Transmit::acknowledged`] once the peer acknowledged those bytes, or at once when the
    /// writer cannot tell.
    pub(crate) fn mark(&mut self, seq: u64) -> Option<u64> {
        if !self.tells() {
            return Some(seq);
        }
        let end = self.written + self.batch[self.done..].iter().map(|frame| frame.len() as u64).sum::<u64>()
            - self.offset as u64;
        let marks =
            self.marks.get_or_insert_with(|| Box::new(Marks { pending: VecDeque::new(), checked: Instant::now() }));
        if marks.pending.is_empty() {
            // The peer needs a moment to acknowledge what was just written.
            marks.checked = Instant::now();
        }
        if marks.pending.len() >= MAX_MARKS {
            // Not the newest alone: the connection's end credits the newest mark its peer has, and
            // a fast replay makes many marks between two checks.
            let mut position = 0;
            marks.pending.retain(|_| {
                position += 1;
                position % 2 == 0
            });
        }
        marks.pending.push_back((end, seq));
        None
    }

    /// The newest mark whose bytes the peer acknowledged, if a new one did; the socket is asked at
    /// most every [`CHECK_EVERY`] unless `now_or_never` (the connection ends).
    pub(crate) fn acknowledged(&mut self, now_or_never: bool) -> Option<u64> {
        let marks = self.marks.as_mut()?;
        let now = Instant::now();
        if !now_or_never && now < marks.checked + CHECK_EVERY {
            return None;
        }
        marks.checked = now;
        let newest = match self.io.received(self.written) {
            Some(received) => {
                let mut newest = None;
                while let Some(&(end, seq)) = marks.pending.front()
                    && end <= received
                {
                    newest = Some(seq);
                    marks.pending.pop_front();
                }
                newest
            }
            None => {
                // The socket would not say after all: as if it never could, what was written counts
                // (a mark past it, at the end of a batch in flight, is dropped: it never counts).
                self.blind = true;
                let written = self.written;
                let newest = marks.pending.iter().take_while(|&&(end, _)| end <= written).last().map(|&(_, seq)| seq);
                marks.pending.clear();
                newest
            }
        };
        if marks.pending.is_empty() {
            self.marks = None;
        }
        newest
    }

    /// When to ask the socket again, while marks wait for its peer.
    pub(crate) fn next_check(&self) -> Option<Instant> {
        self.marks.as_ref().map(|marks| marks.checked + CHECK_EVERY)
    }

    /// Whether a batch is being written.
    pub(crate) fn is_busy(&self) -> bool {
        self.done < self.batch.len()
    }

    /// How many frames of the batch in flight are not wholly written.
    pub(crate) fn unwritten(&self) -> u64 {
        (self.batch.len() - self.done) as u64
    }

    /// Starts a batch: `fill` adds its frames (nothing may be in flight).
    pub(crate) fn start(&mut self, fill: impl FnOnce(&mut Vec<Bytes>)) {
        debug_assert!(!self.is_busy());
        self.batch.clear();
        (self.done, self.offset) = (0, 0);
        fill(&mut self.batch);
        self.progressed = Instant::now();
    }

    /// Since when the batch in flight has made no progress, if one is in flight.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        self.is_busy().then_some(self.progressed)
    }

    /// When the peer was last seen alive by taking bytes from a full socket (see `peer_alive`).
    pub(crate) fn peer_alive_at(&self) -> Option<Instant> {
        self.peer_alive
    }

    /// Writes the batch in flight to its end.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Finishes the batch in flight (a frame must never be cut), then writes `last` and shuts the
    /// socket down, all within `limit`.
    pub(crate) async fn finish(&mut self, last: Option<Bytes>, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            self.flush().await?;
            if let Some(last) = last {
                self.io.write_all(&last).await?;
            }
            self.io.shutdown().await
        })
        .await;
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.is_busy() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slice, frame) in slices.iter_mut().zip(&self.batch[self.done..]) {
                let skip = if count == 0 { self.offset } else { 0 };
                *slice = IoSlice::new(&frame[skip..]);
                count += 1;
            }
            let written = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]) {
                Poll::Pending => {
                    self.waited = true;
                    return Poll::Pending;
                }
                Poll::Ready(written) => written?,
            };
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
            self.written += written as u64;
            self.progressed = Instant::now();
            if std::mem::take(&mut self.waited) {
                self.peer_alive = Some(self.progressed);
            }
        }
        // Frames are freed as soon as they are written; an idle socket keeps no batch.
        self.batch = Vec::new();
        (self.done, self.offset) = (0, 0);
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 && self.is_busy() {
            let left = self.batch[self.done].len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.done += 1;
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    impl Unacknowledged for tokio::io::DuplexStream {
        fn tells(&self) -> bool {
            false
        }

        fn received(&mut self, _: u64) -> Option<u64> {
            None
        }
    }

    /// A socket that takes every byte and says what its peer has not acknowledged (`None`: it
    /// cannot tell after all).
    struct Socket(std::sync::Arc<std::sync::Mutex<Option<u64>>>);

    impl AsyncWrite for Socket {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Unacknowledged for Socket {
        fn tells(&self) -> bool {
            true
        }

        fn received(&mut self, written: u64) -> Option<u64> {
            self.0.lock().unwrap().map(|unacknowledged| written - unacknowledged)
        }
    }

    /// A transmit on a [`Socket`] whose unacknowledged bytes the test sets.
    fn on_socket() -> (Transmit<Socket>, std::sync::Arc<std::sync::Mutex<Option<u64>>>) {
        let unacknowledged = std::sync::Arc::new(std::sync::Mutex::new(Some(0)));
        (Transmit::new(Socket(unacknowledged.clone())), unacknowledged)
    }

    async fn write(transmit: &mut Transmit<Socket>, bytes: usize) {
        transmit.start(|batch| batch.push(Bytes::from(vec![b'x'; bytes])));
        transmit.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_mark_settles_once_the_peer_acknowledged_its_bytes_in_order() {
        let (mut transmit, unacknowledged) = on_socket();
        write(&mut transmit, 10).await;
        assert_eq!(transmit.mark(1), None);
        write(&mut transmit, 10).await;
        assert_eq!(transmit.mark(2), None);
        *unacknowledged.lock().unwrap() = Some(15);
        assert_eq!(transmit.acknowledged(true), None, "5 of the first 10 bytes");
        *unacknowledged.lock().unwrap() = Some(10);
        assert_eq!(transmit.acknowledged(true), Some(1));
        assert!(transmit.next_check().is_some(), "the second still waits");
        *unacknowledged.lock().unwrap() = Some(0);
        assert_eq!(transmit.acknowledged(true), Some(2));
        assert_eq!((transmit.next_check(), transmit.acknowledged(true)), (None, None));
    }

    #[tokio::test]
    async fn a_mark_made_as_a_batch_starts_counts_the_whole_batch() {
        let (mut transmit, unacknowledged) = on_socket();
        write(&mut transmit, 10).await;
        transmit.start(|batch| batch.extend([Bytes::from(vec![b'x'; 6]), Bytes::from(vec![b'x'; 4])]));
        assert_eq!(transmit.mark(1), None);
        *unacknowledged.lock().unwrap() = Some(0);
        assert_eq!(transmit.acknowledged(true), None, "nothing of the batch written yet");
        transmit.flush().await.unwrap();
        *unacknowledged.lock().unwrap() = Some(1);
        assert_eq!(transmit.acknowledged(true), None, "its last byte not acknowledged");
        *unacknowledged.lock().unwrap() = Some(0);
        assert_eq!(transmit.acknowledged(true), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_socket_is_asked_a_check_interval_after_the_first_mark() {
        let (mut transmit, _) = on_socket();
        write(&mut transmit, 10).await;
        assert_eq!(transmit.mark(1), None);
        assert_eq!(transmit.acknowledged(false), None, "not asked at once");
        assert_eq!(transmit.next_check(), Some(Instant::now() + CHECK_EVERY));
        tokio::time::advance(CHECK_EVERY).await;
        assert_eq!(transmit.acknowledged(false), Some(1));
    }

    #[tokio::test]
    async fn past_the_most_marks_kept_every_other_one_goes_and_those_left_settle_later_never_earlier() {
        let (mut transmit, unacknowledged) = on_socket();
        for seq in 1..=MAX_MARKS as u64 + 6 {
            write(&mut transmit, 1).await;
            assert_eq!(transmit.mark(seq), None);
        }
        // Received up to the 33rd mark's bytes: the odd marks of the first 64 went, so the 32nd.
        *unacknowledged.lock().unwrap() = Some(MAX_MARKS as u64 + 6 - 33);
        assert_eq!(transmit.acknowledged(true), Some(32));
        // Received up to the 68th: every mark since the thinning is kept.
        *unacknowledged.lock().unwrap() = Some(2);
        assert_eq!(transmit.acknowledged(true), Some(MAX_MARKS as u64 + 4));
        *unacknowledged.lock().unwrap() = Some(0);
        assert_eq!(transmit.acknowledged(true), Some(MAX_MARKS as u64 + 6));
    }

    #[tokio::test]
    async fn a_socket_that_cannot_tell_after_all_counts_what_is_written() {
        let (mut transmit, unacknowledged) = on_socket();
        write(&mut transmit, 10).await;
        assert_eq!(transmit.mark(1), None);
        // A mark at the end of a batch not written yet.
        transmit.start(|batch| batch.push(Bytes::from_static(b"12345")));
        assert_eq!(transmit.mark(2), None);
        *unacknowledged.lock().unwrap() = None;
        assert_eq!(transmit.acknowledged(true), Some(1), "what was written, not the batch in flight");
        transmit.flush().await.unwrap();
        write(&mut transmit, 10).await;
        assert_eq!(transmit.mark(3), Some(3), "at once from then on");
        assert_eq!(transmit.next_check(), None);
    }

    #[tokio::test]
    async fn a_peer_is_seen_alive_only_when_it_takes_bytes_from_a_full_socket() {
        let (mut client, server) = tokio::io::duplex(8);
        let mut transmit = Transmit::new(server);
        transmit.start(|batch| batch.push(Bytes::from_static(b"1234")));
        transmit.flush().await.unwrap();
        assert_eq!(transmit.peer_alive_at(), None, "room enough: nothing proven");
        transmit.start(|batch| batch.push(Bytes::from(vec![b'x'; 64])));
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 68];
            client.read_exact(&mut got).await.unwrap();
        });
        transmit.flush().await.unwrap();
        reader.await.unwrap();
        assert!(transmit.peer_alive_at().is_some(), "the full pipe was emptied by its reader");
    }

    #[tokio::test]
    async fn writes_a_batch_through_a_narrow_pipe_whole_and_in_order() {
        let (mut client, server) = tokio::io::duplex(7);
        let mut transmit = Transmit::new(server);
        let frames: Vec<Bytes> = (0..100).map(|n| Bytes::from(format!("frame-{n};"))).collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        transmit.start(|batch| batch.extend(frames));
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expected);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            rest
        });
        transmit.flush().await.unwrap();
        assert!(!transmit.is_busy());
        assert_eq!(transmit.batch.capacity(), 0);
        transmit.finish(Some(Bytes::from_static(b"bye")), Duration::from_secs(1)).await;
        assert_eq!(reader.await.unwrap(), b"bye");
    }

    #[tokio::test]
    async fn a_write_cancelled_midway_resumes_where_it_stopped() {
        let (mut client, server) = tokio::io::duplex(4);
        let mut transmit = Transmit::new(server);
        transmit.start(|batch| batch.extend([Bytes::from_static(b"abcdef"), Bytes::from_static(b"ghij")]));
        // The pipe takes 4 bytes, then the write waits: drop it there.
        assert!(futures::FutureExt::now_or_never(transmit.flush()).is_none());
        assert!(transmit.stalled_since().is_some());
        let mut got = vec![0; 4];
        client.read_exact(&mut got).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut rest = vec![0; 6];
            client.read_exact(&mut rest).await.unwrap();
            rest
        });
        transmit.flush().await.unwrap();
        got.extend(reader.await.unwrap());
        assert_eq!(got, b"abcdefghij");
        assert_eq!(transmit.stalled_since(), None);
    }
}
