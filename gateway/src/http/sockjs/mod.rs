//! STOMP over SockJS, as Spring's `registry.addEndpoint("/stomp").withSockJS()` serves it, for the
//! pages that connect with `new SockJS("/stomp")`: `GET /stomp/info`, then the WebSocket
//! transport at `/stomp/<server>/<session>/websocket`, whose STOMP frames go in SockJS's framing
//! (see [`crate::codec::sockjs`]); `/stomp/websocket`, SockJS's raw WebSocket URL, is `/stomp`
//! itself. The fallback transports (XHR streaming and polling, iframes)
//! are not served: they answer 404, and a client whose WebSocket cannot get through gives up.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::auth::Rejection;
use super::server::{HttpResponse, refused_origin, rejection};
use crate::Shared;
use crate::codec::sockjs;
use crate::codec::stomp::Transport;

/// A request under `/stomp/`, `path` the rest of its path: SockJS's info, or its WebSocket
/// transport; none for paths SockJS does not use.
pub(crate) async fn route(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    path: &str,
) -> Option<HttpResponse> {
    match (request.method(), path) {
        (&Method::GET, "info") => Some(info(&shared, &request)),
        // SockJS's "raw WebSocket" URL: plain STOMP over WebSocket, as on `/stomp`.
        (&Method::GET, "websocket") => Some(super::stomp::upgrade(shared, request, peer, Transport::WebSocket).await),
        (&Method::OPTIONS, "info") => Some(preflight(&shared, &request)),
        (&Method::GET, path) if is_websocket_transport(path) => {
            Some(super::stomp::upgrade(shared, request, peer, Transport::SockJs).await)
        }
        _ => None,
    }
}

/// `<server>/<session>/websocket`.
fn is_websocket_transport(path: &str) -> bool {
    let mut segments = path.split('/');
    let (Some(server), Some(session), Some("websocket"), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return false;
    };
    sockjs::valid_segment(server) && sockjs::valid_segment(session)
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
    cors(request, headers);
    response
}

/// The answer to a CORS preflight of the info request.
fn preflight(shared: &Shared, request: &Request<Incoming>) -> HttpResponse {
    if let Some(refused) = refused(shared, request) {
        return refused;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("OPTIONS, GET"));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("31536000"));
    cors(request, headers);
    response
}

/// 403 for an origin the gateway does not allow (as its WebSocket upgrades answer).
fn refused(shared: &Shared, request: &Request<Incoming>) -> Option<HttpResponse> {
    let origin = refused_origin(&shared.config.allowed_origins, request)?;
    let reason = format!("origin {origin} is not allowed");
    Some(rejection(&Rejection::new(StatusCode::FORBIDDEN, "forbidden_origin", reason)))
}

/// SockJS's clients send the info request with credentials, so the origin is named, not `*`.
fn cors(request: &Request<Incoming>, headers: &mut hyper::HeaderMap) {
    let origin = request.headers().get(header::ORIGIN).cloned();
    match origin {
        Some(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        None => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        }
    }
    if let Some(asked) = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_websocket_transport_path_names_a_server_and_a_session() {
        assert!(is_websocket_transport("123/abcdef/websocket"));
        assert!(!is_websocket_transport("123/abcdef/xhr_streaming"));
        assert!(!is_websocket_transport("123/abc.def/websocket"));
        assert!(!is_websocket_transport("/abcdef/websocket"));
        assert!(!is_websocket_transport("123/abcdef/websocket/x"));
        assert!(!is_websocket_transport("websocket"));
    }
}
