//! What a gateway tells the rest of the system: lifecycle events (`herald.events.connect` /
//! `herald.events.disconnect`) for push functions, and its local counts for presence questions
//! (`herald.presence.gather`: every gateway answers; about everyone, it lists its users in parts, so
//! the asker counts each user once).

use std::sync::Arc;

use async_nats::Subscriber;
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::functions::{LifecycleEvent, PRESENCE_PART_BYTES, PresenceQuery, PresenceReply, presence_answer};
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::{
    ADMIN_DISCONNECT, ADMIN_SOCKETS, DEVICE_LOST, EVENTS_CONNECT, EVENTS_DISCONNECT, PRESENCE_GATHER,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::close::{Close, CloseCode};
use crate::cluster::cursor::LostNote;
use crate::cluster::registry::{Registry, SocketInfo};
use crate::delivery::mailbox::Event;

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
async fn answer_presence(
    questions: Subscriber,
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    answer_each(questions, Some(&client), &shutdown, |question| {
        let asked: PresenceQuery = serde_json::from_slice(question).unwrap_or_default();
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
        answer.iter().map(|part| serde_json::to_vec(part).unwrap_or_default().into()).collect()
    })
    .await;
}

/// The subscriptions through which other gateways, the API and the functions ask this gateway,
/// made before it listens: a question asked once it is up never finds it deaf.
pub(crate) struct Questions {
    presence: Subscriber,
    disconnects: Subscriber,
    losses: Subscriber,
    sockets: Subscriber,
}

impl Questions {
    pub(crate) async fn subscribe(client: &async_nats::Client) -> Result<Questions, async_nats::SubscribeError> {
        Ok(Questions {
            presence: client.subscribe(PRESENCE_GATHER).await?,
            disconnects: client.subscribe(ADMIN_DISCONNECT).await?,
            losses: client.subscribe(DEVICE_LOST).await?,
            sockets: client.subscribe(ADMIN_SOCKETS).await?,
        })
    }

    /// Answers every kind of question about `registry`'s sockets until `shutdown`.
    pub(crate) fn answer(
        self,
        client: &async_nats::Client,
        registry: &Arc<Registry>,
        node: &str,
        shutdown: &CancellationToken,
    ) {
        let (client, registry, node) = (client.clone(), registry.clone(), node.to_string());
        tokio::spawn(answer_presence(self.presence, client.clone(), registry.clone(), node.clone(), shutdown.clone()));
        tokio::spawn(answer_disconnects(
            self.disconnects,
            client.clone(),
            registry.clone(),
            node.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(tell_devices_that_lost(self.losses, registry.clone(), shutdown.clone()));
        tokio::spawn(answer_socket_questions(self.sockets, client, registry, node, shutdown.clone()));
    }
}

/// Answers each request of `requests` with the parts `answer` makes of its payload (published to
/// its reply subject, if it has one), until `shutdown`.
async fn answer_each(
    mut requests: Subscriber,
    client: Option<&async_nats::Client>,
    shutdown: &CancellationToken,
    mut answer: impl FnMut(&[u8]) -> Vec<Bytes>,
) {
    loop {
        let request = tokio::select! {
            request = requests.next() => request,
            _ = shutdown.cancelled() => return,
        };
        let Some(request) = request else { return };
        let parts = answer(&request.payload);
        if let (Some(client), Some(reply)) = (client, request.reply) {
            for part in parts {
                let _ = client.publish(reply.clone(), part).await;
            }
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
async fn answer_disconnects(
    orders: Subscriber,
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    answer_each(orders, Some(&client), &shutdown, |order| {
        let Ok(wanted) = serde_json::from_slice::<DisconnectOrder>(order) else { return Vec::new() };
        if check_id(IdKind::User, &wanted.user).is_err() {
            return Vec::new();
        }
        let close = Close::new(CloseCode::Disconnected, "disconnected by an operator");
        let closed = registry.close_matching(&wanted.user, wanted.conn.as_deref(), &close);
        vec![serde_json::json!({"node": node, "closed": closed}).to_string().into()]
    })
    .await;
}

/// A device whose lost messages (from `first` on) connection `conn` noted for its next resume, at
/// `revision` of the cursors' bucket.
#[derive(Serialize, Deserialize)]
struct DeviceLost<'a> {
    user: &'a str,
    device: &'a str,
    conn: &'a str,
    first: u64,
    revision: u64,
}

/// Tells every gateway that `who`'s device has `note` waiting for its next resume, so that its
/// other sockets, which may have resumed before the note, resume again (see
/// [`tell_devices_that_lost`]).
pub(crate) async fn publish_device_lost(client: &async_nats::Client, who: &Who<'_>, note: LostNote) {
    let (first, revision) = (note.first, note.revision);
    let notice = DeviceLost { user: who.user, device: who.device, conn: who.conn, first, revision };
    let body = serde_json::to_vec(&notice).unwrap_or_default();
    if let Err(error) = client.publish(DEVICE_LOST, body.into()).await {
        warn!(%error, user = who.user, device = who.device, "lost-messages notice not published");
    }
}

/// Tells the local sessions of every device another connection noted a loss for (except that
/// connection), until `shutdown`: a session that resumed before the note was written reported its
/// replay complete, and closes with 4008 so that its next resume reports the loss (see
/// `SessionState`).
async fn tell_devices_that_lost(notices: Subscriber, registry: Arc<Registry>, shutdown: CancellationToken) {
    answer_each(notices, None, &shutdown, |notice| {
        if let Ok(lost) = serde_json::from_slice::<DeviceLost>(notice) {
            let note = LostNote { first: lost.first, revision: lost.revision };
            registry.tell_device(lost.user, lost.device, lost.conn, || Event::LossNoted(note));
        }
        Vec::new()
    })
    .await;
}

#[derive(Deserialize)]
struct SocketsQuestion {
    user: String,
}

/// Lists the local sockets of the user an operator asks about (`GET /v1/users/<user>`), until
/// `shutdown`.
async fn answer_socket_questions(
    questions: Subscriber,
    client: async_nats::Client,
    registry: Arc<Registry>,
    node: String,
    shutdown: CancellationToken,
) {
    answer_each(questions, Some(&client), &shutdown, |question| {
        let Ok(asked) = serde_json::from_slice::<SocketsQuestion>(question) else { return Vec::new() };
        if check_id(IdKind::User, &asked.user).is_err() {
            return Vec::new();
        }
        let sockets: Vec<SocketInfo> = registry.of_user(&asked.user).into_iter().map(|s| (*s.about).clone()).collect();
        vec![serde_json::json!({"node": node, "sockets": sockets}).to_string().into()]
    })
    .await;
}
