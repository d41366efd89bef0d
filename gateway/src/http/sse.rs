//! `GET /sse`: Server-Sent Events. Checked like `/ws` before anything is streamed (a refusal is an
//! HTTP status and a JSON body); then the response body is the session's output. The session runs
//! as for a WebSocket, with [`SseCodec`]: it writes into a [`body_pipe`] whose other end is the
//! response body, and reads from a client that never speaks. A browser that leaves drops
//! the body, and the session's next write (a heartbeat comment at the latest) fails.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, ReadBuf};

use super::auth::{self, Rejection};
use super::body_pipe::body_pipe;
use super::server::{Body, admit, refuse, refused_origin};
use crate::Shared;
use crate::close::{Close, CloseCode};
use crate::cluster::policy::PolicyError;
use crate::codec::sse::close_event;
use crate::codec::{Codec, SseCodec};
use crate::session::{self, Connection};
use crate::websocket::reader::MessageReader;

/// Bytes the pipe between the session and the response body holds.
const PIPE_BYTES: usize = 64 * 1024;

/// Opens an event stream for the request, or refuses it.
pub(crate) async fn stream(shared: Arc<Shared>, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    match open(shared.clone(), &request, peer).await {
        Ok(response) => response,
        Err(refused) => refuse(&shared, &request, peer, &refused).map(Either::Left),
    }
}

async fn open(shared: Arc<Shared>, request: &Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Rejection> {
    if let Some(origin) = refused_origin(&shared.config.allowed_origins, request) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("origin {origin} is not allowed"),
        ));
    }
    let mut connect = auth::authorize(request, &shared.verifier)?;
    if !shared.health.ready() {
        return Ok(not_ready(&shared));
    }
    // A browser reconnecting says where it stopped; that wins over the URL's `since`.
    if let Some(last) = request.headers().get("last-event-id") {
        connect.since = Some(last_event_id(last)?);
    }
    let (address, permit) = admit(&shared, request, peer)?;
    let conn = crate::id::random_id(12);
    match shared.policies.reserve(&connect.claims.sub, &conn).await {
        Ok(()) => {}
        Err(PolicyError::Taken) => {
            return Err(Rejection::new(StatusCode::CONFLICT, "conflict", PolicyError::Taken.to_string()));
        }
        Err(error) => return Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string())),
    }
    let (session_end, body_end) = body_pipe(PIPE_BYTES);
    let connection = Connection {
        reader: MessageReader::new(Box::pin(Silent), shared.config.max_frame_bytes),
        write_half: Box::pin(session_end),
        codec: Codec::Sse(SseCodec::default()),
    };
    let tracker = shared.sessions.clone();
    tracker.spawn(async move {
        let _permit = permit;
        session::run_with(shared, connection, connect, conn, address).await;
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/event-stream")
        .header(CACHE_CONTROL, "no-store")
        // Reverse proxies (nginx) must pass events on as they come.
        .header("x-accel-buffering", HeaderValue::from_static("no"))
        .body(Either::Right(body_end.boxed_unsync()))
        .expect("static response parts are valid");
    Ok(response)
}

/// The sequence number a `Last-Event-ID` header holds (spaces around it allowed).
pub(crate) fn last_event_id(value: &HeaderValue) -> Result<u64, Rejection> {
    let last = value.to_str().ok().and_then(|last| last.trim().parse::<u64>().ok());
    last.ok_or_else(|| {
        Rejection::new(StatusCode::BAD_REQUEST, "bad_request", "Last-Event-ID must be a sequence number")
    })
}

/// A gateway that is not ready yet (starting, NATS away) answers with a stream that ends at once:
/// a browser's EventSource gives up for good on an error status, but reconnects after a stream
/// ends (after `retry:`), which is what it should do here.
fn not_ready(shared: &Shared) -> Response<Body> {
    let close = Close::new(CloseCode::Unavailable, shared.health.problems().join("; "));
    let mut body = format!("retry: {}\n", crate::codec::sse::RETRY_MS).into_bytes();
    body.extend_from_slice(&close_event(&close));
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/event-stream")
        .header(CACHE_CONTROL, "no-store")
        .body(Either::Left(Full::new(Bytes::from(body))))
        .expect("static response parts are valid")
}

/// The client side of an event stream: it never sends anything.
struct Silent;

impl AsyncRead for Silent {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}
