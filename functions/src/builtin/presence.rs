//! `presence`: who is online, counted across every gateway by scatter-gather.
//!
//! A request `{"user":"42"}` answers `{"user":"42","online":true,"connections":2}`; `{}` (or an
//! empty body) answers `{"users":n,"connections":n,"gateways":n}`. The function publishes one
//! request on `herald.presence.gather` with a reply inbox, every gateway answers with its own
//! counts, and the replies that arrive within `presence_window` are summed. Nothing is written on
//! the connect path, counts are exact for live gateways, and a crashed gateway's sockets vanish at
//! once. `users` sums each gateway's distinct users: a user with sockets on two gateways counts
//! twice.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use herald_shared::functions::{PRESENCE_GATHER, PresenceQuery, PresenceReply};
use herald_shared::id::{IdKind, check_id};
use serde_json::json;
use tracing::debug;

use crate::config::Config;
use crate::error::HandlerError;
use crate::function::Function;
use crate::rpc::{RpcReply, RpcRequest};

/// The `presence` function.
pub fn function(config: &Config, client: async_nats::Client) -> Function {
    let window = config.presence_window;
    Function::rpc("presence", move |request: RpcRequest| {
        let client = client.clone();
        async move { presence(&client, window, &request).await }
    })
}

async fn presence(
    client: &async_nats::Client,
    window: Duration,
    request: &RpcRequest,
) -> Result<RpcReply, HandlerError> {
    let query: PresenceQuery = request.json_or_default()?;
    if let Some(user) = &query.user {
        check_id(IdKind::User, user).map_err(|e| HandlerError::permanent(e.to_string()))?;
    }
    let replies = gather(client, &query, window).await?;
    let total = |field: fn(&PresenceReply) -> u64| replies.iter().map(field).sum::<u64>();
    match query.user {
        Some(user) => {
            let connections = total(|r| r.user_connections);
            RpcReply::json(&json!({"user": user, "online": connections > 0, "connections": connections}))
        }
        None => RpcReply::json(&json!({
            "users": total(|r| r.users),
            "connections": total(|r| r.connections),
            "gateways": replies.len(),
        })),
    }
}

/// Asks every gateway and collects the answers that arrive within `window`, one per node.
async fn gather(
    client: &async_nats::Client,
    query: &PresenceQuery,
    window: Duration,
) -> Result<Vec<PresenceReply>, HandlerError> {
    let unavailable = |e: &dyn std::fmt::Display| HandlerError::transient(format!("presence gather: {e}"));
    let inbox = client.new_inbox();
    // Subscribed before asking, so no answer can come first.
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| unavailable(&e))?;
    let body = serde_json::to_vec(query).map_err(|e| unavailable(&e))?;
    client.publish_with_reply(PRESENCE_GATHER, inbox, body.into()).await.map_err(|e| unavailable(&e))?;
    let mut by_node = HashMap::new();
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            answer = answers.next() => match answer {
                Some(message) => match serde_json::from_slice::<PresenceReply>(&message.payload) {
                    Ok(reply) => { by_node.insert(reply.node.clone(), reply); }
                    Err(error) => debug!(%error, "presence: unreadable gateway answer ignored"),
                },
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(by_node.into_values().collect())
}
