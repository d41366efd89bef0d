//! One raw socket: a single task that sleeps until the ring, its mailbox or its client has
//! something, then writes everything queued for it in one vectored write. It reads only to notice
//! the client leaving.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::broadcast::Receiver;

use super::batch::Batch;
use super::frame::READY;
use super::mailbox::Mailbox;
use super::ring::{self, RingEnd};
use super::users::Registration;

/// Sockets closed for falling behind, over the server's life.
static SLOW_CONSUMERS: AtomicU64 = AtomicU64::new(0);

/// Bounds of one socket's writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteLimits {
    /// Most buffers (iovecs) in one write.
    pub(crate) frames: usize,
    /// About the most bytes in one write.
    pub(crate) bytes: usize,
}

/// Why a socket stops.
enum Stop {
    /// It fell too far behind (a slow consumer).
    Behind(String),
    /// The client or the server is gone.
    Gone,
}

impl From<RingEnd> for Stop {
    fn from(end: RingEnd) -> Stop {
        match end {
            RingEnd::Lagged(missed) => Stop::Behind(format!("missed {missed} ring entries")),
            RingEnd::Closed => Stop::Gone,
        }
    }
}

/// What woke a waiting socket.
enum Wake {
    /// The next ring entry.
    Ring(Result<Bytes, RingEnd>),
    /// Frames in the mailbox (or it overflowed).
    Mail,
    /// The client sent something or hung up.
    Client,
}

/// Serves one upgraded connection until the client leaves or falls behind. `ring` was subscribed
/// and `mailbox` registered before the call, so the client misses nothing sent after `ready`.
pub(crate) async fn run(stream: TcpStream, ring: Receiver<Bytes>, mailbox: Option<Registration>, limits: WriteLimits) {
    if let Stop::Behind(why) = serve(stream, ring, mailbox.as_ref().map(Registration::mailbox), limits).await {
        closed_as_slow(&why);
    }
}

async fn serve(
    mut stream: TcpStream,
    mut ring: Receiver<Bytes>,
    mailbox: Option<&Mailbox>,
    limits: WriteLimits,
) -> Stop {
    let mut batch = Batch::new(limits.frames, limits.bytes);
    batch.push(Bytes::from_static(READY));
    loop {
        if let Err(stop) = gather(&mut ring, mailbox, &mut batch) {
            return stop;
        }
        if !batch.is_empty() {
            if batch.write_to(&mut stream).await.is_err() {
                return Stop::Gone;
            }
            continue;
        }
        match wait(&stream, &mut ring, mailbox).await {
            Wake::Ring(Ok(entry)) => batch.push(entry),
            Wake::Ring(Err(end)) => return end.into(),
            Wake::Mail => {}
            Wake::Client if client_left(&stream) => return Stop::Gone,
            Wake::Client => {}
        }
    }
}

/// Takes what waits in the ring and the mailbox into `batch`.
fn gather(ring: &mut Receiver<Bytes>, mailbox: Option<&Mailbox>, batch: &mut Batch) -> Result<(), Stop> {
    ring::take(ring, batch)?;
    if let Some(mailbox) = mailbox {
        mailbox.take(batch).map_err(|_| Stop::Behind("overflowed its mailbox".into()))?;
    }
    Ok(())
}

/// Sleeps until the ring has an entry for this socket, its mailbox has frames, or its client sent
/// something. Polls the socket's read readiness directly (no waiter list), so a wake-up from the
/// ring costs no more than the ring's own bookkeeping.
async fn wait(stream: &TcpStream, ring: &mut Receiver<Bytes>, mailbox: Option<&Mailbox>) -> Wake {
    let mut next = pin!(ring::next(ring));
    poll_fn(|cx| {
        if let Poll::Ready(entry) = next.as_mut().poll(cx) {
            return Poll::Ready(Wake::Ring(entry));
        }
        if mailbox.is_some_and(|mailbox| mailbox.poll_pending(cx).is_ready()) {
            return Poll::Ready(Wake::Mail);
        }
        stream.poll_read_ready(cx).map(|_| Wake::Client)
    })
    .await
}

/// Reads what the client sent (a close, pongs: nothing needs an answer here); returns whether the
/// client is gone.
fn client_left(stream: &TcpStream) -> bool {
    let mut sink = [0u8; 256];
    match stream.try_read(&mut sink) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Counts a socket closed for falling behind, and says so at every power of two.
fn closed_as_slow(why: &str) {
    let count = SLOW_CONSUMERS.fetch_add(1, Ordering::Relaxed) + 1;
    if count.is_power_of_two() {
        eprintln!("raw-server: {count} sockets closed as slow consumers so far (the latest {why})");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::broadcast;

    use super::*;
    use crate::client::ws::{Parsed, parse};
    use crate::raw::frame::text_frame;
    use crate::raw::users::Users;

    const LIMITS: WriteLimits = WriteLimits { frames: 64, bytes: 1 << 16 };

    /// A served socket and the client's end of it.
    async fn connected(
        ring: &broadcast::Sender<Bytes>,
        mailbox: Option<Registration>,
    ) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let served = tokio::spawn(run(server, ring.subscribe(), mailbox, LIMITS));
        (client, served)
    }

    /// Reads frames until `count` have arrived; returns their payloads.
    async fn read_frames(client: &mut TcpStream, count: usize) -> Vec<Vec<u8>> {
        let (mut buf, mut payloads) = (Vec::new(), Vec::new());
        while payloads.len() < count {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {} frames", payloads.len());
            buf.extend_from_slice(&chunk[..n]);
            while let Parsed::Frame(frame, used) = parse(&buf) {
                payloads.push(frame.payload.to_vec());
                buf.drain(..used);
            }
        }
        payloads
    }

    #[tokio::test]
    async fn sends_ready_then_broadcasts_and_unicasts() {
        let ring = ring::new(16);
        let users = Arc::new(Users::default());
        let (mut client, _served) = connected(&ring, Some(users.register("u1".into(), 1 << 16))).await;
        assert_eq!(read_frames(&mut client, 1).await, [b"ready"]);
        ring.send(text_frame(b"one")).unwrap();
        ring.send(text_frame(b"two")).unwrap();
        users.send("u1", b"mine");
        users.send("u2", b"not mine");
        let mut rest = read_frames(&mut client, 3).await;
        rest.sort();
        assert_eq!(rest, [&b"mine"[..], b"one", b"two"]);
    }

    #[tokio::test]
    async fn ends_when_the_client_leaves() {
        let ring = ring::new(16);
        let (mut client, served) = connected(&ring, None).await;
        read_frames(&mut client, 1).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn closes_a_socket_that_falls_a_ring_behind() {
        let ring = ring::new(4);
        let (mut client, served) = connected(&ring, None).await;
        read_frames(&mut client, 1).await;
        // Sent before the socket's task runs again: it finds itself lagging.
        for _ in 0..8 {
            ring.send(text_frame(b"x")).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing sent to a lagging socket");
    }
}
