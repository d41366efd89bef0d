//! The rpc trigger: request/reply on `herald.fn.<name>`, one NATS micro-service endpoint per
//! function, in a queue group shared by every copy. The gateway sends a client's `rpc` frame here
//! with the caller's identity in `Herald-User` / `Herald-Device` / `Herald-Conn`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::service::{self, endpoint::Endpoint};
use bytes::Bytes;
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::header;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::error::{HandlerError, header_safe};
use crate::worker::{Source, Worker, pump};

/// The longest `Herald-Error` value sent.
const MAX_ERROR_LEN: usize = 1024;

/// A call of an rpc function.
#[derive(Debug, Clone)]
pub struct RpcRequest {
    /// The function called.
    pub function: String,
    /// The caller's user id (`Herald-User`), when present and valid.
    pub user: Option<String>,
    /// The caller's device id (`Herald-Device`), when present and valid.
    pub device: Option<String>,
    /// The caller's connection id (`Herald-Conn`), when present.
    pub conn: Option<String>,
    /// The request body: the `data` of the client's `rpc` frame (JSON).
    pub body: Bytes,
    /// Every request header.
    pub headers: HeaderMap,
    /// An id for logs and traces: unique per request.
    pub id: String,
}

impl RpcRequest {
    /// Reads a request from a NATS message sent to function `function`.
    pub fn from_message(function: &str, message: &async_nats::Message) -> RpcRequest {
        let headers = message.headers.clone().unwrap_or_default();
        let value = |name: &str| headers.get(name).map(|v| v.as_str().to_string()).filter(|v| !v.is_empty());
        let valid = |kind, value: Option<String>| value.filter(|v| check_id(kind, v).is_ok());
        RpcRequest {
            function: function.to_string(),
            user: valid(IdKind::User, value(header::HERALD_USER)),
            device: valid(IdKind::Device, value(header::HERALD_DEVICE)),
            conn: value(header::HERALD_CONN),
            body: message.payload.clone(),
            id: message.reply.as_ref().map(|reply| reply.to_string()).unwrap_or_default(),
            headers,
        }
    }

    /// The caller's user id; a permanent error when the request carries none (it did not come
    /// through a gateway).
    pub fn user(&self) -> Result<&str, HandlerError> {
        self.user.as_deref().ok_or_else(|| match self.headers.get(header::HERALD_USER) {
            Some(value) if !value.as_str().is_empty() => {
                HandlerError::permanent(format!("no caller identity: Herald-User {:?} is no user id", value.as_str()))
            }
            _ => HandlerError::permanent("no caller identity: Herald-User is missing"),
        })
    }

    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as JSON, or `T::default()` when the body is empty or `null`.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, HandlerError> {
        let trimmed = self.body.trim_ascii();
        if trimmed.is_empty() || trimmed == b"null" {
            return Ok(T::default());
        }
        self.json()
    }
}

/// The result of an rpc call: the reply body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcReply {
    /// The bytes sent back; the gateway passes them to the client as the result's `data`.
    pub body: Bytes,
}

impl RpcReply {
    /// A reply holding `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<RpcReply, HandlerError> {
        serde_json::to_vec(value)
            .map(|body| RpcReply { body: body.into() })
            .map_err(|e| HandlerError::transient(format!("cannot encode the reply: {e}")))
    }

    /// A reply holding `body` as is.
    pub fn bytes(body: impl Into<Bytes>) -> RpcReply {
        RpcReply { body: body.into() }
    }
}

/// A boxed future returned by handlers.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The code of an rpc function. Any `Fn(RpcRequest) -> impl Future<Output = Result<RpcReply,
/// HandlerError>>` is one.
pub trait RpcHandler: Send + Sync + 'static {
    /// Answers one call.
    fn call(&self, request: RpcRequest) -> BoxFuture<Result<RpcReply, HandlerError>>;
}

impl<F, Fut> RpcHandler for F
where
    F: Fn(RpcRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<RpcReply, HandlerError>> + Send + 'static,
{
    fn call(&self, request: RpcRequest) -> BoxFuture<Result<RpcReply, HandlerError>> {
        Box::pin(self(request))
    }
}

impl Source for Endpoint {
    async fn stop_taking(&mut self) {
        if let Err(error) = self.stop().await {
            debug!(%error, "rpc endpoint: unsubscribe failed");
        }
    }
}

/// Answers calls on `endpoint` until it ends or shutdown has answered what was already received.
pub(crate) async fn serve(endpoint: Endpoint, worker: Arc<Worker>, handler: Arc<dyn RpcHandler>) {
    let spawner = worker.clone();
    pump(&worker, endpoint, move |request: service::Request, permit| {
        let (worker, handler) = (spawner.clone(), handler.clone());
        spawner.spawn(async move {
            answer(&worker, handler.as_ref(), request).await;
            drop(permit);
        });
    })
    .await;
}

async fn answer(worker: &Worker, handler: &dyn RpcHandler, request: service::Request) {
    let call = RpcRequest::from_message(worker.name(), &request.message);
    let id = call.id.clone();
    let sent = match worker.call(&id, handler.call(call)).await {
        Ok(reply) => request.respond(Ok(reply.body)).await,
        Err(error) => {
            let message = header_safe(error.message(), MAX_ERROR_LEN);
            let mut headers = HeaderMap::new();
            headers.insert(header::HERALD_ERROR, message.as_str());
            let code = if error.is_permanent() { 400 } else { 500 };
            request.respond_with_headers(Err(service::error::Error { status: message, code }), headers).await
        }
    };
    if let Err(error) = sent {
        debug!(function = worker.name(), %error, "cannot send the rpc reply");
    }
}
