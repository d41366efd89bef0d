//! The HTTP side: the accept loop and the routes (`/ws`, `/stomp`, `/sse`, `/healthz`, `/readyz`, `/metrics`, the demo
//! page and, in dev mode, `/dev/token`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, SEC_WEBSOCKET_VERSION, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::Shared;
use crate::cluster::policy::PolicyError;
use crate::codec::stomp::Transport;
use crate::http::admitted::Admitted;
use crate::http::auth::{self, Rejection};
use crate::http::cors;
use crate::http::handshake;
use crate::http::limits::{self, LimitExceeded};
use crate::http::tap::{Tap, TappedStream};
use crate::session::Connection;

pub(crate) type HttpResponse = Response<Full<Bytes>>;

const DEMO_PAGE: &str = include_str!("../../static/index.html");
const CLIENT_MODULE: &str = include_str!("../../../clients/js/herald.js");

/// Accepts connections until shutdown; then, while SockJS sessions over HTTP requests are open,
/// for their receiving requests only: a closing session keeps its close for its client's next
/// request, which comes on a new connection when the client was between two polls.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    accept_until(&shared, &listener, false, shared.shutdown.cancelled()).await;
    shared.sockjs.close();
    let drained = async {
        tokio::select! {
            _ = shared.sockjs.emptied() => {}
            _ = shared.killed.cancelled() => {}
        }
    };
    accept_until(&shared, &listener, true, drained).await;
}

async fn accept_until(shared: &Arc<Shared>, listener: &TcpListener, draining: bool, until: impl Future<Output = ()>) {
    tokio::pin!(until);
    loop {
        let (stream, peer) = tokio::select! {
            // A connection waiting at shutdown is served as one accepted while draining.
            biased;
            _ = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accept failed");
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        configure_socket(&shared.config, &stream);
        // Tracked as sessions are: a stopping gateway waits for the responses still streaming
        // (an event stream's last event and chunk) before it exits.
        if draining {
            shared.sessions.spawn(serve_draining(shared.clone(), stream, peer));
        } else {
            shared.sessions.spawn(serve(shared.clone(), stream, peer));
        }
    }
}

fn configure_socket(config: &crate::Config, stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    if config.socket_send_buffer > 0 {
        let _ = socket.set_send_buffer_size(config.socket_send_buffer);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if config.socket_unsent_limit > 0 {
        let _ = socket.set_tcp_notsent_lowat(config.socket_unsent_limit);
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // Boxed, so that a connection served by the HTTP layer keeps no room for it.
    let stream = match Box::pin(super::sse::serve_direct(&shared, stream, peer)).await {
        Ok(()) => return,
        Err(stream) => stream,
    };
    // Boxed so that hyper, which keeps one slot for a request's future as long as the
    // connection lives, keeps a pointer: a streaming response (SSE) would otherwise hold
    // room for the largest handler's state for its whole life.
    let builder = http1_builder(&shared.config);
    // Its own token: polled at each wake-up of the connection, it locks nothing shared.
    let stop = shared.shutdown.child_token();
    let (stream, tap) = TappedStream::new(stream);
    let service = service_fn(move |request| Box::pin(route(shared.clone(), request, peer, tap.clone())));
    let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        // No new request; the one under way (a stream the session is ending) finishes.
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = ended {
        debug!(%peer, %error, "http connection ended with an error");
    }
}

/// A connection accepted while the gateway drains: one request, served if it is a request of a
/// SockJS session still open or `/healthz` (the process runs), refused with 503 otherwise (`/readyz`
/// among them); closed once no such session is left.
async fn serve_draining(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let mut builder = http1_builder(&shared.config);
    builder.keep_alive(false);
    let drained = shared.clone();
    let service = service_fn(move |request| Box::pin(route_draining(shared.clone(), request, peer)));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = drained.sockjs.emptied() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = ended {
        debug!(%peer, %error, "http connection ended with an error");
    }
}

async fn route_draining(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    if matches!(*request.method(), Method::GET | Method::HEAD) && request.uri().path() == "/healthz" {
        return Ok(json(StatusCode::OK, serde_json::json!({"ok": true})).map(http_body_util::Either::Left));
    }
    let sockjs = request.uri().path().strip_prefix("/stomp/").map(str::to_string);
    if let Some(path) = sockjs.filter(|path| super::sockjs::is_open_session(&shared, path))
        && let Some(response) = Box::pin(super::sockjs::route(shared, request, peer, &path)).await
    {
        return Ok(response);
    }
    let reason = "the gateway is shutting down";
    let refused = json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": "unavailable", "reason": reason}));
    Ok(refused.map(http_body_util::Either::Left))
}

/// The HTTP/1 settings of the gateway's listeners: a client that takes longer than
/// `request_head_timeout` to send a request's head, or to start its next one, is disconnected
/// (never, with 0).
pub(crate) fn http1_builder(config: &crate::Config) -> http1::Builder {
    // Never `pipeline_flush(true)`: it skips the socket's flush while a request waits behind the
    // response, and a streamed body (SSE on a kept-alive connection) hands over its next chunk only
    // after that flush (see `tap`).
    let mut builder = http1::Builder::new();
    if !config.request_head_timeout.is_zero() {
        builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(config.request_head_timeout);
    }
    builder
}

/// A response's body: whole, or a stream (Server-Sent Events, SockJS's receiving requests).
pub(crate) type Body =
    http_body_util::Either<Full<Bytes>, http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>;

async fn route(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    tap: Arc<Tap>,
) -> Result<Response<Body>, Infallible> {
    if (request.method(), request.uri().path()) == (&Method::GET, "/sse") {
        let allowing = cors::allowing(&shared, &request);
        return Ok(cors::allowed(super::sse::stream(shared, request, peer, tap).await, allowing));
    }
    if let Some(rest) = request.uri().path().strip_prefix("/stomp/") {
        let rest = rest.to_string();
        // Boxed: the connection task is as large as its largest request state, and this one is rare.
        let response = Box::pin(super::sockjs::route(shared, request, peer, &rest)).await;
        return Ok(response.unwrap_or_else(|| not_found().map(http_body_util::Either::Left)));
    }
    // HEAD is GET without the body (hyper leaves it out) for the plain pages a load balancer or
    // a script may probe; an upgrade path takes GET only.
    let plain_head = request.method() == Method::HEAD && !is_upgrade_path(request.uri().path());
    let method = if plain_head { Method::GET } else { request.method().clone() };
    let response = match (&method, request.uri().path()) {
        (&Method::GET, "/ws") => websocket(shared, request, peer).await,
        (&Method::GET, "/stomp") => super::stomp::upgrade(shared, request, peer, Transport::WebSocket).await,
        (&Method::GET, "/connection/websocket") => {
            let address = client_address(&shared, &request, peer);
            counted(&shared, address, crate::http::centrifugal::websocket(shared.clone(), request, peer).await)
        }
        (&Method::GET, "/socket.io/" | "/socket.io") => {
            let address = client_address(&shared, &request, peer);
            let allowing = cors::allowing(&shared, &request);
            let response = counted(&shared, address, crate::http::socketio::get(shared.clone(), request, peer).await);
            cors::allowed(response, allowing)
        }
        (&Method::POST, "/socket.io/" | "/socket.io") => {
            let allowing = cors::allowing(&shared, &request);
            let response = crate::http::socketio::post(shared, request).await;
            cors::allowed(response.unwrap_or_else(|refused| rejection(&refused)), allowing)
        }
        (&Method::OPTIONS, "/socket.io/" | "/socket.io") => cors::preflight(&shared, &request, "GET, POST, OPTIONS"),
        (&Method::OPTIONS, "/sse") => cors::preflight(&shared, &request, "GET, OPTIONS"),
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"ok": true})),
        (&Method::GET, "/readyz") => readyz(&shared),
        (&Method::GET, "/metrics") => {
            // As the connections are now: the health check that also looks may wait on JetStream.
            shared.metrics.nats_connected.set(shared.health.nats_connected() as i64);
            text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", shared.metrics.render())
        }
        (&Method::GET, "/") => text(StatusCode::OK, "text/html; charset=utf-8", DEMO_PAGE.to_string()),
        (&Method::GET, "/herald.js") => {
            // Public: pages of any origin may import it (a module script is fetched with CORS).
            let mut response = text(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_MODULE.to_string());
            let star = hyper::header::HeaderValue::from_static("*");
            response.headers_mut().insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, star);
            response
        }
        (&Method::GET, "/dev/token") if shared.config.dev => dev_token(&shared, &request),
        (_, path) => match allowed_methods(path) {
            Some(allowed) => method_not_allowed(path, allowed),
            None => not_found(),
        },
    };
    Ok(response.map(http_body_util::Either::Left))
}

fn is_upgrade_path(path: &str) -> bool {
    matches!(path, "/ws" | "/stomp" | "/connection/websocket" | "/socket.io/" | "/socket.io")
}

/// The methods a path of this listener takes, if it is one.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/socket.io/" | "/socket.io" => Some("GET, POST, OPTIONS"),
        "/sse" => Some("GET, OPTIONS"),
        "/ws" | "/stomp" | "/connection/websocket" => Some("GET"),
        "/healthz" | "/readyz" | "/metrics" | "/" | "/herald.js" => Some("GET, HEAD"),
        _ => None,
    }
}

fn method_not_allowed(path: &str, allowed: &'static str) -> HttpResponse {
    let reason = format!("{path} takes {allowed}");
    let mut response =
        json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method_not_allowed", "reason": reason}));
    response.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allowed));
    response
}

fn not_found() -> HttpResponse {
    json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found", "reason": "no such endpoint"}))
}

async fn websocket(shared: Arc<Shared>, request: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    let address = client_address(&shared, &request, peer);
    counted(&shared, address, upgrade(shared.clone(), request, peer).await)
}

/// The response to a connection's request, a refusal counted (see [`super::refusals`]).
fn counted(shared: &Shared, address: IpAddr, response: Result<HttpResponse, Rejection>) -> HttpResponse {
    response.unwrap_or_else(|refused| {
        shared.refusals.refused(&refused, address);
        rejection(&refused)
    })
}

/// The client's address (a trusted proxy's `X-Forwarded-For` taken into account).
fn client_address<B>(shared: &Shared, request: &Request<B>, peer: SocketAddr) -> IpAddr {
    limits::client_address(peer.ip(), request.headers(), &shared.config.trusted_proxies)
}

/// Checks a `/ws` request and, if it passes, answers 101 and starts its session.
async fn upgrade(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<HttpResponse, Rejection> {
    handshake::check(&request)?;
    if let Some(origin) = refused_origin(&shared.config.allowed_origins, &request) {
        let reason = format!("origin {origin} is not allowed");
        return Err(Rejection::new(StatusCode::FORBIDDEN, "forbidden_origin", reason));
    }
    // The token first: a client with a bad one learns that whatever else is wrong.
    let connect = auth::authorize(&request, &shared.verifier, shared.config.max_topics)?;
    let (address, permit) = admit(&shared, &request, peer)?;
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut request)
        .map_err(|error| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", error.to_string()))?;
    let conn = crate::id::random_id(12);
    shared.policies.reserve(&connect.claims.sub, &conn).await.map_err(|error| match error {
        PolicyError::Taken => Rejection::new(StatusCode::CONFLICT, "conflict", error.to_string()),
        PolicyError::Unavailable(_) => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string())
        }
    })?;
    let admitted = Box::new(Admitted { connect, conn, address, permit });
    let max_frame_bytes = shared.config.max_frame_bytes;
    shared.sessions.clone().spawn(async move {
        match upgrade.await {
            // No local lives past an await here: each would be held for the connection's life.
            Ok(socket) => {
                admitted
                    .boxed_session(shared, Connection::herald(socket.into_inner().into_inner(), max_frame_bytes))
                    .await
            }
            Err(error) => {
                debug!(%error, "upgrade failed");
                // Boxed: a task is as large as its largest state, and this one is rare.
                Box::pin(admitted.cancel(&shared)).await;
            }
        }
    });
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// Whether the gateway takes one more connection now: ready, and within the connection limits.
pub(crate) fn admit<B>(
    shared: &Shared,
    request: &Request<B>,
    peer: SocketAddr,
) -> Result<(std::net::IpAddr, limits::Permit), Rejection> {
    if !shared.health.ready() {
        let problems = shared.health.problems().join("; ");
        return Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", problems));
    }
    let address = limits::client_address(peer.ip(), request.headers(), &shared.config.trusted_proxies);
    match shared.limits.admit(address) {
        Ok(permit) => Ok((address, permit)),
        Err(LimitExceeded::Gateway) => {
            Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections", "this gateway is full"))
        }
        Err(LimitExceeded::Address) => {
            let reason = format!("too many connections from {address}");
            Err(Rejection::new(StatusCode::TOO_MANY_REQUESTS, "too_many_connections", reason))
        }
    }
}

/// The request's `Origin` when an allow-list is configured and does not contain it (every one of
/// them, if a request carries several: no browser does, so one outside the list refuses it).
pub(crate) fn refused_origin<B>(allowed: &[String], request: &Request<B>) -> Option<String> {
    if allowed.is_empty() {
        return None;
    }
    let is_allowed = |origin: &str| allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
    request
        .headers()
        .get_all(hyper::header::ORIGIN)
        .iter()
        .map(|origin| origin.to_str().unwrap_or("?"))
        .find(|origin| !is_allowed(origin))
        .map(str::to_string)
}

fn readyz(shared: &Shared) -> HttpResponse {
    if shared.health.ready() {
        json(StatusCode::OK, serde_json::json!({"ready": true}))
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"ready": false, "problems": shared.health.problems()}))
    }
}

/// Dev mode only: a token for `?user=` (default `dev`), allowed every topic, valid for `?ttl=`
/// (e.g. `30s`; default and at most a day).
fn dev_token(shared: &Shared, request: &Request<Incoming>) -> HttpResponse {
    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let mut user = "dev".to_string();
    let mut ttl = DAY;
    for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "user" => user = value.into_owned(),
            "ttl" => match humantime::parse_duration(&value) {
                Ok(parsed) => ttl = parsed.min(DAY),
                Err(error) => {
                    return rejection(&Rejection::new(StatusCode::BAD_REQUEST, "bad_request", format!("ttl: {error}")));
                }
            },
            _ => {}
        }
    }
    if let Err(error) = herald_shared::id::check_id(herald_shared::id::IdKind::User, &user) {
        return rejection(&Rejection::new(StatusCode::BAD_REQUEST, "bad_request", error.to_string()));
    }
    match crate::dev_token(&shared.config, &user, ttl) {
        Some(token) => json(StatusCode::OK, serde_json::json!({"user": user, "token": token})),
        None => rejection(&Rejection::new(StatusCode::NOT_FOUND, "not_found", "no HS256 secret to sign with")),
    }
}

/// Counts a refused connection (see [`super::refusals`]) and answers it.
pub(crate) fn refuse<B>(shared: &Shared, request: &Request<B>, peer: SocketAddr, refused: &Rejection) -> HttpResponse {
    shared.refusals.refused(refused, client_address(shared, request, peer));
    rejection(refused)
}

pub(crate) fn rejection(rejection: &Rejection) -> HttpResponse {
    let mut response = text(rejection.status, "application/json", rejection.body());
    if rejection.status == StatusCode::UPGRADE_REQUIRED {
        // What to upgrade to (RFC 9110 §15.5.22), and the version this server speaks (RFC 6455 §4.4).
        let headers = response.headers_mut();
        headers.insert(UPGRADE, hyper::header::HeaderValue::from_static("websocket"));
        headers.insert(SEC_WEBSOCKET_VERSION, hyper::header::HeaderValue::from_static(handshake::VERSION));
    }
    response
}

fn json(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    text(status, "application/json", body.to_string())
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .header(CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}
