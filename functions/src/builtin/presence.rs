//! `presence`: who is online, across every gateway, by scatter-gather.
//!
//! A request `{"user":"42"}` answers `{"user":"42","online":true,"connections":2}`; `{}` (or an
//! empty body) answers `{"users":n,"connections":n,"gateways":n}`. The function publishes one
//! request on `herald.presence.gather` with a reply inbox and collects what arrives within
//! `presence_window`. Asked about one user, each gateway answers with that user's sockets there,
//! which are summed. Asked about everyone, each gateway lists its users, in parts small enough to
//! stay far from NATS's `max_payload`; the function counts the union, so a user with sockets on two
//! gateways counts once, and sums the sockets. Nothing is written on the connect path, counts are
//! exact for live gateways, and a crashed gateway's sockets vanish at once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use herald_shared::functions::{PRESENCE_GATHER, PresenceQuery, PresenceReply};
use herald_shared::id::{IdKind, check_id};
use serde_json::json;
use tracing::{debug, warn};

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
    let tally = gather(client, &query, window).await?;
    match query.user {
        Some(user) => {
            let connections = tally.user_connections;
            RpcReply::json(&json!({"user": user, "online": connections > 0, "connections": connections}))
        }
        None => RpcReply::json(&json!({
            "users": tally.users(),
            "connections": tally.connections,
            "gateways": tally.gateways,
        })),
    }
}

/// Asks every gateway and adds up the answers that arrive, whole, within `window`.
async fn gather(client: &async_nats::Client, query: &PresenceQuery, window: Duration) -> Result<Tally, HandlerError> {
    let unavailable = |e: &dyn std::fmt::Display| HandlerError::transient(format!("presence gather: {e}"));
    let inbox = client.new_inbox();
    // Subscribed before asking, so no answer can come first.
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| unavailable(&e))?;
    let body = serde_json::to_vec(query).map_err(|e| unavailable(&e))?;
    client.publish_with_reply(PRESENCE_GATHER, inbox, body.into()).await.map_err(|e| unavailable(&e))?;
    let mut answered = Answers::default();
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            answer = answers.next() => match answer {
                Some(message) => match serde_json::from_slice::<PresenceReply>(&message.payload) {
                    Ok(reply) => answered.add(reply),
                    Err(error) => debug!(%error, "presence: unreadable gateway answer ignored"),
                },
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(answered.tally())
}

/// The answers received so far, by node and part.
#[derive(Default)]
struct Answers {
    by_node: BTreeMap<String, BTreeMap<u32, PresenceReply>>,
}

impl Answers {
    fn add(&mut self, reply: PresenceReply) {
        let parts = self.by_node.entry(reply.node.clone()).or_default();
        parts.insert(reply.part, reply);
    }

    /// Adds up the gateways whose every part arrived; one with parts missing (its answer did not
    /// fit in the window) is left out, like a gateway that did not answer in time.
    fn tally(self) -> Tally {
        let mut tally = Tally::default();
        for (node, parts) in self.by_node {
            let Some(first) = parts.values().next() else { continue };
            let expected = first.parts.max(1);
            let whole = parts.len() as u32 == expected && parts.keys().all(|part| *part < expected);
            if !whole || parts.values().any(|part| part.parts != first.parts) {
                warn!(%node, received = parts.len(), expected, "presence: a gateway's answer was incomplete; left out");
                continue;
            }
            tally.gateways += 1;
            tally.connections += first.connections;
            tally.user_connections += first.user_connections;
            if parts.values().all(|part| part.user_ids.is_some()) {
                tally.listed.extend(parts.into_values().flat_map(|part| part.user_ids.unwrap_or_default()));
            } else {
                // A gateway that does not list its users: its count is added as is.
                tally.unlisted += first.users;
            }
        }
        tally
    }
}

/// What the gateways that answered in time said, together.
#[derive(Debug, Default)]
struct Tally {
    gateways: u64,
    connections: u64,
    user_connections: u64,
    /// Every listed user id, once.
    listed: HashSet<String>,
    /// Users of gateways that gave a count instead of a list.
    unlisted: u64,
}

impl Tally {
    fn users(&self) -> u64 {
        self.listed.len() as u64 + self.unlisted
    }
}

#[cfg(test)]
mod tests {
    use herald_shared::functions::presence_answer;

    use super::*;

    fn tally(replies: Vec<PresenceReply>) -> Tally {
        let mut answers = Answers::default();
        replies.into_iter().for_each(|reply| answers.add(reply));
        answers.tally()
    }

    #[test]
    fn users_on_several_gateways_count_once() {
        let mut replies = presence_answer("gw-1", ["a", "b", "c"], 5, 8);
        replies.extend(presence_answer("gw-2", ["b", "d"], 2, 1024));
        replies.reverse();
        let tally = tally(replies);
        assert_eq!((tally.users(), tally.connections, tally.gateways), (4, 7, 2));
    }

    #[test]
    fn an_incomplete_answer_is_left_out_and_a_repeated_part_counts_once() {
        // One id per part.
        let mut replies = presence_answer("gw-1", ["a", "b", "c"], 3, 4);
        assert_eq!(replies.len(), 3);
        replies.remove(1);
        replies.extend(presence_answer("gw-2", ["c", "d"], 4, 4));
        replies.push(replies.last().unwrap().clone());
        let tally = tally(replies);
        assert_eq!((tally.users(), tally.connections, tally.gateways), (2, 4, 1));
    }

    #[test]
    fn gateways_that_only_count_are_added_as_they_count() {
        let mut replies = presence_answer("gw-new", ["a", "b"], 2, 1024);
        replies.push(PresenceReply::counts("gw-old", 3, 4, 0));
        let tally = tally(replies);
        assert_eq!((tally.users(), tally.connections, tally.gateways), (5, 6, 2));
    }

    #[test]
    fn a_users_connections_are_summed() {
        let tally = tally(vec![PresenceReply::counts("gw-1", 9, 9, 2), PresenceReply::counts("gw-2", 9, 9, 1)]);
        assert_eq!((tally.user_connections, tally.gateways), (3, 2));
    }
}
