//! STOMP over SockJS, as Spring's `registry.addEndpoint("/stomp").withSockJS()` serves it, for the
//! pages that connect with `new SockJS("/stomp")`: `GET /stomp/info`, then the WebSocket
//! transport at `/stomp/<server>/<session>/websocket`, whose STOMP frames go in SockJS's framing
//! (see [`crate::codec::sockjs`]), or, when no WebSocket gets through, one of its transports over
//! plain HTTP requests ([`transports`]): XHR streaming, EventSource, XHR polling.
//! `/stomp/websocket`, SockJS's raw WebSocket URL, is `/stomp` itself. The iframe and JSONP
//! transports, for browsers without cross-origin XHR, answer 404.

mod session;
mod transports;

pub(crate) use session::SockJsSessions;
use transports::Receiver;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};

use super::cors::{allow_origin, preflight, refused};
use super::server::{Body, HttpResponse};
use crate::Shared;
use crate::codec::sockjs;
use crate::codec::stomp::Transport;

/// A request under `/stomp/`, `path` the rest of its path: SockJS's info, or one of its
/// transports; none for paths SockJS does not use.
pub(crate) async fn route(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    path: &str,
) -> Option<Response<Body>> {
    let whole = |response: HttpResponse| Some(response.map(http_body_util::Either::Left));
    match (request.method(), path) {
        (&Method::GET, "info") => whole(info(&shared, &request)),
        // SockJS's "raw WebSocket" URL: plain STOMP over WebSocket, as on `/stomp`.
        (&Method::GET, "websocket") => whole(super::stomp::upgrade(shared, request, peer, Transport::WebSocket).await),
        (&Method::OPTIONS, "info") => whole(preflight(&shared, &request, "OPTIONS, GET")),
        (method, path) => match (method, transport(path)?) {
            (&Method::GET, ("websocket", _)) => {
                whole(super::stomp::upgrade(shared, request, peer, Transport::SockJs).await)
            }
            (&Method::OPTIONS, ("xhr_streaming" | "xhr" | "xhr_send", _)) => {
                whole(preflight(&shared, &request, "OPTIONS, POST"))
            }
            (&Method::POST, ("xhr_streaming", key)) => {
                Some(receive(shared, request, peer, key, Receiver::XhrStreaming).await)
            }
            (&Method::POST, ("xhr", key)) => Some(receive(shared, request, peer, key, Receiver::XhrPolling).await),
            (&Method::GET, ("eventsource", key)) => {
                Some(receive(shared, request, peer, key, Receiver::EventSource).await)
            }
            (&Method::POST, ("xhr_send", key)) => whole(match refused(&shared, &request) {
                Some(refused) => refused,
                None => transports::send(shared, request, key).await,
            }),
            _ => None,
        },
    }
}

/// A receiving request of session `key` from an allowed origin.
async fn receive(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    key: &str,
    receiver: Receiver,
) -> Response<Body> {
    match refused(&shared, &request) {
        Some(refused) => refused.map(http_body_util::Either::Left),
        None => transports::receive(shared, request, peer, key, receiver).await,
    }
}

/// Whether `path` (under `/stomp/`) is a request of a session still open: a draining gateway
/// serves those, for the session's close to reach its client.
pub(crate) fn is_open_session(shared: &Shared, path: &str) -> bool {
    let over_http = |transport| matches!(transport, "xhr" | "xhr_streaming" | "eventsource" | "xhr_send");
    transport(path).is_some_and(|(transport, key)| over_http(transport) && shared.sockjs.get(key).is_some())
}

/// The transport a `<server>/<session>/<transport>` path names, and its session's key
/// (`<server>/<session>`).
fn transport(path: &str) -> Option<(&str, &str)> {
    let (key, transport) = path.rsplit_once('/')?;
    let (server, session) = key.split_once('/')?;
    (sockjs::valid_segment(server) && sockjs::valid_segment(session)).then_some((transport, key))
}

/// What the client learns before it picks a transport: the WebSocket one is on, no cookie is
/// needed for stickiness (any gateway serves any session).
fn info(shared: &Shared, request: &Request<Incoming>) -> HttpResponse {
    if let Some(refused) = refused(shared, request) {
        return refused;
    }
    let body = serde_json::json!({
        "websocket": true,
        "origins": ["*:*"],
        "cookie_needed": false,
        "entropy": rand::random::<u32>(),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=UTF-8"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
    allow_origin(request, headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_path_names_a_server_and_a_session() {
        assert_eq!(transport("123/abcdef/websocket"), Some(("websocket", "123/abcdef")));
        assert_eq!(transport("123/abcdef/xhr_streaming"), Some(("xhr_streaming", "123/abcdef")));
        assert_eq!(transport("123/abc.def/websocket"), None);
        assert_eq!(transport("/abcdef/websocket"), None);
        assert_eq!(transport("123/abcdef/websocket/x"), None);
        assert_eq!(transport("websocket"), None);
        assert_eq!(transport(&format!("1/{}/xhr", "s".repeat(64))).map(|(t, _)| t), Some("xhr"));
        assert_eq!(transport(&format!("1/{}/xhr", "s".repeat(65))), None, "a session name of 65 bytes");
    }
}
