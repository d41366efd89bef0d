//! What a gateway tells the rest of the system: lifecycle events (`herald.events.connect` /
//! `herald.events.disconnect`) for push functions, and its local counts for presence questions
//! (`herald.presence.gather`: every gateway answers; about everyone, it lists its users in parts, so
//! the asker counts each user once).

use std::sync::Arc;

use futures::StreamExt;
use herald_shared::functions::{LifecycleEvent, PRESENCE_PART_BYTES, PresenceQuery, PresenceReply, presence_answer};
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::{ADMIN_DISCONNECT, ADMIN_SOCKETS, EVENTS_CONNECT, EVENTS_DISCONNECT, PRESENCE_GATHER};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::close::{Close, CloseCode};
use crate::cluster::registry::{Registry, SocketInfo};

/// Who a lifecycle event is about.
pub(crate) struct Who<'a> {
    pub(crate) user: &'a str,
    pub(crate) device: &'a str,
    pub(crate) conn: &'a str,
    pub(crate) node: &'a str,
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Publishes `herald.events.connect`, or `herald.events.disconnect` when `closed` is given.
pub(crate) async fn publish_lifecycle(client: &async_nats::Client, who: &Who<'_>, closed: Option<&Close>) {
    let event = LifecycleEvent {
        user: who.user.to_string(),
        device: who.device.to_string(),
        conn: who.conn.to_string(),
        node: who.node.to_string(),
        ts: now_rfc3339(),
        code: closed.map(Close::number),
        reason: closed.map(|c| c.reason.to_string()),
    };
    let subject = if closed.is_some() { EVENTS_DISCONNECT } else { EVENTS_CONNECT };
    let body = serde_json::to_vec(&event).unwrap_or_default();
    if let Err(error) = client.publish(subject, body.into()).await {
        warn!(%error, subject, "lifecycle event not published");
    }
}

/// Answers presence questions about this gateway's sockets until `shutdown`: about one user with
/// counts, about everyone with its users listed in parts (see `presence_answer`).
pub(crate) async fn answer_presence(
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    let mut questions = match client.subscribe(PRESENCE_GATHER).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            warn!(%error, "presence questions will not be answered");
            return;
        }
    };
    loop {
        let question = tokio::select! {
            question = questions.next() => question,
            _ = shutdown.cancelled() => return,
        };
        let Some(question) = question else { return };
        let Some(reply) = question.reply else { continue };
        let asked: PresenceQuery = serde_json::from_slice(&question.payload).unwrap_or_default();
        let counts = registry.counts();
        let answer = match asked.user.as_deref() {
            Some(user) => {
                let mine = registry.of_user(user).len() as u64;
                vec![PresenceReply::counts(&node, counts.users as u64, counts.connections as u64, mine)]
            }
            // About everyone: the users themselves, so the asker counts each once across gateways.
            None => {
                let users = registry.users();
                let part_bytes = PRESENCE_PART_BYTES.min(client.server_info().max_payload / 8).max(1024);
                presence_answer(&node, users.iter().map(|user| user.to_string()), counts.connections as u64, part_bytes)
            }
        };
        for part in answer {
            let _ = client.publish(reply.clone(), serde_json::to_vec(&part).unwrap_or_default().into()).await;
        }
    }
}

#[derive(Deserialize)]
struct DisconnectOrder {
    user: String,
    #[serde(default)]
    conn: Option<String>,
}

/// Closes the local sockets an operator asked to disconnect (4003), answering how many, until
/// `shutdown`.
pub(crate) async fn answer_disconnects(
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    let mut orders = match client.subscribe(ADMIN_DISCONNECT).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            warn!(%error, "disconnect orders will not be answered");
            return;
        }
    };
    loop {
        let order = tokio::select! {
            order = orders.next() => order,
            _ = shutdown.cancelled() => return,
        };
        let Some(order) = order else { return };
        let Ok(wanted) = serde_json::from_slice::<DisconnectOrder>(&order.payload) else { continue };
        if check_id(IdKind::User, &wanted.user).is_err() {
            continue;
        }
        let close = Close::new(CloseCode::Disconnected, "disconnected by an operator");
        let closed = registry.close_matching(&wanted.user, wanted.conn.as_deref(), &close);
        if let Some(reply) = order.reply {
            let answer = serde_json::json!({"node": node, "closed": closed});
            let _ = client.publish(reply, answer.to_string().into()).await;
        }
    }
}

#[derive(Deserialize)]
struct SocketsQuestion {
    user: String,
}

/// Lists the local sockets of the user an operator asks about (`GET /v1/users/<user>`), until
/// `shutdown`.
pub(crate) async fn answer_socket_questions(
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    let mut questions = match client.subscribe(ADMIN_SOCKETS).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            warn!(%error, "socket questions will not be answered");
            return;
        }
    };
    loop {
        let question = tokio::select! {
            question = questions.next() => question,
            _ = shutdown.cancelled() => return,
        };
        let Some(question) = question else { return };
        let Some(reply) = question.reply else { continue };
        let Ok(asked) = serde_json::from_slice::<SocketsQuestion>(&question.payload) else { continue };
        if check_id(IdKind::User, &asked.user).is_err() {
            continue;
        }
        let sockets: Vec<SocketInfo> = registry.of_user(&asked.user).into_iter().map(|s| (*s.about).clone()).collect();
        let answer = serde_json::json!({"node": node, "sockets": sockets});
        let _ = client.publish(reply, answer.to_string().into()).await;
    }
}
