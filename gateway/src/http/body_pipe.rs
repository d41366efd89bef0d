//! A bounded in-memory pipe from a session to a streamed HTTP response body. The session writes
//! into it as into a socket; the body takes everything written since it last looked as one chunk,
//! without copying it again (a byte pipe would copy each byte in, out, and into a chunk).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use tokio::io::AsyncWrite;

use super::tap::{Flushes, Tap};

/// A pipe holding at most `limit` bytes that the body has not taken: its writing end and its
/// body end.
pub(crate) fn body_pipe(limit: usize) -> (PipeWriter, PipeBody) {
    let shared = Arc::new(Pipe { state: Mutex::default(), limit });
    (PipeWriter { pipe: shared.clone() }, PipeBody { pipe: shared })
}

struct Pipe {
    state: Mutex<State>,
    limit: usize,
}

#[derive(Default)]
struct State {
    /// Written and not yet taken by the body.
    written: BytesMut,
    /// The writer shut the pipe down or is gone: the body ends once it has taken `written`.
    writer_done: bool,
    /// The body is gone (the client left, or the server dropped the response): writes fail.
    body_gone: bool,
    /// The body, waiting for bytes.
    body_waker: Option<Waker>,
    /// The writer, waiting for room.
    writer_waker: Option<Waker>,
    /// Bytes the body took.
    taken: u64,
    /// The connection the body is written on tells of its flushes: the body takes a chunk only
    /// once the one before it was flushed, so that each chunk's flush is known.
    tapped: bool,
    /// The last flush of the connection the body is written on, if it is tapped.
    flushed: Option<Flushed>,
}

/// A flush of the connection a body is written on: its first `body_bytes` bytes were then in the
/// socket, within its first `socket_bytes` bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Flushed {
    pub(crate) body_bytes: u64,
    pub(crate) socket_bytes: u64,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole; a panic elsewhere cannot leave it half-done.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Flushes for Pipe {
    fn flushed(&self, socket_bytes: u64) {
        let waker = {
            let mut state = self.lock();
            state.flushed = Some(Flushed { body_bytes: state.taken, socket_bytes });
            state.body_waker.take()
        };
        wake(waker);
    }
}

/// The flushes of the connection a pipe's body is written on.
pub(crate) struct PipeFlushes(Arc<Pipe>);

impl PipeFlushes {
    pub(crate) fn last(&self) -> Option<Flushed> {
        self.0.lock().flushed
    }
}

/// Wakes what waited, if anything did (called with the lock released).
fn wake(waiting: Option<Waker>) {
    if let Some(waker) = waiting {
        waker.wake();
    }
}

/// The session's end.
pub(crate) struct PipeWriter {
    pipe: Arc<Pipe>,
}

impl PipeWriter {
    /// The flushes of the connection `tap` watches, on which the body is written.
    pub(crate) fn flushes_on(&self, tap: &Tap) -> PipeFlushes {
        self.pipe.lock().tapped = true;
        let pipe: Arc<dyn Flushes> = self.pipe.clone();
        tap.watch(Arc::downgrade(&pipe));
        PipeFlushes(self.pipe.clone())
    }

    fn close(&self) {
        let waker = {
            let mut state = self.pipe.lock();
            state.writer_done = true;
            state.body_waker.take()
        };
        wake(waker);
    }
}

impl AsyncWrite for PipeWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.pipe.lock();
        if state.body_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = self.pipe.limit.saturating_sub(state.written.len());
        if room == 0 {
            state.writer_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let wanted = slices.iter().map(|slice| slice.len()).sum::<usize>().min(room);
        state.written.reserve(wanted);
        let mut left = wanted;
        for slice in slices {
            let part = &slice[..slice.len().min(left)];
            state.written.extend_from_slice(part);
            left -= part.len();
        }
        let waker = state.body_waker.take();
        drop(state);
        wake(waker);
        Poll::Ready(Ok(wanted))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// The response body's end: each frame is all that was written since the last one.
pub(crate) struct PipeBody {
    pipe: Arc<Pipe>,
}

impl hyper::body::Body for PipeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut state = self.pipe.lock();
        let unflushed = state.tapped && state.taken > state.flushed.map_or(0, |flushed| flushed.body_bytes);
        if state.written.is_empty() || unflushed {
            if state.written.is_empty() && state.writer_done {
                return Poll::Ready(None);
            }
            // Woken by a write, or by the flush of the chunk taken before.
            state.body_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // Taken whole, so that an idle stream keeps no buffer.
        let chunk = std::mem::take(&mut state.written).freeze();
        state.taken += chunk.len() as u64;
        let waker = state.writer_waker.take();
        drop(state);
        wake(waker);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.pipe.lock();
            state.body_gone = true;
            state.writer_waker.take()
        };
        wake(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    async fn next_chunk(body: &mut PipeBody) -> Option<Bytes> {
        body.frame().await.map(|frame| frame.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn the_body_takes_all_writes_since_its_last_chunk_then_ends_after_shutdown() {
        let (mut writer, mut body) = body_pipe(64);
        let written = writer.write_vectored(&[IoSlice::new(b"id: 1\n"), IoSlice::new(b"data: a\n\n")]).await.unwrap();
        assert_eq!(written, 15);
        writer.write_all(b"id: 2\n\n").await.unwrap();
        assert_eq!(next_chunk(&mut body).await.unwrap(), &b"id: 1\ndata: a\n\nid: 2\n\n"[..]);
        writer.write_all(b": ping\n").await.unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(next_chunk(&mut body).await.unwrap(), &b": ping\n"[..]);
        assert_eq!(next_chunk(&mut body).await, None);
    }

    #[tokio::test]
    async fn a_full_pipe_takes_what_fits_and_waits_for_the_body() {
        let (mut writer, mut body) = body_pipe(4);
        assert_eq!(writer.write_vectored(&[IoSlice::new(b"abc"), IoSlice::new(b"def")]).await.unwrap(), 4);
        let mut rest = Box::pin(writer.write(b"ef"));
        assert!(futures::poll!(rest.as_mut()).is_pending(), "a full pipe must wait");
        assert_eq!(next_chunk(&mut body).await.unwrap(), &b"abcd"[..]);
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), rest).await;
        assert_eq!(woken.expect("the writer is woken").unwrap(), 2);
        assert_eq!(next_chunk(&mut body).await.unwrap(), &b"ef"[..]);
    }

    #[tokio::test]
    async fn writes_fail_once_the_body_is_gone_and_a_dropped_writer_ends_the_body() {
        let (mut writer, body) = body_pipe(64);
        drop(body);
        let error = writer.write_all(b"id: 1\n\n").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);

        let (writer, mut body) = body_pipe(64);
        drop(writer);
        assert_eq!(next_chunk(&mut body).await, None);
    }

    #[tokio::test]
    async fn a_writer_waiting_for_room_fails_when_the_body_goes() {
        let (mut writer, body) = body_pipe(2);
        writer.write_all(b"ab").await.unwrap();
        let mut blocked = Box::pin(writer.write(b"c"));
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        drop(body);
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), blocked).await;
        assert_eq!(woken.expect("the writer is woken").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
