//! A SockJS session over plain HTTP requests, which outlives each of them: the session is a STOMP
//! session on a socket of in-memory pipes ([`crate::websocket::piped`]); `xhr_send` writes the
//! client's messages into its reader, and one receiving request at a time (a streaming response, or
//! a poll) takes the frames it wrote. Between receiving requests the session waits, and a session
//! with none for [`DISCONNECT_DELAY`] ends, as SockJS servers do.
//!
//! A session lives in one gateway's memory, so a proxy in front of several gateways must send a
//! session's requests to the same one (by the `<server>/<session>` path, or sticky sessions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use crate::codec::sockjs;
use crate::session::{ReadHalf, WriteHalf};
use crate::websocket::piped::{client_frame, frame_at};
use crate::websocket::reader::MessageReader;

/// How long a session waits for its next receiving request, and a closed one keeps its close
/// for the client's next request (SockJS's `disconnect_delay`).
pub(crate) const DISCONNECT_DELAY: Duration = Duration::from_secs(5);
/// Room in each pipe: a client that stops receiving stops the session's writes there.
const PIPE_BYTES: usize = 64 * 1024;
/// Bytes read from the session's output at a time (held by every waiting receiver).
const CHUNK: usize = 4 * 1024;

/// The SockJS sessions over HTTP requests of this gateway, by `<server>/<session>`.
#[derive(Default)]
pub(crate) struct SockJsSessions {
    table: Mutex<Table>,
    /// How many there are, for a draining gateway to wait until none is left.
    count: watch::Sender<usize>,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Arc<SockJsSession>>,
    /// Set when the gateway drains: no session opens after that.
    closed: bool,
}

/// Why a session did not open.
#[derive(Debug)]
pub(crate) enum NotOpened {
    /// A session of that key exists.
    Exists,
    /// The gateway is draining.
    Closed,
}

/// A new session's socket: what its STOMP session reads and writes.
pub(crate) struct SessionSocket {
    pub(crate) reader: MessageReader<ReadHalf>,
    pub(crate) writer: WriteHalf,
}

impl SockJsSessions {
    /// A new session `key` and its socket.
    pub(crate) fn open(
        &self,
        key: &str,
        max_frame_bytes: usize,
    ) -> Result<(Arc<SockJsSession>, SessionSocket), NotOpened> {
        let mut table = self.lock();
        if table.closed {
            return Err(NotOpened::Closed);
        }
        if table.sessions.contains_key(key) {
            return Err(NotOpened::Exists);
        }
        let (session_in, client_in) = tokio::io::duplex(PIPE_BYTES);
        let (session_out, client_out) = tokio::io::duplex(PIPE_BYTES);
        let session = Arc::new(SockJsSession {
            input: tokio::sync::Mutex::new(Some(client_in)),
            output: Arc::new(tokio::sync::Mutex::new(Output {
                pipe: Some(client_out),
                buffered: Vec::new(),
                taken: Vec::new(),
                close: None,
            })),
            receivers: watch::Sender::new(Receivers::default()),
            close_taken: watch::Sender::new(false),
        });
        table.sessions.insert(key.to_string(), session.clone());
        self.count.send_replace(table.sessions.len());
        let reader: ReadHalf = Box::pin(session_in);
        let writer = WriteHalf::new(session_out);
        Ok((session, SessionSocket { reader: MessageReader::new(reader, max_frame_bytes), writer }))
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<SockJsSession>> {
        self.lock().sessions.get(key).cloned()
    }

    pub(crate) fn remove(&self, key: &str) {
        let mut table = self.lock();
        table.sessions.remove(key);
        self.count.send_replace(table.sessions.len());
    }

    /// Opens no session from now on: the gateway drains.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Resolves once no session is left (for good, once closed).
    pub(crate) async fn emptied(&self) {
        let _ = self.count.subscribe().wait_for(|&count| count == 0).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's ends of its pipes.
pub(crate) struct SockJsSession {
    /// Into the session's reader; none once the session is abandoned.
    input: tokio::sync::Mutex<Option<DuplexStream>>,
    /// From the session's writer, held by the receiving request.
    output: Arc<tokio::sync::Mutex<Output>>,
    /// Whether a request is receiving, and how many did.
    receivers: watch::Sender<Receivers>,
    /// Whether a request took the session's close.
    close_taken: watch::Sender<bool>,
}

#[derive(Clone, Copy, Default)]
struct Receivers {
    open: bool,
    opened: u64,
}

struct Output {
    /// None once the session is abandoned.
    pipe: Option<DuplexStream>,
    /// Bytes of the session's output that are not a whole frame yet.
    buffered: Vec<u8>,
    /// Text frames taken from `buffered`, not yet given to a request.
    taken: Vec<Vec<u8>>,
    /// The session's close frame (`c[code,"reason"]`), once it came.
    close: Option<Vec<u8>>,
}

impl Output {
    /// Moves the whole text frames at the start of `buffered` to `taken`, and notes the close
    /// (the session's SockJS close, a text frame, comes before its WebSocket close); the payloads
    /// of its pings.
    fn take_frames(&mut self) -> Vec<Vec<u8>> {
        let (mut pings, mut at) = (Vec::new(), 0);
        while let Some((opcode, start, end)) = frame_at(&self.buffered[at..]) {
            let payload = &self.buffered[at + start..at + end];
            at += end;
            match opcode {
                0x1 => {
                    if payload.starts_with(b"c[") {
                        self.close = Some(payload.to_vec());
                    }
                    self.taken.push(payload.to_vec());
                }
                0x9 => pings.push(payload.to_vec()),
                0x8 => {
                    self.close.get_or_insert_with(go_away);
                    break;
                }
                _ => {}
            }
        }
        self.buffered.drain(..at);
        pings
    }
}

/// The close of a session whose socket ended without one.
fn go_away() -> Vec<u8> {
    sockjs::close_payload(3000, "Go away!")
}

impl SockJsSession {
    /// Writes a client frame into the session's reader.
    pub(crate) async fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut input = self.input.lock().await;
        input.as_mut().ok_or(std::io::ErrorKind::NotConnected)?.write_all(frame).await
    }

    /// The session's output for one receiving request; none while another request has it.
    pub(crate) fn receive(self: &Arc<Self>) -> Option<Receiving> {
        let output = self.output.clone().try_lock_owned().ok()?;
        self.receivers.send_modify(|receivers| {
            receivers.open = true;
            receivers.opened += 1;
        });
        Some(Receiving { session: self.clone(), output })
    }

    /// Resolves when no request has received for [`DISCONNECT_DELAY`]: the client is gone.
    pub(crate) async fn abandoned(&self) {
        let mut receivers = self.receivers.subscribe();
        loop {
            // Counted, not only flagged: a poll answered at once opens and ends between two looks.
            let Ok(opened) = receivers.wait_for(|receivers| !receivers.open).await.map(|idle| idle.opened) else {
                return;
            };
            let back = receivers.wait_for(|receivers| receivers.open || receivers.opened != opened);
            if tokio::time::timeout(DISCONNECT_DELAY, back).await.is_err() {
                return;
            }
        }
    }

    /// Ends the session's socket: it reads the end of its input, and its writes fail.
    pub(crate) async fn end_socket(&self) {
        self.input.lock().await.take();
        self.output.lock().await.pipe.take();
    }

    /// Resolves once a request took the session's close.
    pub(crate) async fn close_taken(&self) {
        let _ = self.close_taken.subscribe().wait_for(|taken| *taken).await;
    }
}

/// The session's output, held by one receiving request.
pub(crate) struct Receiving {
    session: Arc<SockJsSession>,
    output: tokio::sync::OwnedMutexGuard<Output>,
}

impl Receiving {
    /// The next frames the session sent (their payloads); the last is the close when the session
    /// closed, and a closed session gives its close again. Pings are answered on the way. Frames
    /// are taken only when returned: a request dropped meanwhile leaves them to the next.
    pub(crate) async fn next_frames(&mut self) -> Vec<Vec<u8>> {
        let mut chunk = vec![0; CHUNK];
        loop {
            for ping in self.output.take_frames() {
                // The session hears its client through this pong (its liveness is its requests);
                // a session gone gives its close. Not awaited here: a session whose answers wait
                // reads no input, so the pong may wait behind an `xhr_send` until this request has
                // taken those answers.
                let session = self.session.clone();
                tokio::spawn(async move { session.send(&client_frame(0xA, &ping)).await });
            }
            let frames = match (std::mem::take(&mut self.output.taken), &self.output.close) {
                (taken, _) if !taken.is_empty() => taken,
                (_, Some(close)) => vec![close.clone()],
                (_, None) => {
                    self.read(&mut chunk).await;
                    continue;
                }
            };
            if self.output.close.is_some() {
                self.session.close_taken.send_replace(true);
            }
            return frames;
        }
    }

    /// Reads more of the session's output; the end of it (an abandoned session's) is its close.
    async fn read(&mut self, chunk: &mut [u8]) {
        let read = match self.output.pipe.as_mut() {
            Some(pipe) => pipe.read(chunk).await,
            None => Ok(0),
        };
        match read {
            Ok(0) | Err(_) => {
                self.output.close.get_or_insert_with(go_away);
            }
            Ok(n) => self.output.buffered.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.session.receivers.send_modify(|receivers| receivers.open = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame;

    #[tokio::test]
    async fn closed_sessions_open_no_more_and_tell_when_the_last_is_gone() {
        let sessions = SockJsSessions::default();
        let _opened = sessions.open("1/a", 1024).unwrap();
        sessions.close();
        assert!(matches!(sessions.open("1/b", 1024), Err(NotOpened::Closed)));
        let emptied = sessions.emptied();
        tokio::pin!(emptied);
        assert!(futures::poll!(emptied.as_mut()).is_pending(), "1/a is open");
        sessions.remove("1/a");
        emptied.await;
    }

    #[tokio::test]
    async fn frames_come_whole_pings_are_answered_and_the_close_stays() {
        let sessions = SockJsSessions::default();
        let (session, mut socket) = sessions.open("1/a", 1024).unwrap();
        assert!(matches!(sessions.open("1/a", 1024), Err(NotOpened::Exists)), "one session per key");
        let mut receiving = session.receive().unwrap();
        assert!(session.receive().is_none(), "one receiving request at a time");
        let mut written = frame::text(b"o").to_vec();
        written.extend_from_slice(&frame::ping());
        written.extend_from_slice(&frame::text(b"a[\"x\"]"));
        socket.writer.write_all(&written).await.unwrap();
        assert_eq!(receiving.next_frames().await, [b"o".to_vec(), b"a[\"x\"]".to_vec()]);
        assert!(matches!(socket.reader.next().await, Ok(crate::websocket::reader::Inbound::Pong)));

        drop(receiving);
        let mut receiving = session.receive().expect("the next request receives");
        socket.writer.write_all(&frame::text(b"c[3000,\"bye\"]")).await.unwrap();
        socket.writer.write_all(&frame::close(3000, "bye")).await.unwrap();
        assert_eq!(receiving.next_frames().await, [b"c[3000,\"bye\"]".to_vec()]);
        drop(receiving);
        let mut receiving = session.receive().unwrap();
        assert_eq!(receiving.next_frames().await, [b"c[3000,\"bye\"]".to_vec()], "the close, again");
        session.close_taken().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_without_a_receiving_request_for_the_delay_is_abandoned() {
        let sessions = SockJsSessions::default();
        let (session, _socket) = sessions.open("1/a", 1024).unwrap();
        let receiving = session.receive().unwrap();
        let abandoned = session.abandoned();
        tokio::pin!(abandoned);
        let held = tokio::time::timeout(DISCONNECT_DELAY * 3, &mut abandoned).await;
        assert!(held.is_err(), "not while a request receives");
        drop(receiving);
        tokio::time::sleep(DISCONNECT_DELAY / 2).await;
        let _back = session.receive().unwrap();
        let held = tokio::time::timeout(DISCONNECT_DELAY * 3, &mut abandoned).await;
        assert!(held.is_err(), "a request came back within the delay");
        drop(_back);
        let started = tokio::time::Instant::now();
        abandoned.await;
        assert_eq!(started.elapsed(), DISCONNECT_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_polled_often_is_not_abandoned() {
        let sessions = SockJsSessions::default();
        let (session, _socket) = sessions.open("1/a", 1024).unwrap();
        let polls = async {
            // Polls answered at once, each between two looks of the watch.
            for _ in 0..100 {
                drop(session.receive().unwrap());
                tokio::time::sleep(DISCONNECT_DELAY / 50).await;
            }
        };
        tokio::select! {
            _ = session.abandoned() => panic!("abandoned while polled"),
            _ = polls => {}
        }
    }
}
