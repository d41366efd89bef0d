//! Push functions through the gateway: `rpc` frames to functions and back with the caller's identity,
//! every error code, lifecycle events, presence across gateways (a user on both counts once), prefs
//! muting, notify to a topic.

use std::time::Duration;

use futures::StreamExt;
use herald_functions::{Function, HandlerError, RpcReply, RpcRequest};
use herald_shared::frame::{RpcResult, ServerFrame};
use herald_shared::functions::LifecycleEvent;
use herald_tests::functions::{start, start_builtins, test_config};
use herald_tests::gateway::{token, token_with};
use herald_tests::{Publisher, TestGateway, TestNats};
use serde_json::{Value, json};

fn whoami() -> Function {
    Function::rpc("whoami", |request: RpcRequest| async move {
        RpcReply::json(&json!({"user": request.user, "device": request.device, "data": request.json::<Value>()?}))
    })
}

async fn rpc(client: &mut herald_tests::WsClient, id: &str, function: &str, data: Value) -> RpcResult {
    client.send_json(json!({"type": "rpc", "id": id, "fn": function, "data": data})).await;
    match client.next_frame().await {
        ServerFrame::RpcResult(result) => {
            assert_eq!(result.id, id);
            result
        }
        other => panic!("expected rpc_result, got {other:?}"),
    }
}

fn error_code(result: &RpcResult) -> Option<&str> {
    result.error.as_ref().map(|e| e.code.as_str())
}

#[tokio::test]
async fn rpc_reaches_the_function_with_the_token_identity_and_every_failure_has_its_code() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.rpc_timeout = Duration::from_secs(2);
        c.max_frame_bytes = 2 << 20;
    })
    .await;
    let functions = vec![
        whoami(),
        Function::rpc("refuse", |_: RpcRequest| async { Err::<RpcReply, _>(HandlerError::permanent("not allowed")) }),
        Function::rpc("slow", |_: RpcRequest| async { std::future::pending::<Result<RpcReply, HandlerError>>().await }),
    ];
    let _runtime = start(&nats, &test_config(&nats), functions).await;
    let mut client = gateway.connect_with(&format!("token={}&device=phone", token("alice"))).await;

    // The frame claims to be mallory; the function sees the token's user.
    let result = rpc(&mut client, "c1", "whoami", json!({"user": "mallory", "n": 1})).await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.data, Some(json!({"user": "alice", "device": "phone", "data": {"user": "mallory", "n": 1}})));

    let result = rpc(&mut client, "c2", "refuse", json!({})).await;
    assert_eq!((result.ok, error_code(&result)), (false, Some("function_error")));
    assert_eq!(result.error.unwrap().message, "not allowed");
    let result = rpc(&mut client, "c3", "nobody.home", json!({})).await;
    assert_eq!(error_code(&result), Some("no_function"));
    let result = rpc(&mut client, "c4", "slow", json!({})).await;
    assert_eq!(error_code(&result), Some("timeout"));
    for bad in ["a..b", "*", "fn.>", ""] {
        let result = rpc(&mut client, "c5", bad, json!({})).await;
        assert_eq!(error_code(&result), Some("bad_request"), "{bad}");
    }
    // A frame without the fields of an rpc is a bad frame, not a call.
    client.send_json(json!({"type": "rpc", "fn": "whoami"})).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Error { code, .. } if code == "bad_request"));
    // A request over what NATS takes could never be sent: not "unavailable" (try again later).
    let result = rpc(&mut client, "c6", "whoami", json!("x".repeat(1_100_000))).await;
    assert_eq!(error_code(&result), Some("bad_request"), "{:?}", result.error);
    // Without NATS, at once "unavailable", not a "timeout" of the function.
    nats.stop().await;
    herald_tests::eventually("the gateway sees NATS gone", Duration::from_secs(30), || async {
        let ready = reqwest::get(gateway.http_url("/readyz")).await.ok()?.text().await.ok()?;
        ready.contains("not connected to NATS").then_some(())
    })
    .await;
    let result = rpc(&mut client, "c7", "whoami", json!({})).await;
    assert_eq!(error_code(&result), Some("unavailable"), "{result:?}");
}

#[tokio::test]
async fn rpc_calls_are_rate_limited_per_connection() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.rpc_rate = 0.001;
        c.rpc_burst = 3.0;
    })
    .await;
    let _runtime = start(&nats, &test_config(&nats), vec![whoami()]).await;
    let mut client = gateway.connect("bob").await;
    for n in 0..5 {
        client.send_json(json!({"type": "rpc", "id": format!("r{n}"), "fn": "whoami", "data": {}})).await;
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..5 {
        let ServerFrame::RpcResult(result) = client.next_frame().await else { panic!("expected rpc_result") };
        outcomes.insert(result.id.clone(), error_code(&result).map(str::to_string));
    }
    let limited = outcomes.values().filter(|code| code.as_deref() == Some("rate_limited")).count();
    assert_eq!((outcomes.len(), limited), (5, 2), "{outcomes:?}");
    let counted = r#"herald_gateway_rpc_calls_total{function="(any)",outcome="rate_limited"}"#;
    assert_eq!(gateway.metric(counted).await, 2.0, "the calls over the rate are counted");
    // Another connection has its own budget.
    let mut other = gateway.connect("carl").await;
    assert!(rpc(&mut other, "x", "whoami", json!({})).await.ok);
}

#[tokio::test]
async fn the_gateway_publishes_lifecycle_events() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut events = nats.client().await.subscribe("herald.events.>").await.unwrap();
    let client = gateway.connect_with(&format!("token={}&device=tablet", token("dora"))).await;
    let conn = match &client.welcome {
        Some(ServerFrame::Welcome { conn, .. }) => conn.clone(),
        _ => unreachable!(),
    };
    let connect = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap();
    assert_eq!(connect.subject.as_str(), "herald.events.connect");
    let event: LifecycleEvent = serde_json::from_slice(&connect.payload).unwrap();
    assert_eq!((event.user.as_str(), event.device.as_str(), event.conn.as_str()), ("dora", "tablet", conn.as_str()));
    assert_eq!((event.node.as_str(), event.code), (gateway.config.node_id.as_str(), None));

    drop(client);
    let disconnect = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap();
    assert_eq!(disconnect.subject.as_str(), "herald.events.disconnect");
    let event: LifecycleEvent = serde_json::from_slice(&disconnect.payload).unwrap();
    assert_eq!((event.user.as_str(), event.conn.as_str()), ("dora", conn.as_str()));
    assert!(event.code.is_some());
}

#[tokio::test]
async fn builtin_functions_through_gateways_prefs_and_notify_to_a_topic() {
    let nats = TestNats::start().await;
    let gateway_a = TestGateway::start(&nats).await;
    let gateway_b = TestGateway::start(&nats).await;
    let _builtins = start_builtins(&test_config(&nats)).await;
    let publisher = Publisher::new(&nats).await;

    let mut eve = gateway_a.connect("eve").await;
    let mut eve_phone = gateway_b.connect_with(&format!("token={}&device=phone", token("eve"))).await;

    // prefs.set through the gateway mutes a kind for eve, on her sockets everywhere.
    let result = rpc(&mut eve, "m1", "prefs.set", json!({"muted": ["marketing"]})).await;
    assert_eq!(result.data, Some(json!({"muted": ["marketing"]})));
    for client in [&mut eve_phone, &mut eve] {
        wait_until_muted(&publisher, client).await;
    }
    // Muted on both gateways now: an ad then a marker, and neither socket gets the ad.
    let (ad, _) = publisher.publish_with("push.user.eve", &[("Herald-Type", "marketing")], "sale").await;
    let marker = publisher.publish("push.user.eve", "marker").await;
    for client in [&mut eve, &mut eve_phone] {
        let mut seqs = vec![client.expect_msg().await.seq];
        while seqs.last() != Some(&marker) {
            seqs.push(client.expect_msg().await.seq);
        }
        assert!(!seqs.contains(&ad), "{seqs:?} has the muted {ad}");
    }

    // notify to a topic reaches its subscribers through the gateway.
    let mut reader = gateway_a.connect_with(&format!("token={}&topics=news", token_with("gil", &["news"], 600))).await;
    let event = json!({"id": "n-1", "to": {"topic": "news"}, "kind": "news", "data": {"title": "hi"}});
    publisher.jetstream().publish("events.notify.news", event.to_string().into()).await.unwrap().await.unwrap();
    let msg = reader.expect_msg().await;
    assert_eq!((msg.to.as_str(), msg.kind.as_str(), msg.data.clone()), ("topic:news", "news", json!({"title": "hi"})));
}

/// Publishes a `marketing` message and a marker to eve until `client` gets the marker without the
/// ad before it (older messages still queued are skipped).
async fn wait_until_muted(publisher: &Publisher, client: &mut herald_tests::WsClient) {
    for attempt in 0.. {
        assert!(attempt < 500, "the mute never took effect");
        let (ad, _) = publisher.publish_with("push.user.eve", &[("Herald-Type", "marketing")], "sale").await;
        let marker = publisher.publish("push.user.eve", "marker").await;
        let mut got_ad = false;
        loop {
            let seq = client.expect_msg().await.seq;
            got_ad |= seq == ad;
            if seq == marker {
                break;
            }
        }
        if !got_ad {
            return;
        }
    }
}

#[tokio::test]
async fn presence_across_two_gateways_counts_a_user_on_both_once() {
    let nats = TestNats::start().await;
    let gateway_a = TestGateway::start(&nats).await;
    let gateway_b = TestGateway::start(&nats).await;
    let mut config = test_config(&nats);
    config.builtins = vec!["presence".into()];
    let _builtins = start_builtins(&config).await;
    let presence = |data: Option<Value>| {
        let data = data.expect("presence answers");
        (data["users"].as_u64().unwrap(), data["connections"].as_u64().unwrap(), data["gateways"].as_u64().unwrap())
    };

    // eve on both gateways (two devices on b), finn on b.
    let mut eve = gateway_a.connect("eve").await;
    let eve_phone = gateway_b.connect_with(&format!("token={}&device=phone", token("eve"))).await;
    let eve_tablet = gateway_b.connect_with(&format!("token={}&device=tablet", token("eve"))).await;
    let finn = gateway_b.connect("finn").await;
    let result = rpc(&mut eve, "p1", "presence", json!({"user": "eve"})).await;
    assert_eq!(result.data, Some(json!({"user": "eve", "online": true, "connections": 3})));
    assert_eq!(presence(rpc(&mut eve, "p2", "presence", json!({})).await.data), (2, 4, 2));

    drop(finn);
    gateway_b.wait_metric("herald_gateway_connections", 2.0).await;
    assert_eq!(presence(rpc(&mut eve, "p3", "presence", json!({})).await.data), (1, 3, 2));
    let result = rpc(&mut eve, "p4", "presence", json!({"user": "finn"})).await;
    assert_eq!(result.data, Some(json!({"user": "finn", "online": false, "connections": 0})));

    drop(eve_phone);
    drop(eve_tablet);
    gateway_b.wait_metric("herald_gateway_connections", 0.0).await;
    assert_eq!(presence(rpc(&mut eve, "p5", "presence", json!({})).await.data), (1, 1, 2));
    let result = rpc(&mut eve, "p6", "presence", json!({"user": "eve"})).await;
    assert_eq!(result.data, Some(json!({"user": "eve", "online": true, "connections": 1})));

    // More users on both gateways (another device on each): each counts once.
    let mut crowd = Vec::new();
    for n in 0..20 {
        crowd.push(gateway_a.connect(&format!("crowd-{n}")).await);
        crowd.push(gateway_b.connect_with(&format!("token={}&device=phone", token(&format!("crowd-{n}")))).await);
    }
    assert_eq!(presence(rpc(&mut eve, "p7", "presence", json!({})).await.data), (21, 41, 2));
}
