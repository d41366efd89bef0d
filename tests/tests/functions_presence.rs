//! Built-in `presence`: scatter-gather on `herald.presence.gather`. Asked about everyone, gateways
//! list their users in parts and the function counts the union, so a user on two gateways counts
//! once; connections are summed. The gateways here are fake responders answering like a gateway
//! would (tests/tests/gateway_functions.rs asks real ones).

use std::collections::HashMap;

use futures::StreamExt;
use herald_shared::functions::{PRESENCE_GATHER, PresenceQuery, PresenceReply, presence_answer};
use herald_tests::TestNats;
use herald_tests::functions::{RpcAnswer, call, start_builtins, test_config};
use serde_json::json;

/// How a fake gateway answers a question about everyone.
#[derive(Clone, Copy)]
enum Answering {
    /// Its users listed, in parts of at most this many bytes of ids.
    Listing(usize),
    /// Its counts only, as a gateway that does not list its users.
    CountsOnly,
    /// Listing in parts of this many bytes, but the last part is lost.
    LosingTheLastPart(usize),
}

/// Answers presence requests for `node` holding `sockets` (user → open sockets), until aborted.
async fn fake_gateway(
    nats: &TestNats,
    node: &'static str,
    sockets: &[(&str, u64)],
    answering: Answering,
) -> tokio::task::JoinHandle<()> {
    let client = nats.client().await;
    let mut requests = client.subscribe(PRESENCE_GATHER).await.unwrap();
    client.flush().await.unwrap();
    let sockets: HashMap<String, u64> = sockets.iter().map(|(user, n)| (user.to_string(), *n)).collect();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let query: PresenceQuery = serde_json::from_slice(&request.payload).expect("a presence query");
            let connections = sockets.values().sum();
            let users = sockets.keys().cloned();
            let replies = match (query.user, answering) {
                (Some(user), _) => {
                    let mine = sockets.get(&user).copied().unwrap_or(0);
                    vec![PresenceReply::counts(node, sockets.len() as u64, connections, mine)]
                }
                (None, Answering::Listing(bytes)) => presence_answer(node, users, connections, bytes),
                (None, Answering::CountsOnly) => {
                    vec![PresenceReply::counts(node, sockets.len() as u64, connections, 0)]
                }
                (None, Answering::LosingTheLastPart(bytes)) => {
                    let mut parts = presence_answer(node, users, connections, bytes);
                    assert!(parts.len() > 1, "enough users to need several parts");
                    parts.pop();
                    parts
                }
            };
            let reply_to = request.reply.expect("a reply inbox");
            for reply in replies {
                client.publish(reply_to.clone(), serde_json::to_vec(&reply).unwrap().into()).await.unwrap();
            }
        }
    })
}

#[tokio::test]
async fn presence_counts_each_user_once_across_gateways_and_sums_connections() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["presence".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    // alice is on both gateways; 200 more users on gw-1 make its list take several small parts.
    let crowd: Vec<String> = (0..200).map(|n| format!("crowd-{n:03}")).collect();
    let mut on_gw1: Vec<(&str, u64)> = vec![("alice", 2), ("bob", 1)];
    on_gw1.extend(crowd.iter().map(|user| (user.as_str(), 1)));
    let gw1 = fake_gateway(&nats, "gw-1", &on_gw1, Answering::Listing(512)).await;
    let gw2 = fake_gateway(&nats, "gw-2", &[("alice", 1), ("carol", 1)], Answering::Listing(512)).await;

    let alice = call(&client, "presence", Some("carol"), json!({"user": "alice"})).await;
    assert_eq!(alice, RpcAnswer { body: json!({"user": "alice", "online": true, "connections": 3}), error: None });
    let bob = call(&client, "presence", Some("carol"), json!({"user": "bob"})).await;
    assert_eq!(bob.body, json!({"user": "bob", "online": true, "connections": 1}));
    let dave = call(&client, "presence", Some("carol"), json!({"user": "dave"})).await;
    assert_eq!(dave.body, json!({"user": "dave", "online": false, "connections": 0}));
    // alice, bob, carol and the crowd: 203 users; 3 + 200 sockets on gw-1, 2 on gw-2.
    let everyone = call(&client, "presence", Some("carol"), json!({})).await;
    assert_eq!(everyone, RpcAnswer { body: json!({"users": 203, "connections": 205, "gateways": 2}), error: None });
    let null_body = call(&client, "presence", Some("carol"), json!(null)).await;
    assert_eq!(null_body.body, everyone.body);

    // A gateway that went away stops counting at once: alice is still on gw-1.
    gw2.abort();
    let _ = gw2.await;
    let after = call(&client, "presence", Some("carol"), json!({})).await;
    assert_eq!(after.body, json!({"users": 202, "connections": 203, "gateways": 1}));
    gw1.abort();
    let _ = gw1.await;
    let nobody = call(&client, "presence", Some("carol"), json!({})).await;
    assert_eq!(nobody.body, json!({"users": 0, "connections": 0, "gateways": 0}));

    for bad in [json!({"user": "a.b"}), json!({"user": "*"}), json!({"user": 7})] {
        assert!(call(&client, "presence", Some("carol"), bad.clone()).await.error.is_some(), "{bad}");
    }
    runtime.shutdown().await;
}

#[tokio::test]
async fn gateways_that_only_count_add_their_count_and_incomplete_answers_are_left_out() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["presence".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    let listing = fake_gateway(&nats, "gw-new", &[("alice", 1), ("bob", 1)], Answering::Listing(1024)).await;
    // A gateway that does not list its users: alice there cannot be told apart, so she counts again.
    let counting = fake_gateway(&nats, "gw-old", &[("alice", 2), ("carol", 1)], Answering::CountsOnly).await;
    let crowd: Vec<String> = (0..50).map(|n| format!("crowd-{n:02}")).collect();
    let crowded: Vec<(&str, u64)> = crowd.iter().map(|user| (user.as_str(), 1)).collect();
    let losing = fake_gateway(&nats, "gw-lossy", &crowded, Answering::LosingTheLastPart(256)).await;

    let everyone = call(&client, "presence", Some("dave"), json!({})).await;
    assert_eq!(everyone.body, json!({"users": 4, "connections": 5, "gateways": 2}));
    // The lossy gateway answers questions about one user whole.
    let one = call(&client, "presence", Some("dave"), json!({"user": "crowd-07"})).await;
    assert_eq!(one.body, json!({"user": "crowd-07", "online": true, "connections": 1}));
    for gateway in [listing, counting, losing] {
        gateway.abort();
    }
    runtime.shutdown().await;
}
