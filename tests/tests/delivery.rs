//! Gateway core, delivery: users get their own messages on every socket and gateway, `push.all`
//! reaches everyone, frames have the contract's shape.

use async_nats::jetstream;
use herald_shared::frame::ServerFrame;
use herald_tests::{TestGateway, TestNats};

async fn publish(js: &jetstream::Context, subject: &str, body: &str) -> u64 {
    js.publish(subject.to_string(), body.to_string().into()).await.unwrap().await.unwrap().sequence
}

#[tokio::test]
async fn a_user_receives_its_own_messages_and_never_another_users() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    let mut alice = gateway.connect("alice").await;
    let mut bob = gateway.connect("bob").await;

    let for_bob = publish(&js, "push.user.bob", r#"{"text":"for bob"}"#).await;
    let for_alice = publish(&js, "push.user.alice", r#"{"text":"for alice"}"#).await;

    // Bob's message was stored first; alice's first frame is still her own.
    let msg = alice.expect_msg().await;
    assert_eq!((msg.seq, msg.to.as_str()), (for_alice, "user"));
    assert_eq!(msg.data, serde_json::json!({"text": "for alice"}));
    let msg = bob.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (for_bob, serde_json::json!({"text": "for bob"})));
    // And bob's next frame is the next message for bob, not alice's.
    let next_for_bob = publish(&js, "push.user.bob", "second").await;
    let msg = bob.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (next_for_bob, serde_json::json!("second")));
}

#[tokio::test]
async fn two_sockets_of_one_user_both_receive() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    let token = herald_tests::gateway::token("carol");
    let mut phone = gateway.connect_with(&format!("token={token}&device=phone")).await;
    let mut laptop = gateway.connect_with(&format!("token={token}&device=laptop")).await;

    let seq = publish(&js, "push.user.carol", r#"{"n":1}"#).await;
    assert_eq!(phone.expect_msg().await.seq, seq);
    assert_eq!(laptop.expect_msg().await.seq, seq);
    // One NATS subscription for carol, one for push.all.
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 2.0);
}

#[tokio::test]
async fn push_all_reaches_every_socket() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        clients.push(gateway.connect(user).await);
    }
    let seq = publish(&js, "push.all", "maintenance at noon").await;
    for client in &mut clients {
        let msg = client.expect_msg().await;
        assert_eq!((msg.seq, msg.to.as_str(), msg.data), (seq, "all", serde_json::json!("maintenance at noon")));
    }
}

#[tokio::test]
async fn a_message_reaches_the_gateway_holding_the_socket_and_no_other() {
    let nats = TestNats::start().await;
    let gateway_a = TestGateway::start(&nats).await;
    let gateway_b = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    let mut dave = gateway_a.connect("dave").await;
    let mut erin = gateway_b.connect("erin").await;

    // Published without knowing where dave is: it reaches gateway A only.
    let for_dave = publish(&js, "push.user.dave", "to dave").await;
    assert_eq!(dave.expect_msg().await.seq, for_dave);
    let for_erin = publish(&js, "push.user.erin", "to erin").await;
    assert_eq!(erin.expect_msg().await.seq, for_erin);

    assert_eq!(gateway_a.metric("herald_gateway_messages_in_total").await, 1.0);
    assert_eq!(gateway_b.metric("herald_gateway_messages_in_total").await, 1.0);
}

#[tokio::test]
async fn welcome_comes_first_with_the_streams_last_sequence_and_frames_have_the_contract_shape() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    publish(&js, "push.user.someone-else", "1").await;
    let last = publish(&js, "push.all", "2").await;

    let mut client = herald_tests::WsClient::connect(
        &gateway.ws_url(&format!("token={}&device=tablet", herald_tests::gateway::token("frank"))),
    )
    .await
    .unwrap();
    match client.next_frame().await {
        ServerFrame::Welcome { user, device, seq, heartbeat, conn, node, .. } => {
            assert_eq!((user.as_str(), device.as_str(), seq, heartbeat), ("frank", "tablet", last, 25));
            assert_eq!(conn.len(), 12);
            assert_eq!(node, gateway.config.node_id);
        }
        other => panic!("expected welcome first, got {other:?}"),
    }

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-7-shipped");
    headers.insert("Herald-Type", "mail");
    let seq = js
        .publish_with_headers("push.user.frank", headers, vec![0xff, 0x00].into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.id.as_str(), msg.kind.as_str()), (seq, "order-7-shipped", "mail"));
    assert_eq!(msg.data, serde_json::json!({"$base64": "/wA="}));
    assert!(time_is_rfc3339(&msg.ts), "{}", msg.ts);

    client.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Pong);
}

fn time_is_rfc3339(text: &str) -> bool {
    text.len() >= 20 && text.as_bytes()[4] == b'-' && text.contains('T') && text.ends_with('Z')
}

#[tokio::test]
async fn a_message_larger_than_the_outbound_queue_is_delivered_live_and_replayed() {
    let nats = TestNats::start().await;
    let queue_limit = 64 * 1024;
    let gateway = TestGateway::start_with(&nats, |c| c.outbound_queue_bytes = queue_limit).await;
    let js = nats.jetstream().await;
    let mut client = gateway.connect("bigs").await;
    let since = client.welcome_seq();

    let big = "x".repeat(4 * queue_limit);
    let big_seq = publish(&js, "push.user.bigs", &format!("\"{big}\"")).await;
    let after = publish(&js, "push.user.bigs", "after").await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data.as_str().map(str::len)), (big_seq, Some(big.len())));
    assert_eq!(client.expect_msg().await.seq, after);

    // Replayed too: one frame alone never overflows the queue.
    let query = format!("token={}&since={since}", herald_tests::gateway::token("bigs"));
    let mut resumed = gateway.connect_with(&query).await;
    assert_eq!(resumed.expect_msgs(2).await, vec![big_seq, after]);
    assert_eq!(resumed.expect_replayed().await, (since + 1, after, 2, true, None));
}
