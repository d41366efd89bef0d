//! The HTTP API for backends without a NATS client, on its own listener (`api_listen`), with API keys:
//!
//! - `POST /v1/publish`: `{"to":{"user":..}|{"topic":..}|{"all":true},"data":..,"kind":..,"id":..}`, or an
//!   array of those, stored with JetStream → `{"seq":..,"duplicate":..}` (or `{"results":[...]}`);
//! - `POST /v1/disconnect`: `{"user":..,"conn":..?}` → every gateway closes the matching sockets (4003);
//! - `GET /v1/presence/<user>`: whether the user is online, across all gateways.
//!
//! Errors are JSON `{"error": <code>, "reason": <text>}` with a 4xx or 5xx status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::{ADMIN_DISCONNECT, Audience, PRESENCE_GATHER, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::Shared;
use crate::cluster::gather::gather;

type ApiResponse = Response<Full<Bytes>>;

/// Most messages in one batch publish.
const MAX_BATCH: usize = 1000;

/// An API error: status, code and reason.
struct ApiError(StatusCode, &'static str, String);

impl ApiError {
    fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, "bad_request", reason.into())
    }

    fn unavailable(reason: impl ToString) -> ApiError {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason.to_string())
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
            let service = service_fn(move |request| handle(shared.clone(), request));
            if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, %error, "API connection ended with an error");
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<ApiResponse, Infallible> {
    let result = match authorized(&shared, &request) {
        Err(error) => Err(error),
        Ok(()) => route(&shared, request).await,
    };
    Ok(match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(ApiError(status, code, reason)) => json_response(status, &json!({"error": code, "reason": reason})),
    })
}

async fn route(shared: &Shared, request: Request<Incoming>) -> Result<Value, ApiError> {
    let path = request.uri().path().to_string();
    match (request.method().clone(), path.as_str()) {
        (Method::POST, "/v1/publish") => publish(shared, read_json(shared, request).await?).await,
        (Method::POST, "/v1/disconnect") => disconnect(shared, read_json(shared, request).await?).await,
        (Method::GET, path) if path.starts_with("/v1/presence/") => {
            presence(shared, &path["/v1/presence/".len()..]).await
        }
        _ => Err(ApiError(StatusCode::NOT_FOUND, "not_found", format!("no endpoint {path}"))),
    }
}

/// Checks the API key (`Authorization: Bearer <key>` or `X-Api-Key: <key>`) in constant time.
fn authorized<B>(shared: &Shared, request: &Request<B>) -> Result<(), ApiError> {
    let headers = request.headers();
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    let known = shared.config.api_keys.iter().fold(false, |found, key| found | same_secret(key, presented));
    if known && !presented.is_empty() {
        Ok(())
    } else {
        Err(ApiError(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API key".into()))
    }
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

async fn read_json(shared: &Shared, request: Request<Incoming>) -> Result<Value, ApiError> {
    let limit = shared.config.api_max_body_bytes;
    let body = Limited::new(request.into_body(), limit)
        .collect()
        .await
        .map_err(|_| ApiError(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the body is over {limit} bytes")))?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| ApiError::bad_request(format!("not JSON: {e}")))
}

/// A message to publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    to: Target,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Target {
    User { user: String },
    Topic { topic: String },
    All { all: bool },
}

impl Publish {
    /// The subject, headers and payload, or why the message is not acceptable.
    fn check(self) -> Result<(String, async_nats::HeaderMap, Bytes), String> {
        let audience = match self.to {
            Target::User { user } => check_id(IdKind::User, &user).map(|_| Audience::User(user)),
            Target::Topic { topic } => check_id(IdKind::Topic, &topic).map(|_| Audience::Topic(topic)),
            Target::All { all: true } => Ok(Audience::All),
            Target::All { all: false } => return Err("to: {\"all\": false} addresses nobody".into()),
        }
        .map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(kind) = self.kind {
            check_id(IdKind::Topic, &kind)
                .map_err(|_| format!("kind {kind:?}: 1-128 characters of A-Za-z0-9_-=@:+"))?;
            headers.insert(header::HERALD_TYPE, kind.as_str());
        }
        if let Some(id) = self.id {
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("id {id:?}: 1-128 visible ASCII characters"));
            }
            headers.insert(header::NATS_MSG_ID, id.as_str());
        }
        // The data is sent as JSON text, so clients receive it as the same JSON value.
        let payload = serde_json::to_vec(&self.data).map_err(|e| e.to_string())?;
        Ok((audience.push_subject(), headers, payload.into()))
    }
}

async fn publish(shared: &Shared, body: Value) -> Result<Value, ApiError> {
    let batch = body.is_array();
    let items: Vec<Value> = match body {
        Value::Array(items) => items,
        single => vec![single],
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!("a batch holds 1 to {MAX_BATCH} messages")));
    }
    let mut checked = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let message =
            serde_json::from_value::<Publish>(item).map_err(|e| e.to_string()).and_then(Publish::check).map_err(
                |reason| ApiError::bad_request(if batch { format!("message {index}: {reason}") } else { reason }),
            )?;
        checked.push(message);
    }
    let js = shared.api_js.as_ref().unwrap_or(&shared.js);
    let acks = join_all(checked.into_iter().map(|(subject, headers, payload)| async move {
        let ack = js.publish_with_headers(subject, headers, payload).await?.await?;
        Ok::<_, async_nats::Error>(json!({"seq": ack.sequence, "duplicate": ack.duplicate}))
    }))
    .await;
    if !batch {
        return acks
            .into_iter()
            .next()
            .unwrap_or_else(|| Err("nothing published".into()))
            .map_err(ApiError::unavailable);
    }
    let results: Vec<Value> = acks
        .into_iter()
        .map(|ack| ack.unwrap_or_else(|e| json!({"error": "unavailable", "reason": e.to_string()})))
        .collect();
    Ok(json!({ "results": results }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    user: String,
    #[serde(default)]
    conn: Option<String>,
}

async fn disconnect(shared: &Shared, body: Value) -> Result<Value, ApiError> {
    let order: Disconnect = serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_id(IdKind::User, &order.user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let request = json!({"user": order.user, "conn": order.conn});
    let answers = gather(&shared.client, ADMIN_DISCONNECT, request.to_string().into(), shared.config.gather_window)
        .await
        .map_err(ApiError::unavailable)?;
    let closed: u64 = answers.iter().filter_map(|a| answer_field(a, "closed")).sum();
    Ok(json!({"user": order.user, "disconnected": closed, "gateways": answers.len()}))
}

async fn presence(shared: &Shared, user: &str) -> Result<Value, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let request = json!({ "user": user });
    let answers = gather(&shared.client, PRESENCE_GATHER, request.to_string().into(), shared.config.gather_window)
        .await
        .map_err(ApiError::unavailable)?;
    let connections: u64 = answers.iter().filter_map(|a| answer_field(a, "user_connections")).sum();
    Ok(json!({"user": user, "online": connections > 0, "connections": connections, "gateways": answers.len()}))
}

fn answer_field(answer: &async_nats::Message, field: &str) -> Option<u64> {
    serde_json::from_slice::<Value>(&answer.payload).ok()?.get(field)?.as_u64()
}

fn json_response(status: StatusCode, body: &Value) -> ApiResponse {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
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
    fn secrets_compare_whole() {
        assert!(same_secret("key-1", "key-1"));
        assert!(!same_secret("key-1", "key-2"));
        assert!(!same_secret("key-1", "key-10"));
        assert!(!same_secret("key-1", "key"));
        assert!(!same_secret("key-1", ""));
    }

    #[test]
    fn publish_requests_are_checked() {
        let check =
            |value: Value| serde_json::from_value::<Publish>(value).map_err(|e| e.to_string()).and_then(Publish::check);
        let (subject, headers, payload) =
            check(json!({"to": {"user": "42"}, "data": {"text": "hi"}, "kind": "mail", "id": "order-7"})).unwrap();
        assert_eq!(subject, "push.user.42");
        assert_eq!(headers.get(header::HERALD_TYPE).map(|v| v.as_str()), Some("mail"));
        assert_eq!(&payload[..], br#"{"text":"hi"}"#);
        assert_eq!(check(json!({"to": {"all": true}, "data": "hi"})).unwrap().2, Bytes::from_static(b"\"hi\""));
        assert_eq!(check(json!({"to": {"topic": "news"}})).unwrap().0, "push.topic.news");
        for bad in [
            json!({"to": {"user": "a.b"}}),
            json!({"to": {"user": "*"}}),
            json!({"to": {"all": false}}),
            json!({"to": {"group": "x"}}),
            json!({"to": {"user": "42"}, "id": "has space"}),
            json!({"to": {"user": "42"}, "kind": "a.b"}),
            json!({"to": {"user": "42"}, "extra": 1}),
            json!({"data": 1}),
        ] {
            assert!(check(bad.clone()).is_err(), "{bad}");
        }
    }
}
