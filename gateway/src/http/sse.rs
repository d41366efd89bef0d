//! `GET /sse`: Server-Sent Events. Checked like `/ws` before anything is streamed (a refusal is an
//! HTTP status and a JSON body); then the response body is the session's output. The session runs
//! as for a WebSocket, with [`SseCodec`].
//!
//! A stream asked for on a new connection (what EventSource does) has the connection to itself
//! ([`serve_direct`]): the session writes into the socket as into a WebSocket's. A stream asked for
//! on a connection that served other requests is the HTTP layer's response: the session writes into
//! a [`body_pipe`] whose other end is the response body, and a browser that leaves is noticed when
//! the session's next write (a heartbeat comment at the latest) fails.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use super::admitted::Admitted;
use super::auth::{self, Rejection};
use super::body_pipe::body_pipe;
use super::cors;
use super::server::{Body, HttpResponse, admit, refuse, refused_origin};
use super::tap::Tap;
use crate::Shared;
use crate::close::{Close, CloseCode};
use crate::cluster::policy::PolicyError;
use crate::codec::sse::close_event;
use crate::codec::{Codec, SseCodec};
use crate::session::{Connection, ReadHalf, WriteHalf};
use crate::websocket::reader::MessageReader;

/// Bytes the pipe between the session and the response body holds.
const PIPE_BYTES: usize = 64 * 1024;

/// Opens an event stream for the request, or refuses it.
pub(crate) async fn stream(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    tap: Arc<Tap>,
) -> Response<Body> {
    match open(shared.clone(), &request, peer, tap).await {
        Ok(response) => response,
        Err(refused) => refuse(&shared, &request, peer, &refused).map(Either::Left),
    }
}

async fn open(
    shared: Arc<Shared>,
    request: &Request<Incoming>,
    peer: SocketAddr,
    tap: Arc<Tap>,
) -> Result<Response<Body>, Rejection> {
    let Some(admitted) = admit_stream(&shared, request, peer).await? else {
        let address = super::limits::client_address(peer.ip(), request.headers(), &shared.config.trusted_proxies);
        return Ok(not_ready(&shared, address));
    };
    let (session_end, body_end) = body_pipe(PIPE_BYTES);
    let connection = sse_connection(&shared, Box::pin(Silent), WriteHalf::response(session_end, tap));
    Starting { admitted, connection, head: Vec::new() }.spawn(shared);
    let mut response = Response::new(Either::Right(body_end.boxed_unsync()));
    *response.headers_mut() = stream_headers();
    Ok(response)
}

/// The headers of a stream's response.
fn stream_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Reverse proxies (nginx) must pass events on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers
}

/// A session's connection for a stream: the client's side and the stream's.
fn sse_connection(shared: &Shared, client: ReadHalf, stream: WriteHalf) -> Connection {
    Connection {
        reader: MessageReader::new(client, shared.config.max_frame_bytes),
        write_half: stream,
        codec: Codec::Sse(SseCodec::default()),
    }
}

/// A stream admitted, its transport ready but for the response head.
struct Starting {
    admitted: Admitted,
    connection: Connection,
    /// The response head, when the session writes straight into the socket.
    head: Vec<u8>,
}

impl Starting {
    /// Runs the session on its connection, after writing the head.
    fn spawn(self, shared: Arc<Shared>) {
        // Boxed: the task holds a pointer to it while the head is written, then the session.
        let mut starting = Box::new(self);
        shared.sessions.clone().spawn(async move {
            if !starting.head.is_empty() {
                // A failed write is the session's first failed write too; it ends there.
                let _ = starting.connection.write_half.write_all(&starting.head).await;
            }
            starting.session(shared).await;
        });
    }

    /// The box is freed here, before the session starts.
    fn session(self: Box<Self>, shared: Arc<Shared>) -> impl Future<Output = ()> + Send {
        let Starting { admitted, connection, .. } = *self;
        admitted.session(shared, connection)
    }
}

/// Checks a request for a stream and admits it; `None` when the gateway is not ready.
async fn admit_stream<B>(
    shared: &Arc<Shared>,
    request: &Request<B>,
    peer: SocketAddr,
) -> Result<Option<Admitted>, Rejection> {
    if let Some(origin) = refused_origin(&shared.config.allowed_origins, request) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("origin {origin} is not allowed"),
        ));
    }
    let mut connect = auth::authorize(request, &shared.verifier, shared.config.max_topics)?;
    connect.shares_device = !auth::names_device(request);
    if !shared.health.ready() {
        return Ok(None);
    }
    // A browser reconnecting says where it stopped; that wins over the URL's `since`, whose
    // `epoch` does not go with it (the URL stays the first one, the stream may have changed since).
    if let Some(last) = request.headers().get("last-event-id") {
        connect.since = Some(last_event_id(last)?);
        connect.epoch = None;
    }
    let (address, permit) = admit(shared, request, peer)?;
    let conn = crate::id::random_id(12);
    match shared.policies.reserve(&connect.claims.sub, &conn).await {
        Ok(()) => Ok(Some(Admitted { connect, conn, address, permit })),
        Err(PolicyError::Taken) => {
            Err(Rejection::new(StatusCode::CONFLICT, "conflict", PolicyError::Taken.to_string()))
        }
        Err(error) => Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string())),
    }
}

/// Serves a connection whose first request is a whole `GET /sse` head on the connection itself:
/// the response head is written by hand and the session writes its events straight into the
/// socket, as into a WebSocket, with neither the HTTP layer's buffers nor a pipe between. The body
/// ends when the connection closes (`Connection: close`, as HTTP/1.1 allows); a refusal is its
/// status and JSON body, then the close. Anything else (another route, a head not yet whole, a
/// gateway not ready) is left unread for the HTTP layer, which answers it as before: the
/// connection comes back.
pub(crate) async fn serve_direct(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), TcpStream> {
    let (request, head_len) = match first_request(&stream, shared.config.request_head_timeout).await {
        FirstRequest::Stream(request, head_len) => (*request, head_len),
        FirstRequest::Http => return Err(stream),
        FirstRequest::TooSlow => return Ok(()),
    };
    let allowing = cors::allowing(shared, &request);
    let admitted = match admit_stream(shared, &request, peer).await {
        Ok(Some(admitted)) => admitted,
        // The HTTP layer answers with a stream that ends at once (see `not_ready`).
        Ok(None) => return Err(stream),
        Err(refused) => {
            let response = cors::allowed(refuse(shared, &request, peer, &refused), allowing);
            if take_head(&mut stream, head_len).await.is_ok() {
                let _ = write_refusal(&mut stream, response).await;
            }
            return Ok(());
        }
    };
    // The head leaves the socket now: a connection closed with bytes unread is reset, and a reset
    // can lose the last event (the session may end before its reader first looks).
    let _ = take_head(&mut stream, head_len).await;
    let (read, write) = stream.into_split();
    let connection = sse_connection(shared, Box::pin(ClientGone { socket: read }), WriteHalf::tcp(write));
    let mut headers = stream_headers();
    headers.extend(allowing.into_iter().flatten());
    let head = response_head(StatusCode::OK, &headers, None);
    Starting { admitted, connection, head }.spawn(shared.clone());
    Ok(())
}

/// Reads the request head the stream was peeked from (it is in the socket already).
async fn take_head(stream: &mut TcpStream, head_len: usize) -> std::io::Result<()> {
    stream.read_exact(&mut vec![0; head_len]).await.map(|_| ())
}

/// Writes a refusal made for the HTTP layer (a whole body) on the connection, then closes it.
async fn write_refusal(stream: &mut TcpStream, response: HttpResponse) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|body| body.to_bytes()).unwrap_or_default();
    let mut out = response_head(parts.status, &parts.headers, Some(body.len()));
    out.extend_from_slice(&body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// A response head for a connection that closes after it (the body, if it has no length, ends
/// with the connection).
fn response_head(status: StatusCode, headers: &HeaderMap, content_length: Option<usize>) -> Vec<u8> {
    let reason = status.canonical_reason().unwrap_or("");
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", status.as_str()).into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(length) = content_length {
        head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    head.extend_from_slice(format!("connection: close\r\ndate: {date}\r\n\r\n").as_bytes());
    head
}

/// How a request for a stream starts.
const STREAM_START: &[u8] = b"GET /sse";
/// The longest request head looked at for a stream served on the connection.
const DIRECT_HEAD_BYTES: usize = 8 * 1024;
/// Request headers read at most for a stream served on the connection.
const DIRECT_HEADERS: usize = 64;
/// How long a stream's request head may take to come whole before the HTTP layer reads it, when
/// `request_head_timeout` is 0 (never).
const DIRECT_HEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest pause between two looks at a request head still coming.
const DIRECT_HEAD_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// What a connection's first request is, as far as serving a stream on it goes.
#[derive(Debug)]
enum FirstRequest {
    /// A whole `GET /sse` head: the request (without a body) and the head's length.
    Stream(Box<Request<()>>, usize),
    /// Anything else: the HTTP layer reads it.
    Http,
    /// Its head did not come whole within `request_head_timeout`: closed, as the HTTP layer closes
    /// such a connection (handed to it, the connection would get that time again).
    TooSlow,
}

/// Looks at the connection's first request for `request_head_timeout` at most (0: never closed
/// for it; the HTTP layer reads it after [`DIRECT_HEAD_WAIT`]).
async fn first_request(stream: &TcpStream, request_head_timeout: std::time::Duration) -> FirstRequest {
    let never = request_head_timeout.is_zero();
    let wait = if never { DIRECT_HEAD_WAIT } else { request_head_timeout };
    match tokio::time::timeout(wait, peek_stream_request(stream)).await {
        Ok(Some((request, head_len))) => FirstRequest::Stream(Box::new(request), head_len),
        Err(_) if !never => FirstRequest::TooSlow,
        Ok(None) | Err(_) => FirstRequest::Http,
    }
}

/// The connection's first request, without reading it, when it is a whole `GET /sse` head: the
/// request (without a body) and the head's length. A head that comes in parts (longer than a TCP
/// segment, with a long token or cookies) is looked at again a moment later, for as long as the
/// caller waits. (Waiting for the socket's readiness instead would need it cleared, and the HTTP layer
/// would then wait for bytes that are already there.)
async fn peek_stream_request(stream: &TcpStream) -> Option<(Request<()>, usize)> {
    let mut head = vec![0; DIRECT_HEAD_BYTES];
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let peeked = stream.peek(&mut head).await.ok()?;
        match stream_request(&head[..peeked]) {
            StreamHead::Whole(request, len) => return Some((*request, len)),
            StreamHead::Partial if 0 < peeked && peeked < head.len() => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(DIRECT_HEAD_PAUSE);
            }
            StreamHead::Partial | StreamHead::Other => return None,
        }
    }
}

/// What the first bytes of a connection are.
#[derive(Debug)]
enum StreamHead {
    /// A whole `GET /sse` head: the request (without a body) and the head's length.
    Whole(Box<Request<()>>, usize),
    /// The start of what may be one.
    Partial,
    /// Anything else.
    Other,
}

/// Parses `bytes` as a `GET /sse` request head.
fn stream_request(bytes: &[u8]) -> StreamHead {
    let start = bytes.len().min(STREAM_START.len());
    if bytes[..start] != STREAM_START[..start] {
        return StreamHead::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; DIRECT_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => whole_stream_request(&head, head_len),
        Ok(httparse::Status::Partial) => StreamHead::Partial,
        Err(_) => StreamHead::Other,
    }
}

fn whole_stream_request(head: &httparse::Request<'_, '_>, head_len: usize) -> StreamHead {
    let Some(uri) = head.path.and_then(|path| path.parse::<hyper::Uri>().ok()) else { return StreamHead::Other };
    if head.method != Some("GET") || uri.path() != "/sse" {
        return StreamHead::Other;
    }
    let mut request = Request::builder().method(hyper::Method::GET).uri(uri);
    for header in head.headers.iter() {
        request = request.header(header.name, header.value);
    }
    request.body(()).map_or(StreamHead::Other, |request| StreamHead::Whole(Box::new(request), head_len))
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
/// ends (after `retry:`), which is what it should do here. Counted as a refusal (503
/// `unavailable`) from `address`.
fn not_ready(shared: &Shared, address: std::net::IpAddr) -> Response<Body> {
    let problems = shared.health.problems().join("; ");
    shared.refusals.refused(&Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", problems.clone()), address);
    let close = Close::new(CloseCode::Unavailable, problems);
    let mut body = format!("retry: {}\n", crate::codec::sse::RETRY_MS).into_bytes();
    body.extend_from_slice(&close_event(&close));
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.headers_mut() = stream_headers();
    response
}

/// The client's side of a stream served on the connection: what it sent (the request head, left
/// unread until now, and anything after it) is ignored, and the connection's end is the end of the
/// reader, so that the session ends at once instead of at its next write.
struct ClientGone {
    socket: OwnedReadHalf,
}

impl AsyncRead for ClientGone {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = [0; 512];
        loop {
            let mut discarded = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.socket).poll_read(cx, &mut discarded))?;
            if discarded.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The client side of an event stream: it never sends anything.
struct Silent;

impl AsyncRead for Silent {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to the gateway's side of a loopback pair that got `sent`.
    async fn connection_that_sent(sent: &[u8]) -> (TcpStream, TcpStream) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(sent).await.unwrap();
        (server, client)
    }

    /// A head that never ends is closed at `request_head_timeout`: handed to the HTTP layer, it
    /// got that time twice (20 s by default for a silent connection).
    #[tokio::test(start_paused = true)]
    async fn a_first_request_is_given_request_head_timeout_once() {
        let limit = std::time::Duration::from_secs(10);
        for sent in [&b""[..], b"GE", b"GET /sse?token=x HTTP/1.1\r\nHost: x\r\n"] {
            let (server, _client) = connection_that_sent(sent).await;
            let started = tokio::time::Instant::now();
            assert!(matches!(first_request(&server, limit).await, FirstRequest::TooSlow), "{sent:?}");
            assert_eq!(started.elapsed(), limit, "{sent:?}");
            // With no limit the HTTP layer reads it, which closes no connection for it either.
            assert!(matches!(first_request(&server, std::time::Duration::ZERO).await, FirstRequest::Http));
        }
        let (server, _client) = connection_that_sent(b"GET /ws HTTP/1.1\r\n").await;
        assert!(matches!(first_request(&server, limit).await, FirstRequest::Http));
        let (server, _client) = connection_that_sent(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(matches!(first_request(&server, limit).await, FirstRequest::Stream(_, 30)));
    }

    #[test]
    fn a_head_written_by_hand_names_its_headers_length_and_close() {
        let head = String::from_utf8(response_head(StatusCode::OK, &stream_headers(), None)).unwrap();
        let (start, date) = head.split_once("date: ").unwrap();
        assert_eq!(
            start,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n\
             x-accel-buffering: no\r\nconnection: close\r\n"
        );
        assert!(date.ends_with(" GMT\r\n\r\n"), "{date}");
        let refusal = String::from_utf8(response_head(StatusCode::UNAUTHORIZED, &HeaderMap::new(), Some(42))).unwrap();
        assert!(refusal.starts_with("HTTP/1.1 401 Unauthorized\r\ncontent-length: 42\r\nconnection: close\r\n"));
    }

    #[test]
    fn only_a_get_sse_head_is_served_on_the_connection_once_whole() {
        let head = b"GET /sse?token=t&device=d HTTP/1.1\r\nhost: g\r\nlast-event-id: 7\r\n\r\n";
        let StreamHead::Whole(request, head_len) = stream_request(head) else { panic!("a whole head") };
        assert_eq!(head_len, head.len());
        assert_eq!((request.uri().path(), request.uri().query()), ("/sse", Some("token=t&device=d")));
        assert_eq!(request.headers()["last-event-id"], "7");
        // A head still arriving is waited for, from its first byte on.
        assert!(matches!(stream_request(&head[..head.len() - 1]), StreamHead::Partial));
        assert!(matches!(stream_request(b"GE"), StreamHead::Partial));
        // Another route, another method, a bad head: left to the HTTP layer.
        for other in [&b"GET /ssex HTTP/1.1\r\n\r\n"[..], b"GET /ws HTTP/1.1\r\n\r\n", b"POST /sse HTTP/1.1\r\n\r\n"] {
            assert!(matches!(stream_request(other), StreamHead::Other), "{}", String::from_utf8_lossy(other));
        }
        assert!(matches!(stream_request(b"GET /sse HTTP/1.1\r\nbad header\r\n\r\n"), StreamHead::Other));
        assert!(matches!(stream_request(b"GEX"), StreamHead::Other));
        assert!(matches!(stream_request(b"GET /sse HTTP/1.1\r\n\r\n"), StreamHead::Whole(..)));
    }
}
