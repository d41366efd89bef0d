//! Gateway core: a user receives its own messages, on every socket, and never another user's.

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

    let seq_for_bob = publish(&js, "push.user.bob", r#"{"text":"for bob"}"#).await;
    let seq_for_alice = publish(&js, "push.user.alice", r#"{"text":"for alice"}"#).await;

    let msg = alice.expect_msg().await;
    assert_eq!((msg.seq, msg.to.as_str()), (seq_for_alice, "user"));
    assert_eq!(msg.data, serde_json::json!({"text": "for alice"}));
    let msg = bob.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq_for_bob, serde_json::json!({"text": "for bob"})));
}
