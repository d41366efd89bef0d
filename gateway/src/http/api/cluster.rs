//! Questions to every gateway: `POST /v1/disconnect`, `GET /v1/presence/<user>` and `GET /v1/gateways`.

use std::collections::{BTreeMap, BTreeSet};

use herald_shared::functions::{PresenceQuery, PresenceReply};
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::{ADMIN_DISCONNECT, PRESENCE_GATHER};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::Shared;
use crate::cluster::gather::gather_gateways;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Disconnect {
    user: String,
    #[serde(default)]
    conn: Option<String>,
}

pub(super) async fn disconnect(shared: &Shared, order: Disconnect) -> Result<Value, ApiError> {
    check_id(IdKind::User, &order.user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let request = json!({"user": order.user, "conn": order.conn});
    let answers =
        gather_gateways(shared, ADMIN_DISCONNECT, request.to_string().into()).await.map_err(ApiError::unavailable)?;
    let closed: u64 = answers.iter().filter_map(|a| answer_field(a, "closed")).sum();
    Ok(json!({"user": order.user, "disconnected": closed, "gateways": answers.len()}))
}

pub(super) async fn presence(shared: &Shared, user: &str) -> Result<Value, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let request = json!({ "user": user });
    let answers =
        gather_gateways(shared, PRESENCE_GATHER, request.to_string().into()).await.map_err(ApiError::unavailable)?;
    let connections: u64 = answers.iter().filter_map(|a| answer_field(a, "user_connections")).sum();
    Ok(json!({"user": user, "online": connections > 0, "connections": connections, "gateways": answers.len()}))
}

fn answer_field(answer: &async_nats::Message, field: &str) -> Option<u64> {
    serde_json::from_slice::<Value>(&answer.payload).ok()?.get(field)?.as_u64()
}

/// `GET /v1/gateways`: every gateway that answers, with its connections and users.
pub(super) async fn gateways(shared: &Shared) -> Result<Value, ApiError> {
    let request = serde_json::to_vec(&PresenceQuery::default()).unwrap_or_default();
    let answers = gather_gateways(shared, PRESENCE_GATHER, request.into()).await.map_err(ApiError::unavailable)?;
    let mut nodes: BTreeMap<String, (u64, BTreeSet<String>)> = BTreeMap::new();
    for answer in &answers {
        let Ok(part) = serde_json::from_slice::<PresenceReply>(&answer.payload) else { continue };
        let node = nodes.entry(part.node).or_default();
        node.0 = part.connections;
        node.1.extend(part.user_ids.unwrap_or_default());
    }
    let everyone: BTreeSet<&String> = nodes.values().flat_map(|(_, users)| users).collect();
    let connections: u64 = nodes.values().map(|(connections, _)| connections).sum();
    let gateways: Vec<Value> = nodes
        .iter()
        .map(|(node, (connections, users))| {
            let listed: Vec<&String> = users.iter().take(MAX_LISTED_USERS).collect();
            json!({"node": node, "connections": connections, "users": users.len(), "user_ids": listed})
        })
        .collect();
    Ok(json!({"gateways": gateways, "connections": connections, "users": everyone.len()}))
}

/// Users listed per gateway (the counts cover every one).
const MAX_LISTED_USERS: usize = 100;
