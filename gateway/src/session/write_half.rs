//! A connection's sending side: any writer (a WebSocket's TCP half, an HTTP body's pipe), and what
//! tells how much of what was written the peer received: the TCP socket beneath when the session
//! writes straight into one, the connection's tap when it writes a response's body.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;

use super::transmit::Unacknowledged;
use crate::http::body_pipe::{Flushed, PipeFlushes, PipeWriter};
use crate::http::tap::Tap;

pub(crate) struct WriteHalf {
    io: Pin<Box<dyn AsyncWrite + Send>>,
    peer: Peer,
}

/// What tells how much of what was written the peer received.
enum Peer {
    /// Nothing (a polling session's requests come and go).
    Unknown,
    /// The socket `io` writes into, which `io` keeps open.
    Socket(RawFd),
    /// A response body on a connection served by the HTTP layer.
    Response(Box<ResponsePeer>),
}

/// A body's bytes the client received: all that the HTTP layer had taken of the body at a flush,
/// once the client acknowledged the socket's bytes up to that flush.
struct ResponsePeer {
    tap: Arc<Tap>,
    flushes: PipeFlushes,
    /// Flushes seen at the checks, oldest first, until the client acknowledged them.
    seen: VecDeque<Flushed>,
    /// Body bytes known received.
    received: u64,
}

/// Flushes kept at most: past that the newest takes the last one's place (it settles later).
const MAX_FLUSHES: usize = 64;

impl ResponsePeer {
    fn received(&mut self) -> u64 {
        if let Some(latest) = self.flushes.last()
            && self.seen.back() != Some(&latest)
        {
            if self.seen.len() >= MAX_FLUSHES {
                self.seen.pop_back();
            }
            self.seen.push_back(latest);
        }
        // Once the connection is gone nothing more is learnt: what was received stays.
        if let Some(acknowledged) = self.tap.acknowledged() {
            while let Some(flushed) = self.seen.front()
                && flushed.socket_bytes <= acknowledged
            {
                self.received = self.received.max(flushed.body_bytes);
                self.seen.pop_front();
            }
        }
        self.received
    }
}

impl WriteHalf {
    /// A writer whose bytes go through something that cannot tell what its peer received.
    pub(crate) fn new(io: impl AsyncWrite + Send + 'static) -> WriteHalf {
        WriteHalf { io: Box::pin(io), peer: Peer::Unknown }
    }

    /// A TCP socket's half.
    pub(crate) fn tcp(half: OwnedWriteHalf) -> WriteHalf {
        let socket = half.as_ref().as_raw_fd();
        WriteHalf { io: Box::pin(half), peer: Peer::Socket(socket) }
    }

    /// A response body's pipe, on the connection `tap` watches.
    pub(crate) fn response(pipe: PipeWriter, tap: Arc<Tap>) -> WriteHalf {
        let flushes = pipe.flushes_on(&tap);
        let peer = ResponsePeer { tap, flushes, seen: VecDeque::new(), received: 0 };
        WriteHalf { io: Box::pin(pipe), peer: Peer::Response(Box::new(peer)) }
    }
}

impl Unacknowledged for WriteHalf {
    fn tells(&self) -> bool {
        cfg!(any(target_os = "linux", target_os = "android")) && !matches!(self.peer, Peer::Unknown)
    }

    fn received(&mut self, written: u64) -> Option<u64> {
        match &mut self.peer {
            Peer::Unknown => None,
            // The kernel's send queue holds the bytes written that the peer has not acknowledged.
            Peer::Socket(socket) => send_queue(*socket).map(|queued| written.saturating_sub(queued)),
            Peer::Response(peer) => Some(peer.received()),
        }
    }
}

/// The bytes in `socket`'s send queue, not yet acknowledged by the peer (`SIOCOUTQ`, which is
/// `TIOCOUTQ` for sockets; neither rustix, socket2 nor nix wraps it). `socket` must be open.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub(crate) fn send_queue(socket: RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the caller keeps `socket` open, and the ioctl writes one int.
    let done = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (done == 0).then(|| u64::try_from(queued).unwrap_or(0))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn send_queue(_socket: RawFd) -> Option<u64> {
    None
}

impl AsyncWrite for WriteHalf {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}
