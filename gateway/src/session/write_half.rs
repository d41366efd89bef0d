//! A connection's sending side: any writer (a WebSocket's TCP half, an HTTP body's pipe), and the
//! TCP socket beneath when the session writes straight into one, to ask how much of what was
//! written the peer has not acknowledged yet.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;

use super::transmit::Unacknowledged;

pub(crate) struct WriteHalf {
    io: Pin<Box<dyn AsyncWrite + Send>>,
    /// The socket `io` writes into, which `io` keeps open.
    socket: Option<RawFd>,
}

impl WriteHalf {
    /// A writer whose bytes go through something else first (an HTTP body, a polling session).
    pub(crate) fn new(io: impl AsyncWrite + Send + 'static) -> WriteHalf {
        WriteHalf { io: Box::pin(io), socket: None }
    }

    /// A TCP socket's half.
    pub(crate) fn tcp(half: OwnedWriteHalf) -> WriteHalf {
        let socket = Some(half.as_ref().as_raw_fd());
        WriteHalf { io: Box::pin(half), socket }
    }
}

impl Unacknowledged for WriteHalf {
    fn tells(&self) -> bool {
        cfg!(any(target_os = "linux", target_os = "android")) && self.socket.is_some()
    }

    /// The kernel's send queue: bytes written that the peer's TCP has not acknowledged.
    fn unacknowledged(&self) -> Option<u64> {
        self.socket.and_then(send_queue)
    }
}

/// The bytes in `socket`'s send queue, not yet acknowledged by the peer (`SIOCOUTQ`, which is
/// `TIOCOUTQ` for sockets; neither rustix, socket2 nor nix wraps it).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn send_queue(socket: RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `socket` is open (the writer that owns it is alive) and the ioctl writes one int.
    let done = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (done == 0).then(|| u64::try_from(queued).unwrap_or(0))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_queue(_socket: RawFd) -> Option<u64> {
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
