//! Events: what lifecycle and durable functions receive, and the lifecycle trigger
//! (`herald.events.connect` / `herald.events.disconnect`, core NATS, one queue group per function
//! so every function sees every event once across its copies). Durable events are in
//! [`crate::durable`].

use std::future::Future;
use std::sync::Arc;

use async_nats::{HeaderMap, Subscriber};
use bytes::Bytes;
use herald_shared::functions::LifecycleEvent;
use herald_shared::subject::{EVENTS_CONNECT, EVENTS_DISCONNECT, header};
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::error::HandlerError;
use crate::rpc::BoxFuture;
use crate::worker::{Source, Worker, pump};

/// One event handed to a function.
#[derive(Debug, Clone)]
pub struct Event {
    /// The function it is for.
    pub function: String,
    /// The subject it was published on.
    pub subject: String,
    /// The event's body.
    pub payload: Bytes,
    /// The event's headers.
    pub headers: HeaderMap,
    /// A stable id, the same on every delivery of this event: `<stream>-<seq>` for a durable
    /// event, `<node>:<conn>:connect` / `…:disconnect` for a lifecycle event (or its
    /// `Nats-Msg-Id`). Derive push ids from it ([`crate::push::Pusher::push`]).
    pub id: String,
    /// Which delivery this is, from 1; always 1 for lifecycle events.
    pub attempt: u64,
    /// The event's sequence in its stream (durable events only).
    pub stream_sequence: Option<u64>,
}

impl Event {
    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// The body as a gateway lifecycle event.
    pub fn lifecycle(&self) -> Result<LifecycleEvent, HandlerError> {
        self.json()
    }

    /// True for `herald.events.connect`.
    pub fn is_connect(&self) -> bool {
        self.subject == EVENTS_CONNECT
    }

    /// True for `herald.events.disconnect`.
    pub fn is_disconnect(&self) -> bool {
        self.subject == EVENTS_DISCONNECT
    }
}

/// The code of a lifecycle or durable function. Any `Fn(Event) -> impl Future<Output = Result<(),
/// HandlerError>>` is one.
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event; an error retries a durable event (see [`HandlerError`]).
    fn handle(&self, event: Event) -> BoxFuture<Result<(), HandlerError>>;
}

impl<F, Fut> EventHandler for F
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, event: Event) -> BoxFuture<Result<(), HandlerError>> {
        Box::pin(self(event))
    }
}

/// The subjects a lifecycle function listens on.
pub(crate) const LIFECYCLE_SUBJECTS: [&str; 2] = [EVENTS_CONNECT, EVENTS_DISCONNECT];

impl Source for Subscriber {
    async fn stop_taking(&mut self) {
        if let Err(error) = self.drain().await {
            debug!(%error, "lifecycle subscription: drain failed");
        }
    }
}

/// Hands every lifecycle event of `subscriber` to `handler` until shutdown. Core NATS: an event
/// whose handler fails is logged and counted, not retried.
pub(crate) async fn serve_lifecycle(subscriber: Subscriber, worker: Arc<Worker>, handler: Arc<dyn EventHandler>) {
    let spawner = worker.clone();
    pump(&worker, subscriber, move |message: async_nats::Message, permit| {
        let (worker, handler) = (spawner.clone(), handler.clone());
        spawner.spawn(async move {
            let event = lifecycle_event(worker.name(), message);
            let id = event.id.clone();
            // The failure is already logged and counted by `call`.
            let _ = worker.call(&id, handler.handle(event)).await;
            drop(permit);
        });
    })
    .await;
}

fn lifecycle_event(function: &str, message: async_nats::Message) -> Event {
    let headers = message.headers.unwrap_or_default();
    let subject = message.subject.to_string();
    let id = lifecycle_id(&subject, &headers, &message.payload);
    Event {
        function: function.to_string(),
        subject,
        payload: message.payload,
        headers,
        id,
        attempt: 1,
        stream_sequence: None,
    }
}

/// `Nats-Msg-Id` when the gateway set one, else `<node>:<conn>:<connect|disconnect>`, else empty.
fn lifecycle_id(subject: &str, headers: &HeaderMap, payload: &[u8]) -> String {
    if let Some(id) = headers.get(header::NATS_MSG_ID) {
        return id.as_str().to_string();
    }
    let kind = subject.rsplit('.').next().unwrap_or_default();
    match serde_json::from_slice::<LifecycleEvent>(payload) {
        Ok(event) => format!("{}:{}:{kind}", event.node, event.conn),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_ids_are_stable_per_connection_and_kind() {
        let body = br#"{"user":"u","device":"d","conn":"c1","node":"gw-1","ts":"2026-01-02T03:04:05Z"}"#;
        assert_eq!(lifecycle_id(EVENTS_CONNECT, &HeaderMap::new(), body), "gw-1:c1:connect");
        assert_eq!(lifecycle_id(EVENTS_DISCONNECT, &HeaderMap::new(), body), "gw-1:c1:disconnect");
        assert_eq!(lifecycle_id(EVENTS_CONNECT, &HeaderMap::new(), b"garbage"), "");
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_MSG_ID, "given");
        assert_eq!(lifecycle_id(EVENTS_CONNECT, &headers, body), "given");
    }
}
