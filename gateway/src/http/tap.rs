//! A connection served by the HTTP layer, counting what it writes into its socket, so that a
//! response streamed on it (an event stream on a kept-alive connection) can tell what its client
//! received: what the HTTP layer took of the body and wrote out is known at each of its flushes
//! (it flushes the socket only once its own buffer is written), and the socket tells how much of
//! what was written its peer acknowledged.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::session::send_queue;

/// What a response body streamed on the connection learns at each flush.
pub(crate) trait Flushes: Send + Sync {
    /// Everything the HTTP layer took of the body is in the socket, whose first `socket_bytes`
    /// bytes it fills.
    fn flushed(&self, socket_bytes: u64);
}

/// The connection's side shared with the response streamed on it.
#[derive(Default)]
pub(crate) struct Tap {
    /// The socket while the connection lives; cleared (under the lock) before it is closed, so
    /// that a descriptor asked about is never another connection's.
    socket: Mutex<Option<RawFd>>,
    /// Bytes written into the socket since the connection began.
    written: AtomicU64,
    /// The body streamed on the connection, if one is.
    body: Mutex<Option<Weak<dyn Flushes>>>,
    /// Whether `body` is set: most connections never stream one, and their flushes lock nothing.
    watched: AtomicBool,
}

impl Tap {
    /// Tells `body` of every flush from now on.
    pub(crate) fn watch(&self, body: Weak<dyn Flushes>) {
        *lock(&self.body) = Some(body);
        self.watched.store(true, Ordering::Release);
    }

    /// Bytes written into the socket that its peer acknowledged, if the connection lives and the
    /// socket can tell.
    pub(crate) fn acknowledged(&self) -> Option<u64> {
        // Read before the socket is asked: a write between the two only makes the answer smaller.
        let written = self.written.load(Ordering::Acquire);
        let socket = lock(&self.socket);
        let queued = send_queue((*socket)?)?;
        Some(written.saturating_sub(queued))
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one assignment: a panic elsewhere cannot leave it half-done.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP stream and its tap.
pub(crate) struct TappedStream {
    // Dropped first: the descriptor is forgotten before the stream closes it.
    forget: Forget,
    stream: TcpStream,
}

/// Clears the tap's descriptor when dropped.
struct Forget(Arc<Tap>);

impl Drop for Forget {
    fn drop(&mut self) {
        *lock(&self.0.socket) = None;
    }
}

impl TappedStream {
    pub(crate) fn new(stream: TcpStream) -> (TappedStream, Arc<Tap>) {
        let tap = Arc::new(Tap { socket: Mutex::new(Some(stream.as_raw_fd())), ..Tap::default() });
        (TappedStream { forget: Forget(tap.clone()), stream }, tap)
    }

    /// The stream itself, for a connection that leaves the HTTP layer (an upgrade).
    pub(crate) fn into_inner(self) -> TcpStream {
        let TappedStream { forget, stream } = self;
        drop(forget);
        stream
    }

    fn wrote(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(bytes)) = written {
            self.forget.0.written.fetch_add(bytes as u64, Ordering::Release);
        }
        written
    }
}

impl AsyncRead for TappedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TappedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        let tap = &self.forget.0;
        if let Poll::Ready(Ok(())) = flushed
            && tap.watched.load(Ordering::Acquire)
        {
            let mut watched = lock(&tap.body);
            match watched.as_ref().and_then(Weak::upgrade) {
                Some(body) => body.flushed(tap.written.load(Ordering::Relaxed)),
                None => {
                    // The body ended: its pipe is freed, and later flushes lock nothing.
                    *watched = None;
                    tap.watched.store(false, Ordering::Release);
                }
            }
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::body_pipe::{Flushed, body_pipe};

    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) = tokio::try_join!(client, listener.accept()).unwrap();
        (server, client)
    }

    #[tokio::test]
    async fn a_flush_tells_the_body_what_of_it_is_in_the_socket_and_the_socket_what_its_peer_has() {
        let (server, mut client) = connected().await;
        let (mut stream, tap) = TappedStream::new(server);
        let (mut writer, mut body) = body_pipe(1024);
        let flushes = writer.flushes_on(&tap);
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        writer.write_all(b"data: 1\n\n").await.unwrap();
        let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(flushes.last(), None, "taken, not flushed");
        writer.write_all(b"data: 2\n\n").await.unwrap();
        let mut next = Box::pin(body.frame());
        assert!(futures::poll!(next.as_mut()).is_pending(), "no chunk before the last one's flush");
        stream.write_all(&chunk).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(flushes.last(), Some(Flushed { body_bytes: 9, socket_bytes: 28 }));
        let woken = tokio::time::timeout(Duration::from_secs(10), next).await.expect("woken by the flush");
        assert_eq!(woken.unwrap().unwrap().into_data().unwrap(), &b"data: 2\n\n"[..]);

        let mut read = [0; 28];
        client.read_exact(&mut read).await.unwrap();
        let acknowledged = tokio::time::timeout(Duration::from_secs(10), async {
            while tap.acknowledged() != Some(28) {
                tokio::task::yield_now().await;
            }
        });
        acknowledged.await.expect("the peer's acknowledgement");
        drop(stream);
        assert_eq!(tap.acknowledged(), None, "a closed socket is not asked");
    }

    #[tokio::test]
    async fn an_upgrade_takes_the_stream_out_and_the_tap_forgets_it() {
        let (server, _client) = connected().await;
        let (stream, tap) = TappedStream::new(server);
        let server = stream.into_inner();
        assert_eq!(tap.acknowledged(), None);
        drop(server);
    }
}
