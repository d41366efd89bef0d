//! Engine.IO's HTTP long-polling transport, and its upgrade to a WebSocket. A polling session is
//! a session like any other whose socket is a pair of in-memory pipes: a POST writes the client's
//! packets into the session's reader as WebSocket frames, a GET takes the frames the session wrote
//! and answers with their packets. An upgrade moves the session onto the WebSocket without
//! restarting it. Sessions live in one gateway's memory: a proxy must send a client's requests to
//! the same gateway (sticky routing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

use crate::session::{ReadHalf, Socket, WriteHalf};
use crate::websocket::piped::{client_frame, frame_at};
use crate::websocket::reader::{Inbound, MessageReader};

/// The separator of packets in a polling request or response.
pub(crate) const SEPARATOR: u8 = 0x1e;
/// Room in each pipe: a client that stops polling stops the session's writes there.
const PIPE_BYTES: usize = 256 * 1024;
/// The most packets one GET answers with: python-engineio refuses a response with more
/// (`Payload.max_decode_packets`, 16) and drops the connection, messages and all; the rest waits
/// for the next GET.
const MAX_PACKETS_PER_POLL: usize = 16;

/// The polling sessions of this gateway, by Engine.IO `sid`.
#[derive(Default)]
pub(crate) struct PollingSessions(Mutex<HashMap<String, Arc<Polling>>>);

impl PollingSessions {
    /// A new session `sid`, and the socket its session task runs on.
    pub(crate) fn open(&self, sid: &str, max_frame_bytes: usize) -> Socket {
        let (session_in, client_in) = tokio::io::duplex(PIPE_BYTES);
        let (session_out, client_out) = tokio::io::duplex(PIPE_BYTES);
        let polling = Polling {
            input: tokio::sync::Mutex::new(Some(client_in)),
            output: tokio::sync::Mutex::new(Output { pipe: Some(client_out), buffered: Vec::new() }),
            upgrading: CancellationToken::new(),
        };
        self.lock().insert(sid.to_string(), Arc::new(polling));
        let reader: ReadHalf = Box::pin(session_in);
        let writer = WriteHalf::new(session_out);
        Socket { reader: MessageReader::new(reader, max_frame_bytes), writer }
    }

    pub(crate) fn get(&self, sid: &str) -> Option<Arc<Polling>> {
        self.lock().get(sid).cloned()
    }

    pub(crate) fn remove(&self, sid: &str) {
        self.lock().remove(sid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Polling>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One polling session's ends of its pipes.
pub(crate) struct Polling {
    /// Into the session's reader; none once upgraded.
    input: tokio::sync::Mutex<Option<DuplexStream>>,
    /// From the session's writer, read by one GET at a time.
    output: tokio::sync::Mutex<Output>,
    /// Cancelled when the client upgrades: a waiting GET answers a noop.
    upgrading: CancellationToken,
}

struct Output {
    /// None once upgraded.
    pipe: Option<DuplexStream>,
    /// Bytes read from the pipe that are not a whole frame yet.
    buffered: Vec<u8>,
}

/// What a GET answers.
pub(crate) enum Poll {
    /// Packets, joined with the separator.
    Packets(Vec<u8>),
    /// The session ended.
    Closed,
    /// Another GET is waiting on the session: Engine.IO allows one at a time.
    Overlap,
}

impl Polling {
    /// A POST: the client's packets, into the session.
    pub(crate) async fn post(&self, body: &[u8]) -> std::io::Result<()> {
        let mut input = self.input.lock().await;
        let pipe = input.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        for packet in body.split(|byte| *byte == SEPARATOR) {
            pipe.write_all(&client_frame(0x1, packet)).await?;
        }
        Ok(())
    }

    /// Ends the session as a client's close with `code` would.
    pub(crate) async fn close(&self, code: u16) {
        if let Some(pipe) = self.input.lock().await.as_mut() {
            let _ = pipe.write_all(&client_frame(0x8, &code.to_be_bytes())).await;
        }
    }

    /// A GET: waits for what the session writes (a noop when the client upgrades meanwhile).
    pub(crate) async fn poll(&self) -> Poll {
        let noop = || Poll::Packets(b"6".to_vec());
        let Ok(mut output) = self.output.try_lock() else {
            // An upgrade takes the output for a moment, after it ended the GETs.
            return if self.upgrading.is_cancelled() { noop() } else { Poll::Overlap };
        };
        let mut chunk = vec![0; 16 * 1024];
        loop {
            let (packets, closed) = take_packets(&mut output.buffered);
            if !packets.is_empty() {
                return Poll::Packets(packets.join(&SEPARATOR));
            }
            if closed {
                return Poll::Closed;
            }
            let Some(pipe) = output.pipe.as_mut() else { return noop() };
            let read = tokio::select! {
                read = pipe.read(&mut chunk) => read,
                _ = self.upgrading.cancelled() => return noop(),
            };
            match read {
                Ok(0) | Err(_) => return Poll::Closed,
                Ok(n) => output.buffered.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the session, which ended, left packets no poll took yet that fit in `limit` bytes
    /// (a refusal, a last notice): what its pipe still holds is read for that. `false` while a poll
    /// is taking it, or when more was left (the client stopped polling long ago).
    pub(crate) fn left_last_words(&self, limit: usize) -> bool {
        let Ok(mut output) = self.output.try_lock() else { return false };
        let Output { pipe, buffered } = &mut *output;
        let Some(pipe) = pipe.as_mut() else { return false };
        let mut chunk = [0; 4096];
        // The session's end of the pipe is gone: what it holds is there at once, then its end.
        while let Some(Ok(read @ 1..)) = pipe.read(&mut chunk).now_or_never() {
            buffered.extend_from_slice(&chunk[..read]);
            if buffered.len() > limit {
                return false;
            }
        }
        !take_packets(&mut buffered.clone()).0.is_empty()
    }

    /// Moves the session onto `socket` (whose client sent the upgrade packet), relaying until
    /// either side ends.
    pub(crate) async fn upgrade(&self, socket: Socket) {
        self.upgrading.cancel();
        let (pipe, buffered) = {
            let mut output = self.output.lock().await;
            (output.pipe.take(), std::mem::take(&mut output.buffered))
        };
        let input = self.input.lock().await.take();
        let (Some(mut pipe), Some(mut input)) = (pipe, input) else { return };
        let Socket { mut reader, mut writer } = socket;
        let to_client = async {
            // What no GET took yet goes first, as it was written.
            writer.write_all(&buffered).await?;
            tokio::io::copy(&mut pipe, &mut writer).await?;
            writer.shutdown().await
        };
        let to_session = relay_client(&mut reader, &mut input);
        tokio::select! {
            _ = to_client => {}
            _ = to_session => {}
        }
    }
}

/// The client's messages from the WebSocket, into the session's pipe as frames.
async fn relay_client(reader: &mut MessageReader<ReadHalf>, input: &mut DuplexStream) -> std::io::Result<()> {
    loop {
        match reader.next().await {
            Ok(Inbound::Text(text)) => input.write_all(&client_frame(0x1, &text)).await?,
            Ok(Inbound::Close(code)) => {
                return input.write_all(&client_frame(0x8, &code.unwrap_or(1000).to_be_bytes())).await;
            }
            // Binary messages are refused by the reader (Engine.IO text packets only).
            Ok(Inbound::Ping(_) | Inbound::Pong | Inbound::Binary(_)) => {}
            Err(_) => return input.write_all(&client_frame(0x8, &1000u16.to_be_bytes())).await,
        }
    }
}

/// The payloads of the whole text frames at the start of `buffered` (taken out, at most
/// [`MAX_PACKETS_PER_POLL`]), and whether a close frame came.
fn take_packets(buffered: &mut Vec<u8>) -> (Vec<Vec<u8>>, bool) {
    let mut packets = Vec::new();
    let mut at = 0;
    let mut closed = false;
    while packets.len() < MAX_PACKETS_PER_POLL
        && let Some((opcode, start, end)) = frame_at(&buffered[at..])
    {
        match opcode {
            0x1 => packets.push(buffered[at + start..at + end].to_vec()),
            0x8 => closed = true,
            _ => {}
        }
        at += end;
    }
    buffered.drain(..at);
    (packets, closed)
}

/// A polling response body of the handshake: the open packet.
pub(crate) fn open_packet(open: &serde_json::Value) -> Bytes {
    let mut body = vec![crate::codec::socketio::wire::engine::OPEN];
    body.extend_from_slice(open.to_string().as_bytes());
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_session_keeps_only_a_few_last_packets_for_the_next_poll() {
        let sessions = PollingSessions::default();
        let ended_with = |sid: &'static str, frame: Option<Bytes>| {
            let mut socket = sessions.open(sid, 1 << 20);
            async move {
                if let Some(frame) = frame {
                    socket.writer.write_all(&frame).await.unwrap();
                }
            }
        };
        ended_with("refused", Some(crate::websocket::frame::text(b"44{\"message\":\"no\"}"))).await;
        ended_with("a lot left", Some(crate::websocket::frame::text(&[b'x'; 2000]))).await;
        ended_with("nothing left", None).await;
        let left = |sid| sessions.get(sid).unwrap().left_last_words(1024);
        assert_eq!((left("refused"), left("a lot left"), left("nothing left")), (true, false, false));
    }

    #[test]
    fn server_frames_become_packets() {
        let mut buffered = crate::websocket::frame::text(b"42[\"a\"]").to_vec();
        buffered.extend_from_slice(&crate::websocket::frame::text(&[b'x'; 200]));
        let partial = crate::websocket::frame::text(b"2");
        buffered.extend_from_slice(&partial[..1]);
        let (packets, closed) = take_packets(&mut buffered);
        assert_eq!(packets, vec![b"42[\"a\"]".to_vec(), vec![b'x'; 200]]);
        assert!(!closed);
        assert_eq!(buffered, partial[..1].to_vec());
    }
}
