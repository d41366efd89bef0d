//! SockJS's XHR streaming transport, the first fallback of a client whose WebSocket cannot get
//! through (a proxy that does not upgrade): `POST <server>/<session>/xhr_streaming` is a response
//! that streams the session's frames, one per line, and `POST <server>/<session>/xhr_send` carries
//! the client's messages. The session is the same STOMP session as over SockJS's WebSocket, on a
//! socket of in-memory pipes ([`crate::websocket::piped`]); the response turns the WebSocket frames
//! it writes into lines, and answers its pings (the client's liveness is its open response).
//!
//! A session lives in one gateway's memory, so a proxy in front of several gateways must send a
//! session's requests to the same one (by the `<server>/<session>` path, or sticky sessions). The
//! stream is not cut after a byte limit as some SockJS servers do: it ends with the session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::cors;
use crate::Shared;
use crate::codec::sockjs;
use crate::codec::stomp::Transport;
use crate::http::server::{Body, HttpResponse, admit, refuse};
use crate::session::{ReadHalf, WriteHalf};
use crate::websocket::piped::{client_frame, frame_at};
use crate::websocket::reader::MessageReader;

/// Room in each pipe: a client that stops reading its response stops the session's writes there.
const PIPE_BYTES: usize = 64 * 1024;
/// Bytes read from the session's output at a time (held by every idle stream).
const CHUNK: usize = 4 * 1024;
/// What a streaming response starts with: 2 KiB of `h` and a newline, for browsers that show
/// nothing of a response before its first 2 KiB.
const PRELUDE_BYTES: usize = 2048;

/// The XHR streaming sessions of this gateway, by `<server>/<session>`.
#[derive(Default)]
pub(crate) struct XhrSessions(Mutex<HashMap<String, Arc<XhrSession>>>);

/// The way into one session's reader; none once its stream is gone.
pub(crate) struct XhrSession {
    input: tokio::sync::Mutex<Option<DuplexStream>>,
}

impl XhrSession {
    /// Writes a client frame into the session's reader.
    async fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut input = self.input.lock().await;
        input.as_mut().ok_or(std::io::ErrorKind::NotConnected)?.write_all(frame).await
    }
}

impl XhrSessions {
    /// A new session `key` and its socket's halves; none if a session of that key is open.
    fn open(&self, key: &str, max_frame_bytes: usize) -> Option<(MessageReader<ReadHalf>, WriteHalf, DuplexStream)> {
        let mut sessions = self.lock();
        if sessions.contains_key(key) {
            return None;
        }
        let (session_in, client_in) = tokio::io::duplex(PIPE_BYTES);
        let (session_out, client_out) = tokio::io::duplex(PIPE_BYTES);
        sessions.insert(key.to_string(), Arc::new(XhrSession { input: tokio::sync::Mutex::new(Some(client_in)) }));
        let reader: ReadHalf = Box::pin(session_in);
        let writer: WriteHalf = Box::pin(session_out);
        Some((MessageReader::new(reader, max_frame_bytes), writer, client_out))
    }

    fn get(&self, key: &str) -> Option<Arc<XhrSession>> {
        self.lock().get(key).cloned()
    }

    fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<XhrSession>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `POST <key>/xhr_streaming`: opens session `key` and streams what it sends.
pub(crate) async fn streaming(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    key: &str,
) -> Response<Body> {
    let (address, permit) = match admit(&shared, &request, peer) {
        Ok(admitted) => admitted,
        Err(refused) => return refuse(&shared, &request, peer, &refused).map(Either::Left),
    };
    let hints = crate::http::stomp::hints(&request);
    let Some((reader, writer, output)) = shared.xhr.open(key, shared.config.max_frame_bytes) else {
        // As SockJS answers a second stream of an open session.
        let mut body = prelude();
        body.extend_from_slice(&sockjs::close_payload(2010, "Another connection still open"));
        body.push(b'\n');
        return streaming_response(&request, Either::Left(Full::new(Bytes::from(body))));
    };
    let session = shared.xhr.get(key).expect("just opened");
    let tracker = shared.sessions.clone();
    let (task_shared, key) = (shared.clone(), key.to_string());
    tracker.spawn(async move {
        let _permit = permit;
        let shared = task_shared;
        crate::http::stomp::connect(shared.clone(), reader, writer, hints, address, Transport::SockJs).await;
        shared.xhr.remove(&key);
    });
    let body = StreamBody::new(lines(output, session)).boxed_unsync();
    streaming_response(&request, Either::Right(body))
}

/// `POST <key>/xhr_send`: the client's messages (a JSON array of strings), into session `key`.
pub(crate) async fn send(shared: Arc<Shared>, request: Request<Incoming>, key: &str) -> HttpResponse {
    let Some(session) = shared.xhr.get(key) else {
        return plain(&request, StatusCode::NOT_FOUND, "No such session.");
    };
    let limit = shared.config.max_frame_bytes;
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, ());
    let Ok(body) = http_body_util::Limited::new(body, limit).collect().await.map(|body| body.to_bytes()) else {
        return plain(&request, StatusCode::PAYLOAD_TOO_LARGE, &format!("Payload over {limit} bytes."));
    };
    if body.is_empty() {
        return plain(&request, StatusCode::INTERNAL_SERVER_ERROR, "Payload expected.");
    }
    if sockjs::parse(&body).is_err() {
        return plain(&request, StatusCode::INTERNAL_SERVER_ERROR, "Broken JSON encoding.");
    }
    match session.send(&client_frame(0x1, &body)).await {
        Ok(()) => plain(&request, StatusCode::NO_CONTENT, ""),
        Err(_) => plain(&request, StatusCode::NOT_FOUND, "No such session."),
    }
}

/// The response's body: the prelude, then each text frame the session writes as a line, until it
/// writes its close; its pings are answered with pongs.
fn lines(
    output: DuplexStream,
    session: Arc<XhrSession>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
    let start = Lines { output, session, buffered: Vec::new(), prelude: true, ended: false };
    stream::unfold(start, |mut lines| async move {
        if std::mem::take(&mut lines.prelude) {
            return Some((Ok(Frame::data(Bytes::from(prelude()))), lines));
        }
        let chunk = lines.next_chunk().await?;
        Some((Ok(Frame::data(chunk)), lines))
    })
    .boxed()
}

struct Lines {
    output: DuplexStream,
    session: Arc<XhrSession>,
    /// Bytes of the session's output that are not a whole frame yet.
    buffered: Vec<u8>,
    prelude: bool,
    ended: bool,
}

impl Lines {
    /// The next lines to send; none once the session closed or the pipe ended.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let mut chunk = vec![0; CHUNK];
        loop {
            if self.ended {
                return None;
            }
            let (text, pings, closed) = self.take_frames();
            self.ended = closed;
            for ping in pings {
                // The session hears its client through this pong; a session gone ends the body below.
                let _ = self.session.send(&client_frame(0xA, &ping)).await;
            }
            if !text.is_empty() {
                return Some(Bytes::from(text));
            }
            if closed {
                return None;
            }
            match self.output.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffered.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The text frames at the start of the buffered output as lines, the payloads of its pings,
    /// and whether a close frame came.
    fn take_frames(&mut self) -> (Vec<u8>, Vec<Vec<u8>>, bool) {
        let (mut text, mut pings, mut closed, mut at) = (Vec::new(), Vec::new(), false, 0);
        while let Some((opcode, start, end)) = frame_at(&self.buffered[at..]) {
            let payload = &self.buffered[at + start..at + end];
            match opcode {
                0x1 => {
                    text.extend_from_slice(payload);
                    text.push(b'\n');
                }
                0x9 => pings.push(payload.to_vec()),
                0x8 => closed = true,
                _ => {}
            }
            at += end;
            if closed {
                break;
            }
        }
        self.buffered.drain(..at);
        (text, pings, closed)
    }
}

impl Drop for Lines {
    /// The response is gone (the client left, or the session ended): the session's input ends,
    /// so that it ends now rather than at its next write (a heartbeat away). A send under way
    /// keeps it; the next write ends it then.
    fn drop(&mut self) {
        if let Ok(mut input) = self.session.input.try_lock() {
            input.take();
        }
    }
}

fn prelude() -> Vec<u8> {
    let mut prelude = vec![b'h'; PRELUDE_BYTES];
    prelude.push(b'\n');
    prelude
}

fn streaming_response<B>(request: &Request<B>, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/javascript; charset=UTF-8"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
    // Reverse proxies (nginx) must pass frames on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(request, headers);
    response
}

/// A plain-text answer, as SockJS servers give to `xhr_send`.
fn plain<B>(request: &Request<B>, status: StatusCode, text: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=UTF-8"));
    cors(request, headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame;

    #[tokio::test]
    async fn frames_become_lines_pings_are_answered_and_the_close_ends_the_body() {
        let sessions = XhrSessions::default();
        let (mut reader, _writer, output) = sessions.open("1/a", 1024).unwrap();
        assert!(sessions.open("1/a", 1024).is_none(), "one stream per session");
        let (mut session_out, client_out) = tokio::io::duplex(1024);
        drop(output);
        let mut lines = Lines {
            output: client_out,
            session: sessions.get("1/a").unwrap(),
            buffered: Vec::new(),
            prelude: false,
            ended: false,
        };
        let mut written = frame::text(b"o").to_vec();
        written.extend_from_slice(&frame::ping());
        written.extend_from_slice(&frame::text(b"a[\"x\"]"));
        session_out.write_all(&written).await.unwrap();
        assert_eq!(lines.next_chunk().await.unwrap(), &b"o\na[\"x\"]\n"[..]);
        assert!(matches!(reader.next().await, Ok(crate::websocket::reader::Inbound::Pong)));
        session_out.write_all(&frame::text(b"c[3000,\"bye\"]")).await.unwrap();
        session_out.write_all(&frame::close(3000, "bye")).await.unwrap();
        assert_eq!(lines.next_chunk().await.unwrap(), &b"c[3000,\"bye\"]\n"[..]);
        assert_eq!(lines.next_chunk().await, None);
    }
}
