//! Cross-origin requests over plain HTTP: a page served from another origin than the gateway's
//! reads SockJS's, SSE's and Socket.IO polling's responses, and imports `/herald.js`, only when
//! the answers allow its origin. WebSocket upgrades need no CORS: `allowed_origins` checks them.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::auth::Rejection;
use super::server::{HttpResponse, refused_origin, rejection};
use crate::Shared;

/// Allows the request's origin to read the answer. The origin is named rather than `*`, so that
/// requests with credentials (SockJS's, Socket.IO's with `withCredentials`) are allowed too; the
/// origins the gateway refuses never get this far (see [`refused`]).
pub(crate) fn allow_origin<B>(request: &Request<B>, headers: &mut HeaderMap) {
    match request.headers().get(header::ORIGIN) {
        Some(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
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

/// The headers that let the request's origin read an answer; none for an origin the gateway
/// refuses (its answer is a 403).
pub(crate) fn allowing<B>(shared: &Shared, request: &Request<B>) -> Option<HeaderMap> {
    if refused_origin(&shared.config.allowed_origins, request).is_some() {
        return None;
    }
    let mut headers = HeaderMap::new();
    allow_origin(request, &mut headers);
    Some(headers)
}

/// `response` with the headers of [`allowing`], if any.
pub(crate) fn allowed<B>(mut response: Response<B>, allowing: Option<HeaderMap>) -> Response<B> {
    response.headers_mut().extend(allowing.into_iter().flatten());
    response
}

/// The answer to a CORS preflight of a request whose methods are `methods`.
pub(crate) fn preflight<B>(shared: &Shared, request: &Request<B>, methods: &'static str) -> HttpResponse {
    if let Some(refused) = refused(shared, request) {
        return refused;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(methods));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("31536000"));
    allow_origin(request, headers);
    response
}

/// 403 for an origin the gateway does not allow (as its WebSocket upgrades answer).
pub(crate) fn refused<B>(shared: &Shared, request: &Request<B>) -> Option<HttpResponse> {
    let origin = refused_origin(&shared.config.allowed_origins, request)?;
    let reason = format!("origin {origin} is not allowed");
    Some(rejection(&Rejection::new(StatusCode::FORBIDDEN, "forbidden_origin", reason)))
}
