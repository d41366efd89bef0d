//! The HTTP API for backends without a NATS client, on its own listener (`api_listen`), with API keys:
//!
//! - `POST /v1/publish` ([`publish`]): `{"to":{"user":..}|{"topic":..}|{"all":true},"data":..,"kind":..,"id":..}`,
//!   or an array of those, stored with JetStream → `{"id":..,"seq":..,"duplicate":..}` (or `{"results":[...]}`);
//! - `POST /v1/disconnect`, `GET /v1/presence/<user>` ([`cluster`]): questions to every gateway;
//! - `GET /v1/inbox/<user>`, `GET /v1/inbox/<user>/messages`, `POST /v1/inbox/<user>/read` ([`inbox`]);
//! - for operators (and the admin page, `GET /admin`, the one path without a key: it holds no data and
//!   sends the key the operator types with each call): `GET /v1/gateways` ([`cluster`]), `GET /v1/stream`
//!   ([`stream`]), `GET /v1/functions` ([`functions`]), `GET /v1/users/<user>` ([`users`]), and the
//!   dead letters ([`dead_letters`]).
//!
//! Errors are JSON `{"error": <code>, "reason": <text>}` with a 4xx or 5xx status (and the message's
//! `"id"` for a publish).

mod cluster;
mod dead_letters;
mod functions;
mod inbox;
mod jsapi;
mod publish;
pub(crate) use publish::PublishRefusals;
mod stream;
mod users;

use std::collections::HashMap;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use herald_shared::id::{IdKind, check_function_name, check_id};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::Shared;
use crate::http::body::{self, BodyError};

type ApiResponse = Response<Full<Bytes>>;

/// An API error: status, code, reason, and the id of the message it is about (a publish).
struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: String,
    id: Option<String>,
    /// The methods a 405's path takes (its `Allow` header).
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError { status, code, reason: reason.into(), id: None, allow: None }
    }

    /// A known path asked with a method it does not take.
    fn method_not_allowed(path: &str, allow: &'static str) -> ApiError {
        let reason = format!("{path} takes {allow}");
        ApiError { allow: Some(allow), ..ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", reason) }
    }

    fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    fn unavailable(reason: impl ToString) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason.to_string())
    }

    fn with_id(self, id: String) -> ApiError {
        ApiError { id: Some(id), ..self }
    }

    /// The JSON body.
    fn body(&self) -> Value {
        let mut body = json!({"error": self.code, "reason": self.reason});
        if let Some(id) = &self.id {
            body["id"] = json!(id);
        }
        body
    }
}

/// Serves the API on `listener` until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HTTP API listening");
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "API accept failed");
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let builder = crate::http::server::http1_builder(&shared.config);
            let service = service_fn(move |request| handle(shared.clone(), request));
            if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, %error, "API connection ended with an error");
            }
        });
    }
}

/// The admin page: static, no build step, like the demo page.
const ADMIN_PAGE: &str = include_str!("../../../static/admin.html");

async fn handle(shared: Arc<Shared>, mut request: Request<Incoming>) -> Result<ApiResponse, Infallible> {
    if matches!(*request.method(), Method::GET | Method::HEAD) && request.uri().path() == "/admin" {
        return Ok(page(ADMIN_PAGE));
    }
    // HEAD is GET without the body (hyper leaves it out of the answer).
    if request.method() == Method::HEAD {
        *request.method_mut() = Method::GET;
    }
    let result = match authorized(&shared, &request) {
        Err(error) => Err(error),
        Ok(()) => route(&shared, request).await,
    };
    Ok(match result {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(error) => {
            let mut response = json_response(error.status, error.body().to_string().into());
            if let Some(allow) = error.allow {
                response.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allow));
            }
            if error.status == StatusCode::UNAUTHORIZED {
                let scheme = hyper::header::HeaderValue::from_static("Bearer");
                response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, scheme);
            }
            if error.status == StatusCode::PAYLOAD_TOO_LARGE {
                // The rest of the body is read and dropped meanwhile (up to a bound): this connection
                // carries no other request.
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            }
            response
        }
    })
}

/// The answer's JSON text. Messages are written as sockets get them, payloads as published: a
/// [`Value`] would re-encode them (a number past 64 bits, say).
async fn route(shared: &Shared, request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let path = request.uri().path();
    if !shared.health.nats_connected() {
        let query = request.uri().query().unwrap_or("");
        if asks_the_cluster(request.method(), path) {
            // Answered by whoever hears the question: asked now, nobody would, and the answer would
            // say "none" (no gateway, no function, nobody online, nobody disconnected) while the
            // question itself would be sent later, once NATS is back.
            check_input(path, query)?;
            return Err(ApiError::unavailable("not connected to NATS: the gateways and functions cannot be asked"));
        }
        if reads_jetstream(request.method(), path) && !shared.health.control_connected() {
            // Asked now, the request would wait out its timeout before the same answer.
            check_input(path, query)?;
            return Err(ApiError::unavailable("not connected to NATS: JetStream cannot be read"));
        }
    }
    if request.method() == Method::GET
        && let Some(user) = path.strip_prefix("/v1/inbox/").and_then(|rest| rest.strip_suffix("/messages"))
    {
        return inbox::messages(shared, &path_id(user)?, request.uri().query().unwrap_or("")).await;
    }
    route_value(shared, request).await.map(|value| Bytes::from(value.to_string()))
}

async fn route_value(shared: &Shared, request: Request<Incoming>) -> Result<Value, ApiError> {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let inbox = path.strip_prefix("/v1/inbox/").map(|rest| rest.split_once('/').unwrap_or((rest, "")));
    let method = request.method().clone();
    if let Some(rest) = path.strip_prefix("/v1/dead-letters") {
        return route_dead_letters(shared, request, rest, &query).await;
    }
    match (method, path.as_str(), inbox) {
        (Method::GET, "/v1/gateways", _) => cluster::gateways(shared).await,
        (Method::GET, "/v1/stream", _) => stream::stream(shared).await,
        (Method::GET, "/v1/functions", _) => functions::functions(shared).await,
        (Method::GET, path, _) if path.starts_with("/v1/users/") => {
            users::user(shared, &path_id(&path["/v1/users/".len()..])?).await
        }
        (Method::POST, "/v1/publish", _) => publish::publish(shared, &read_body(shared, request).await?).await,
        (Method::POST, "/v1/disconnect", _) => cluster::disconnect(shared, read_json(shared, request).await?).await,
        (Method::GET, path, _) if path.starts_with("/v1/presence/") => {
            cluster::presence(shared, &path_id(&path["/v1/presence/".len()..])?).await
        }
        (Method::GET, _, Some((user, ""))) => inbox::summary(shared, &path_id(user)?).await,
        (Method::POST, _, Some((user, "read"))) => {
            let user = path_id(user)?;
            inbox::read(shared, &user, read_json(shared, request).await?).await
        }
        (_, "/v1/publish" | "/v1/disconnect", _) => Err(ApiError::method_not_allowed(&path, "POST")),
        (_, "/v1/gateways" | "/v1/stream" | "/v1/functions", _) => Err(ApiError::method_not_allowed(&path, "GET")),
        (_, path, _) if path.starts_with("/v1/users/") || path.starts_with("/v1/presence/") => {
            Err(ApiError::method_not_allowed(path, "GET"))
        }
        (_, _, Some((_, "read"))) => Err(ApiError::method_not_allowed(&path, "POST")),
        (_, _, Some((_, "" | "messages"))) => Err(ApiError::method_not_allowed(&path, "GET")),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no endpoint {path}"))),
    }
}

/// Whether the request is a question every gateway or function answers (a scatter-gather).
fn asks_the_cluster(method: &Method, path: &str) -> bool {
    match *method {
        Method::GET => {
            matches!(path, "/v1/gateways" | "/v1/functions")
                || path.starts_with("/v1/presence/")
                || path.starts_with("/v1/users/")
        }
        Method::POST => path == "/v1/disconnect",
        _ => false,
    }
}

/// Whether the request is one of the endpoints that read or change what JetStream keeps (the stream,
/// the inbox, the dead letters), by its exact shape: any other path still gets its 404 or 405. A
/// publish is not one of them: it waits for NATS to come back within its timeout.
fn reads_jetstream(method: &Method, path: &str) -> bool {
    let Some(path) = path.strip_prefix('/') else { return false };
    let segments: Vec<&str> = path.split('/').collect();
    let named = |segment: &&str| !segment.is_empty();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "stream"] | ["v1", "dead-letters"]) => true,
        ("GET", ["v1", "inbox", user] | ["v1", "inbox", user, "messages"]) => named(user),
        ("GET", ["v1", "dead-letters", function]) => named(function),
        ("POST", ["v1", "inbox", user, "read"]) => named(user),
        ("POST", ["v1", "dead-letters", function, "redrive" | "purge"]) => named(function),
        _ => false,
    }
}

/// `/v1/dead-letters`, `/v1/dead-letters/<function>`, `/v1/dead-letters/<function>/{redrive,purge}`.
async fn route_dead_letters(
    shared: &Shared,
    request: Request<Incoming>,
    rest: &str,
    query: &str,
) -> Result<Value, ApiError> {
    let method = request.method().clone();
    let (function, action) = match rest.strip_prefix('/') {
        Some(rest) => rest.split_once('/').unwrap_or((rest, "")),
        None if rest.is_empty() => ("", ""),
        None => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
    };
    let function = &path_id(function)?;
    match (method, function.as_str(), action) {
        (Method::GET, "", "") => dead_letters::counts(shared).await,
        (Method::GET, function, "") => dead_letters::list(shared, function, query).await,
        (Method::POST, function, "redrive") => {
            dead_letters::redrive(shared, function, read_json(shared, request).await?).await
        }
        (Method::POST, function, "purge") => dead_letters::purge(shared, function).await,
        (_, _, "") => Err(ApiError::method_not_allowed(request.uri().path(), "GET")),
        (_, function, "redrive" | "purge") if !function.is_empty() => {
            Err(ApiError::method_not_allowed(request.uri().path(), "POST"))
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
    }
}

/// Checks what can be checked of a request's path and query without NATS, before a 503 for NATS:
/// input that can never succeed gets its 400 whether or not NATS is there (a 503 asks the caller to
/// try it again). The handlers check the same when NATS is there.
fn check_input(path: &str, query: &str) -> Result<(), ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let bad = |e: herald_shared::id::IdError| ApiError::bad_request(e.to_string());
    match segments.as_slice() {
        ["v1", "users" | "presence" | "inbox", user, ..] if !user.is_empty() => {
            check_id(IdKind::User, &path_id(user)?).map_err(bad)?
        }
        ["v1", "dead-letters", function, ..] if !function.is_empty() => {
            check_function_name(&path_id(function)?).map_err(bad)?
        }
        _ => {}
    }
    match segments.as_slice() {
        ["v1", "inbox", _, "messages"] => inbox::page_of(query).map(drop),
        ["v1", "dead-letters", _] => dead_letters::page_of(query).map(drop),
        _ => Ok(()),
    }
}

/// A page's place (`after`, 0 when absent) and size (`limit`: `default` when absent, 1 to `max`).
fn page_query(query: &str, default: u64, max: u64) -> Result<(u64, u64), ApiError> {
    let numbers = query_numbers(query, &["after", "limit"])?;
    let limit = numbers.get("limit").copied().unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(format!("limit must be 1 to {max}")));
    }
    Ok((numbers.get("after").copied().unwrap_or(0), limit))
}

/// An id in a path, percent-decoded (`a%40b` is `a@b`, as URL builders write it).
fn path_id(segment: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8();
    decoded.map(|id| id.into_owned()).map_err(|_| ApiError::bad_request("the id in the path is not UTF-8"))
}

/// The query's parameters among `allowed`, each a number.
fn query_numbers(query: &str, allowed: &[&str]) -> Result<HashMap<String, u64>, ApiError> {
    let mut numbers = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if !allowed.contains(&key.as_ref()) {
            return Err(ApiError::bad_request(format!("unknown parameter {key}")));
        }
        let number = value.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{key} must be a number")))?;
        numbers.insert(key.into_owned(), number);
    }
    Ok(numbers)
}

/// Checks the API key (`Authorization: Bearer <key>` or `X-Api-Key: <key>`) in constant time.
fn authorized<B>(shared: &Shared, request: &Request<B>) -> Result<(), ApiError> {
    let headers = request.headers();
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_key)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    let known = shared.config.api_keys.iter().fold(false, |found, key| found | same_secret(key, presented));
    if known && !presented.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API key"))
    }
}

/// The key of an `Authorization: Bearer <key>` value (the scheme's name in any case, RFC 9110 §11.1).
fn bearer_key(value: &str) -> Option<&str> {
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Compares without an early exit, so the time taken does not reveal how much of a key matched.
fn same_secret(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    let mut difference = a.len() ^ b.len();
    for (i, byte) in a.iter().enumerate() {
        difference |= usize::from(byte ^ b.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

/// The body as the object `T` is: read straight from the bytes, so that a field given twice is
/// refused (as JSON read into a map first would keep the last one silently).
async fn read_json<T: serde::de::DeserializeOwned>(shared: &Shared, request: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_body(shared, request).await?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("not JSON: {e}")))?;
    // serde would read a struct from an array of its fields too: only the documented form is taken.
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn read_body(shared: &Shared, request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let (limit, within) = (shared.config.api_max_body_bytes, shared.config.request_body_timeout);
    let (parts, body) = request.into_parts();
    body::read(&parts.headers, body, limit, within).await.map_err(|error| match error {
        BodyError::TooLarge => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the body is over {limit} bytes"))
        }
        BodyError::TimedOut => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the body did not arrive within request_body_timeout ({}s)", within.as_secs_f64()),
        ),
        BodyError::CutOff => ApiError::bad_request("the body was cut off"),
    })
}

fn page(html: &'static str) -> ApiResponse {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/html; charset=utf-8")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from_static(html.as_bytes())))
        .expect("static response parts are valid")
}

fn json_response(status: StatusCode, body: Bytes) -> ApiResponse {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("static response parts are valid")
}

/// Binds the API listener when one is configured.
pub(crate) async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr).await.map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_endpoints_that_read_jetstream_are_refused_while_nats_is_away() {
        let (get, post) = (Method::GET, Method::POST);
        for (method, path) in [
            (&get, "/v1/stream"),
            (&get, "/v1/inbox/ann"),
            (&get, "/v1/inbox/ann/messages"),
            (&post, "/v1/inbox/ann/read"),
            (&get, "/v1/dead-letters"),
            (&get, "/v1/dead-letters/notify"),
            (&post, "/v1/dead-letters/notify/redrive"),
            (&post, "/v1/dead-letters/notify/purge"),
        ] {
            assert!(reads_jetstream(method, path), "{method} {path}");
        }
        // 404s and 405s stay theirs.
        for (method, path) in [
            (&post, "/v1/stream"),
            (&get, "/v1/inbox/ann/read"),
            (&post, "/v1/inbox/read"),
            (&get, "/v1/inbox/ann/x"),
            (&get, "/v1/dead-letters/notify/purge"),
            (&post, "/v1/dead-letters/purge"),
            (&post, "/v1/dead-letters//purge"),
            (&get, "/v1/dead-lettersX"),
            (&get, "/v1/dead-letters/a/b/c"),
            (&get, "//v1/stream"),
        ] {
            assert!(!reads_jetstream(method, path), "{method} {path}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("key-1", "key-1"));
        assert!(!same_secret("key-1", "key-2"));
        assert!(!same_secret("key-1", "key-10"));
        assert!(!same_secret("key-1", "key"));
        assert!(!same_secret("key-1", ""));
    }
}
