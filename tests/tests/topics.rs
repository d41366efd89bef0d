//! Topics: permissions from the token, live and replayed delivery, shared subscriptions.

use herald_shared::frame::ServerFrame;
use herald_tests::gateway::token_with;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use tokio_tungstenite::tungstenite::Message;

/// The code and topic of an `error` frame.
fn refusal(frame: ServerFrame) -> (String, Option<String>) {
    match frame {
        ServerFrame::Error { code, topic, .. } => (code, topic),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn permitted_topics_are_delivered_and_forbidden_ones_refused_without_a_subscription() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = token_with("gus", &["news", "room-*"], 600);
    let mut client = gateway.connect_with(&format!("token={token}")).await;

    client.send_json(serde_json::json!({"type": "sub", "topic": "news"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    client.send_json(serde_json::json!({"type": "sub", "topic": "room-7"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "room-7".into() });
    client.send_json(serde_json::json!({"type": "sub", "topic": "secret"})).await;
    assert_eq!(refusal(client.next_frame().await), ("forbidden".into(), Some("secret".into())));
    client.send_json(serde_json::json!({"type": "sub", "topic": "news.>"})).await;
    assert_eq!(refusal(client.next_frame().await), ("bad_request".into(), Some("news.>".into())));

    publisher.publish("push.topic.secret", "hidden").await;
    let news = publisher.publish("push.topic.news", "headline").await;
    let room = publisher.publish("push.topic.room-7", "hello room").await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.to.as_str()), (news, "topic:news"));
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.to.as_str()), (room, "topic:room-7"));

    // After unsub, the topic no longer reaches the client.
    client.send_json(serde_json::json!({"type": "unsub", "topic": "news"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Unsubscribed { topic: "news".into() });
    publisher.publish("push.topic.news", "missed on purpose").await;
    let marker = publisher.publish("push.user.gus", "marker").await;
    assert_eq!(client.expect_msg().await.seq, marker);
    // One subscription each for gus, all and room-7: the secret topic never got one.
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 3.0);
}

#[tokio::test]
async fn the_topics_parameter_subscribes_at_connect_and_replays_with_since() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let base = publisher.publish("push.user.nobody", "x").await;
    let first = publisher.publish("push.topic.news", "1").await;
    publisher.publish("push.topic.sports", "not subscribed").await;
    let second = publisher.publish("push.topic.news", "2").await;

    let token = token_with("hal", &["news", "sports"], 600);
    let mut client = gateway.connect_with(&format!("token={token}&topics=news&since={base}")).await;
    assert_eq!(client.expect_msgs(2).await, vec![first, second]);
    assert_eq!(client.expect_replayed().await, (base + 1, second, 2, true, None));
    let live = publisher.publish("push.topic.news", "3").await;
    assert_eq!(client.expect_msg().await.seq, live);
}

#[tokio::test]
async fn sub_with_since_replays_the_topic_as_its_own_block() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let base = publisher.publish("push.user.nobody", "x").await;
    let old_news = [publisher.publish("push.topic.news", "a").await, publisher.publish("push.topic.news", "b").await];

    let token = token_with("ida", &["news"], 600);
    let mut client = gateway.connect_with(&format!("token={token}")).await;
    let mine = publisher.publish("push.user.ida", "newer than the news").await;
    assert_eq!(client.expect_msg().await.seq, mine);

    client.send_json(serde_json::json!({"type": "sub", "topic": "news", "since": base})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    // Older than what the connection already has: a block of their own, then replayed with the topic.
    assert_eq!(client.expect_msgs(2).await, old_news.to_vec());
    assert_eq!(client.expect_replayed().await, (base + 1, old_news[1], 2, true, Some("news".into())));
    let live = publisher.publish("push.topic.news", "c").await;
    assert_eq!(client.expect_msg().await.seq, live);
}

#[tokio::test]
async fn sub_with_since_past_what_the_connection_had_sends_nothing_of_the_topic_up_to_since() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = token_with("joy", &["news"], 600);
    let mut client = gateway.connect_with(&format!("token={token}")).await;
    // Published after the connection began, before it joins the topic: the client has them
    // already (another tab, its own backend) and asks for what comes after.
    let mut had = Vec::new();
    for text in ["a", "b", "c"] {
        had.push(publisher.publish("push.topic.news", text).await);
    }

    client.send_json(serde_json::json!({"type": "sub", "topic": "news", "since": had[2]})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    assert_eq!(client.expect_replayed().await, (had[2] + 1, had[2], 0, true, Some("news".into())));
    let live = publisher.publish("push.topic.news", "d").await;
    assert_eq!(client.expect_msg().await.seq, live);
}

#[tokio::test]
async fn a_topic_subscription_is_shared_and_released_after_its_last_socket() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = |user: &str| token_with(user, &["news"], 600);
    let mut jim = gateway.connect_with(&format!("token={}&topics=news", token("jim"))).await;
    let mut kim = WsClient::connect(&gateway.ws_url(&format!("token={}", token("kim")))).await.unwrap();
    kim.expect_welcome().await;
    kim.send_json(serde_json::json!({"type": "sub", "topic": "news"})).await;
    assert_eq!(kim.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    // jim, kim, all, news: one subscription for the topic, whatever the number of sockets.
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 4.0);

    let seq = publisher.publish("push.topic.news", "for both").await;
    assert_eq!(jim.expect_msg().await.seq, seq);
    assert_eq!(kim.expect_msg().await.seq, seq);

    jim.send_json(serde_json::json!({"type": "unsub", "topic": "news"})).await;
    assert_eq!(jim.next_frame().await, ServerFrame::Unsubscribed { topic: "news".into() });
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 4.0);
    let seq = publisher.publish("push.topic.news", "kim only").await;
    assert_eq!(kim.expect_msg().await.seq, seq);

    drop(kim);
    gateway.wait_metric("herald_gateway_connections", 1.0).await;
    // kim's user subscription and the topic's are gone.
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 2.0);
}

/// A connection that ends while its `sub` is being joined (or a `sub` and then an `unsub`) leaves no
/// subscription behind: once every socket is gone, the gateway holds no route for their topics.
#[tokio::test]
async fn a_connection_closed_while_joining_a_topic_leaves_no_subscription_behind() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let token = token_with("quitter", &["*"], 600);
    for n in 0..30 {
        let mut client = gateway.connect_with(&format!("token={token}&device=d{n}")).await;
        client.send_json(serde_json::json!({"type": "sub", "topic": format!("brief-{n}")})).await;
        if n % 2 == 1 {
            client.send_json(serde_json::json!({"type": "unsub", "topic": format!("brief-{n}")})).await;
        }
        client.send(Message::Close(None)).await.expect("close");
    }
    let settled = || async {
        let (connections, subscriptions) =
            (gateway.metric("herald_gateway_connections").await, gateway.metric("herald_gateway_subscriptions").await);
        (connections == 0.0 && subscriptions == 0.0).then_some(())
    };
    herald_tests::eventually("no connection and no subscription left", std::time::Duration::from_secs(20), settled)
        .await;
}
