//! How many sockets a user (or everyone) has across the gateways, for protocols that ask
//! (Centrifugal's `presence_stats`); the answer reaches the session as an rpc result.

use std::sync::Arc;

use herald_shared::frame::{RpcResult, ServerFrame, error_code};
use herald_shared::subject::PRESENCE_GATHER;
use serde_json::{Value, json};

use super::Session;
use super::rpc;
use crate::cluster::gather::gather_gateways;
use crate::delivery::mailbox::Event;

/// Gathers every gateway's counts and hands the session `{"num_clients","num_users"}` as rpc
/// result `id`.
pub(super) async fn count(session: Arc<Session>, id: String, user: Option<String>) {
    let shared = &session.shared;
    let question = json!({ "user": user });
    let answer = match gather_gateways(shared, PRESENCE_GATHER, question.to_string().into()).await {
        Ok(answers) => {
            let sum = |field: &str| -> u64 { answers.iter().filter_map(|answer| number(answer, field)).sum() };
            let (clients, users) = match user {
                Some(_) => {
                    let clients = sum("user_connections");
                    (clients, u64::from(clients > 0))
                }
                // A user on two gateways counts twice: each gateway counts its own users.
                None => (sum("connections"), sum("users")),
            };
            let data = json!({"num_clients": clients, "num_users": users});
            ServerFrame::RpcResult(RpcResult { id, ok: true, data: Some(data), error: None })
        }
        Err(error) => rpc::failure(id, error_code::UNAVAILABLE, &error.to_string()),
    };
    session.mailbox.push_event(Event::Notice(answer));
}

/// A count from a gateway's answer (its first part: a long answer repeats the counts in each).
fn number(answer: &async_nats::Message, field: &str) -> Option<u64> {
    let answer = serde_json::from_slice::<Value>(&answer.payload).ok()?;
    let first = answer.get("part").and_then(Value::as_u64).unwrap_or(0) == 0;
    if first { answer.get(field)?.as_u64() } else { None }
}
