//! SockJS's transports over plain HTTP requests, the fallbacks of a client whose WebSocket cannot
//! get through (a proxy that does not upgrade, or one that buffers responses):
//!
//! - `POST <key>/xhr_streaming`: a response that streams the session's frames, one per line, after
//!   a 2 KiB prelude; it ends after [`STREAM_BYTES`] and the client opens the next one;
//! - `GET <key>/eventsource`: the same as Server-Sent Events, one `data:` event per frame;
//! - `POST <key>/xhr`: a poll, answered as soon as the session sent something;
//! - `POST <key>/xhr_send`: the client's messages.
//!
//! The first receiving request of a key opens its session ([`super::session`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::session::{DISCONNECT_DELAY, NotOpened, Receiving, SockJsSession};
use crate::Shared;
use crate::codec::sockjs;
use crate::codec::stomp::Transport;
use crate::http::body::BodyError;
use crate::http::cors::allow_origin;
use crate::http::server::{Body, HttpResponse, admit, refuse};
use crate::websocket::piped::client_frame;

/// Bytes of frames after which a streaming response ends (the client opens the next one), so that
/// a browser does not keep a long session's every message in the response it holds.
pub(crate) const STREAM_BYTES: usize = 128 * 1024;
/// What an XHR streaming response starts with: 2 KiB of `h` and a newline, for browsers that show
/// nothing of a response before its first 2 KiB.
const PRELUDE_BYTES: usize = 2048;

/// How a receiving request carries the session's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Receiver {
    XhrStreaming,
    EventSource,
    XhrPolling,
}

impl Receiver {
    fn prelude(self) -> Vec<u8> {
        match self {
            Receiver::XhrStreaming => {
                let mut prelude = vec![b'h'; PRELUDE_BYTES];
                prelude.push(b'\n');
                prelude
            }
            Receiver::EventSource => b"\r\n".to_vec(),
            Receiver::XhrPolling => Vec::new(),
        }
    }

    /// `frames` as this receiver writes them.
    fn write(self, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(frames.iter().map(|frame| frame.len() + 10).sum());
        for frame in frames {
            match self {
                Receiver::EventSource => {
                    bytes.extend_from_slice(b"data: ");
                    bytes.extend_from_slice(frame);
                    bytes.extend_from_slice(b"\r\n\r\n");
                }
                Receiver::XhrStreaming | Receiver::XhrPolling => {
                    bytes.extend_from_slice(frame);
                    bytes.push(b'\n');
                }
            }
        }
        bytes
    }

    /// Whether the response ends after `sent` bytes of frames.
    fn done(self, sent: usize) -> bool {
        match self {
            Receiver::XhrPolling => sent > 0,
            Receiver::XhrStreaming | Receiver::EventSource => sent >= STREAM_BYTES,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Receiver::EventSource => "text/event-stream; charset=UTF-8",
            Receiver::XhrStreaming | Receiver::XhrPolling => "application/javascript; charset=UTF-8",
        }
    }
}

/// A receiving request of session `key`: opens the session if it is new, then carries its frames.
pub(crate) async fn receive(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    key: &str,
    receiver: Receiver,
) -> Response<Body> {
    let session = match shared.sockjs.get(key) {
        Some(session) => session,
        None => match open(&shared, &request, peer, key) {
            Ok(session) => session,
            Err(refused) => return *refused,
        },
    };
    let Some(receiving) = session.receive() else {
        // As SockJS answers a second receiving request of a session.
        let mut body = receiver.prelude();
        body.extend_from_slice(&receiver.write(&[sockjs::close_payload(2010, "Another connection still open")]));
        return receiving_response(&request, receiver, Either::Left(Full::new(Bytes::from(body))));
    };
    let body = StreamBody::new(frames(receiving, receiver)).boxed_unsync();
    receiving_response(&request, receiver, Either::Right(body))
}

/// Opens session `key` and starts its STOMP session, which ends when the client closes it or
/// stops receiving for [`DISCONNECT_DELAY`]; its close is kept that long for the client's next
/// request.
fn open(
    shared: &Arc<Shared>,
    request: &Request<Incoming>,
    peer: SocketAddr,
    key: &str,
) -> Result<Arc<SockJsSession>, Box<Response<Body>>> {
    let (address, permit) = match admit(shared, request, peer) {
        Ok(admitted) => admitted,
        Err(refused) => return Err(Box::new(refuse(shared, request, peer, &refused).map(Either::Left))),
    };
    let hints = crate::http::stomp::hints(request);
    let (session, socket) = match shared.sockjs.open(key, shared.config.max_frame_bytes) {
        Ok(opened) => opened,
        Err(NotOpened::Exists) => {
            // Opened by a request of the same key meanwhile.
            let not_found = || Box::new(plain(request, StatusCode::NOT_FOUND, "No such session.").map(Either::Left));
            return shared.sockjs.get(key).ok_or_else(not_found);
        }
        Err(NotOpened::Closed) => {
            let closed = plain(request, StatusCode::SERVICE_UNAVAILABLE, "The server is shutting down.");
            return Err(Box::new(closed.map(Either::Left)));
        }
    };
    let (task_shared, task_session, key) = (shared.clone(), session.clone(), key.to_string());
    shared.sessions.spawn(async move {
        let _permit = permit;
        let (shared, session) = (task_shared, task_session);
        let stomp = crate::http::stomp::connect(
            shared.clone(),
            socket.reader,
            socket.writer,
            hints,
            address,
            Transport::SockJs,
        );
        tokio::pin!(stomp);
        let abandoned = tokio::select! {
            _ = &mut stomp => false,
            _ = session.abandoned() => true,
        };
        if abandoned {
            // The session runs on meanwhile: a request that came just now ends with its close.
            tokio::join!(session.end_socket(), stomp);
        } else if !shared.killed.is_cancelled() {
            // (A killed gateway sends no close.)
            let _ = tokio::time::timeout(DISCONNECT_DELAY, session.close_taken()).await;
        }
        shared.sockjs.remove(&key);
    });
    Ok(session)
}

/// `POST <key>/xhr_send`: the client's messages (a JSON array of strings), into session `key`.
pub(crate) async fn send(shared: Arc<Shared>, request: Request<Incoming>, key: &str) -> HttpResponse {
    let Some(session) = shared.sockjs.get(key) else {
        return plain(&request, StatusCode::NOT_FOUND, "No such session.");
    };
    let limit = shared.config.max_frame_bytes;
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, ());
    let body = match crate::http::body::read(request.headers(), body, limit, shared.config.request_body_timeout).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return plain(&request, StatusCode::PAYLOAD_TOO_LARGE, &format!("Payload over {limit} bytes."));
        }
        Err(BodyError::TimedOut) => return plain(&request, StatusCode::REQUEST_TIMEOUT, "Payload too slow."),
        Err(BodyError::CutOff) => return plain(&request, StatusCode::BAD_REQUEST, "Payload cut off."),
    };
    if body.is_empty() {
        return plain(&request, StatusCode::INTERNAL_SERVER_ERROR, "Payload expected.");
    }
    if sockjs::parse(&body).is_err() {
        return plain(&request, StatusCode::INTERNAL_SERVER_ERROR, "Broken JSON encoding.");
    }
    // A session that ended meanwhile drops them, as SockJS servers do: its close, which the
    // client's next receiving request takes, says why (a failed send would close the client with
    // 1006 before it saw that close).
    let _ = session.send(&client_frame(0x1, &body)).await;
    plain(&request, StatusCode::NO_CONTENT, "")
}

/// The response's body: the prelude, then the session's frames until the receiver is done with
/// them or the session closed.
fn frames(
    receiving: Receiving,
    receiver: Receiver,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
    let prelude = Some(receiver.prelude()).filter(|prelude| !prelude.is_empty());
    let frames = stream::unfold((Some(receiving), 0), move |(receiving, sent)| async move {
        let mut receiving = receiving.filter(|_| !receiver.done(sent))?;
        let frames = receiving.next_frames().await;
        let closed = frames.last().is_some_and(|frame| frame.starts_with(b"c["));
        let bytes = receiver.write(&frames);
        let sent = sent + bytes.len();
        Some((bytes, ((!closed).then_some(receiving), sent)))
    });
    stream::iter(prelude).chain(frames).map(|bytes| Ok(Frame::data(Bytes::from(bytes)))).boxed()
}

fn receiving_response<B>(request: &Request<B>, receiver: Receiver, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(receiver.content_type()));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
    // Reverse proxies (nginx) must pass frames on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    allow_origin(request, headers);
    response
}

/// A plain-text answer, as SockJS servers give to `xhr_send`.
fn plain<B>(request: &Request<B>, status: StatusCode, text: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=UTF-8"));
    allow_origin(request, headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_receiver_writes_frames_its_way_and_knows_when_it_is_done() {
        let frames = [b"o".to_vec(), b"a[\"x\"]".to_vec()];
        assert_eq!(Receiver::XhrStreaming.write(&frames), b"o\na[\"x\"]\n");
        assert_eq!(Receiver::XhrPolling.write(&frames), b"o\na[\"x\"]\n");
        assert_eq!(Receiver::EventSource.write(&frames), b"data: o\r\n\r\ndata: a[\"x\"]\r\n\r\n");
        assert_eq!(Receiver::XhrStreaming.prelude().len(), PRELUDE_BYTES + 1);
        assert_eq!(Receiver::EventSource.prelude(), b"\r\n");
        assert!(Receiver::XhrPolling.prelude().is_empty());
        assert!(!Receiver::XhrPolling.done(0) && Receiver::XhrPolling.done(1));
        assert!(!Receiver::XhrStreaming.done(STREAM_BYTES - 1) && Receiver::XhrStreaming.done(STREAM_BYTES));
        assert!(!Receiver::EventSource.done(STREAM_BYTES - 1) && Receiver::EventSource.done(STREAM_BYTES));
    }
}
