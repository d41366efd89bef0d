//! Built-in `presence`: counts summed across every gateway by scatter-gather on
//! `herald.presence.gather`. The gateways here are fake responders answering like a gateway would.

use std::collections::HashMap;

use futures::StreamExt;
use herald_shared::functions::{PRESENCE_GATHER, PresenceQuery, PresenceReply};
use herald_tests::TestNats;
use herald_tests::functions::{RpcAnswer, call, start_builtins, test_config};
use serde_json::json;

/// Answers presence requests for `node` holding `sockets` (user → open sockets), until dropped.
async fn fake_gateway(nats: &TestNats, node: &'static str, sockets: &[(&str, u64)]) -> tokio::task::JoinHandle<()> {
    let client = nats.client().await;
    let mut requests = client.subscribe(PRESENCE_GATHER).await.unwrap();
    client.flush().await.unwrap();
    let sockets: HashMap<String, u64> = sockets.iter().map(|(user, n)| (user.to_string(), *n)).collect();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let query: PresenceQuery = serde_json::from_slice(&request.payload).expect("a presence query");
            let reply = PresenceReply {
                node: node.to_string(),
                users: sockets.len() as u64,
                connections: sockets.values().sum(),
                user_connections: query.user.and_then(|user| sockets.get(&user).copied()).unwrap_or(0),
            };
            let reply_to = request.reply.expect("a reply inbox");
            client.publish(reply_to, serde_json::to_vec(&reply).unwrap().into()).await.unwrap();
        }
    })
}

#[tokio::test]
async fn presence_sums_the_answers_of_every_gateway() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["presence".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    let gw1 = fake_gateway(&nats, "gw-1", &[("alice", 2), ("bob", 1)]).await;
    let gw2 = fake_gateway(&nats, "gw-2", &[("alice", 1), ("carol", 1)]).await;

    let alice = call(&client, "presence", Some("carol"), json!({"user": "alice"})).await;
    assert_eq!(alice, RpcAnswer { body: json!({"user": "alice", "online": true, "connections": 3}), error: None });
    let bob = call(&client, "presence", Some("carol"), json!({"user": "bob"})).await;
    assert_eq!(bob.body, json!({"user": "bob", "online": true, "connections": 1}));
    let dave = call(&client, "presence", Some("carol"), json!({"user": "dave"})).await;
    assert_eq!(dave.body, json!({"user": "dave", "online": false, "connections": 0}));
    let everyone = call(&client, "presence", Some("carol"), json!({})).await;
    assert_eq!(everyone.body, json!({"users": 4, "connections": 5, "gateways": 2}));
    let null_body = call(&client, "presence", Some("carol"), json!(null)).await;
    assert_eq!(null_body.body, everyone.body);

    // A gateway that went away stops counting at once.
    gw2.abort();
    let _ = gw2.await;
    let after = call(&client, "presence", Some("carol"), json!({})).await;
    assert_eq!(after.body, json!({"users": 2, "connections": 3, "gateways": 1}));

    for bad in [json!({"user": "a.b"}), json!({"user": "*"}), json!({"user": 7})] {
        assert!(call(&client, "presence", Some("carol"), bad.clone()).await.error.is_some(), "{bad}");
    }
    gw1.abort();
    runtime.shutdown().await;
}
