//! One user on several protocols at once (docs/protocols.md): every protocol is a codec over the
//! same session core, so each connection receives each message exactly once, in `seq` order.

use herald_tests::gateway::{token, token_with};
use herald_tests::sdk::{SdkClient, python};
use herald_tests::sse::SseClient;
use herald_tests::stomp::StompClient;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use serde_json::json;

#[tokio::test]
async fn the_same_user_on_herald_stomp_and_sse_gets_each_message_once_on_each() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;

    let mut herald = gateway.connect_with(&format!("token={}&device=phone", token("olga"))).await;
    let mut stomp =
        StompClient::connect(&format!("ws://{}/stomp", gateway.addr), &[("passcode", &token("olga"))]).await;
    stomp.expect("CONNECTED").await;
    stomp.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/all"), ("receipt", "q")], "").await;
    stomp.send_frame("SUBSCRIBE", &[("id", "a"), ("destination", "/topic/all"), ("receipt", "a")], "").await;
    assert_eq!(stomp.expect("RECEIPT").await.header("receipt-id"), "q");
    assert_eq!(stomp.expect("RECEIPT").await.header("receipt-id"), "a");
    let sse_url = format!("http://{}/sse?token={}&device=browser", gateway.addr, token("olga"));
    let mut sse = SseClient::open(&sse_url, &[]).await.unwrap();
    assert_eq!(sse.next_event().await.event, "welcome");

    // Pipelined, so that the gateway gets them in bursts (shared by every socket of a protocol).
    let sent: Vec<(&str, String)> =
        (0..200).map(|n| (if n % 3 == 0 { "push.user.olga" } else { "push.all" }, n.to_string())).collect();
    let seqs = publish_pipelined(&publisher, &sent).await;
    let mut published: Vec<(u64, String)> = seqs.into_iter().zip(sent.into_iter().map(|(_, body)| body)).collect();
    // A last message after the others: once each connection has it, it has had everything before.
    let last = (publisher.publish("push.user.olga", "last").await, "last".to_string());
    published.push(last.clone());

    let mut on_herald = Vec::new();
    while on_herald.last() != Some(&last) {
        let msg = herald.expect_msg().await;
        on_herald.push((msg.seq, msg.data.to_string().trim_matches('"').to_string()));
    }
    let mut on_stomp = Vec::new();
    while on_stomp.last() != Some(&last) {
        let message = stomp.expect("MESSAGE").await;
        on_stomp.push((message.header("message-id").parse::<u64>().unwrap(), message.body));
    }
    let mut on_sse = Vec::new();
    while on_sse.last() != Some(&last) {
        let event = sse.next_event().await;
        on_sse.push((event.id.unwrap().parse::<u64>().unwrap(), event.data));
    }
    assert_eq!(on_herald, published);
    assert_eq!(on_stomp, published);
    assert_eq!(on_sse, published);
}

#[tokio::test]
async fn a_user_on_three_protocols_gets_every_message_once_per_socket_in_order() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = token_with("tri", &["news"], 600);

    let mut herald = WsClient::connect(&gateway.ws_url(&format!("token={token}&topics=news"))).await.unwrap();
    herald.expect_welcome().await;

    let mut socketio = SdkClient::start(&python, "socketio_client.py");
    let url = format!("http://{}", gateway.addr);
    socketio.send(json!({"op": "connect", "url": url, "token": token, "transports": ["websocket"]})).await;
    socketio.wait_for("socket.io connected", |e| e["event"] == "connected").await;
    socketio.send(json!({"op": "call", "event": "sub", "args": ["news"]})).await;
    socketio.wait_for("socket.io subscribed", |e| e["event"] == "ack").await;

    let mut centrifugal = SdkClient::start(&python, "centrifugal_client.py");
    let url = format!("ws://{}/connection/websocket", gateway.addr);
    centrifugal.send(json!({"op": "connect", "url": url, "token": token})).await;
    centrifugal.wait_count("subscribed", 2).await;
    centrifugal.send(json!({"op": "subscribe", "channel": "news"})).await;
    centrifugal.wait_for("centrifugal subscribed", |e| e["event"] == "subscribed" && e["channel"] == "news").await;

    // Pipelined, so that the gateway gets them in bursts (shared by every socket of a protocol).
    let sent: Vec<(&str, String)> =
        (0..150).map(|n| (["push.user.tri", "push.all", "push.topic.news"][n / 4 % 3], n.to_string())).collect();
    let published = publish_pipelined(&publisher, &sent).await;
    publisher.publish("push.user.someone-else", "not for tri").await;

    assert_eq!(herald.expect_msgs(published.len()).await, published);
    let socketio_seqs: Vec<u64> = socketio
        .wait_count("event", published.len())
        .await
        .iter()
        .map(|e| e["args"][1]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(socketio_seqs, published);
    let centrifugal_seqs: Vec<u64> =
        centrifugal.wait_count("pub", published.len()).await.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(centrifugal_seqs, published);

    // Nothing more came to any of them.
    let last = publisher.publish("push.all", "end").await;
    assert_eq!(herald.expect_msgs(1).await, vec![last]);
    assert_eq!(socketio.wait_count("event", published.len() + 1).await.len(), published.len() + 1);
    assert_eq!(centrifugal.wait_count("pub", published.len() + 1).await.len(), published.len() + 1);
}

/// Publishes every `(subject, body)` without waiting for each acknowledgement; their `seq`s.
async fn publish_pipelined(publisher: &Publisher, messages: &[(&str, String)]) -> Vec<u64> {
    let mut acks = Vec::new();
    for (subject, body) in messages {
        acks.push(publisher.send(subject, &[], body).await);
    }
    let mut seqs = Vec::new();
    for ack in acks {
        seqs.push(ack.await.expect("publish acknowledged").sequence);
    }
    seqs
}

/// A payload that is not UTF-8, even one shaped like JSON, reaches every protocol without breaking
/// its text frames (a client closes on a text frame that is not UTF-8, then replays the same message
/// on every reconnection): Herald JSON, Centrifugal and Socket.IO give it as `{"$base64":…}`, STOMP
/// as a binary message with the bytes as they are.
#[tokio::test]
async fn payloads_that_are_not_utf8_reach_every_protocol_intact() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = token("bytes");

    let mut herald = gateway.connect_with(&format!("token={token}&device=phone")).await;
    let mut stomp = StompClient::connect(&format!("ws://{}/stomp", gateway.addr), &[("passcode", &token)]).await;
    stomp.expect("CONNECTED").await;
    stomp.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/q"), ("receipt", "q")], "").await;
    assert_eq!(stomp.expect("RECEIPT").await.header("receipt-id"), "q");
    let mut socketio = SdkClient::start(&python, "socketio_client.py");
    let url = format!("http://{}", gateway.addr);
    socketio.send(json!({"op": "connect", "url": url, "token": token, "transports": ["websocket"]})).await;
    socketio.wait_for("socket.io connected", |e| e["event"] == "connected").await;
    let mut centrifugal = SdkClient::start(&python, "centrifugal_client.py");
    let url = format!("ws://{}/connection/websocket", gateway.addr);
    centrifugal.send(json!({"op": "connect", "url": url, "token": token})).await;
    centrifugal.wait_count("subscribed", 2).await;

    let payloads: [&[u8]; 3] = [b"{\"a\":\"\xff\"}", b"\xff\x00", b"{\"a\":1}"];
    let mut seqs = Vec::new();
    for payload in payloads {
        let ack = publisher.jetstream().publish("push.user.bytes", payload.to_vec().into()).await.unwrap();
        seqs.push(ack.await.expect("stored").sequence);
    }
    let data = [json!({"$base64": "eyJhIjoi/yJ9"}), json!({"$base64": "/wA="}), json!({"a": 1})];

    let mut got = Vec::new();
    for _ in 0..3 {
        let msg = herald.expect_msg().await;
        got.push((msg.seq, msg.data));
    }
    assert_eq!(got, seqs.iter().copied().zip(data.clone()).collect::<Vec<_>>());

    let mut on_stomp = Vec::new();
    for _ in 0..3 {
        let message = stomp.expect("MESSAGE").await;
        let body = message.binary.clone().unwrap_or_else(|| message.body.clone().into_bytes());
        on_stomp.push((message.header("message-id").parse::<u64>().unwrap(), message.binary.is_some(), body));
    }
    let expected: Vec<_> = seqs
        .iter()
        .zip(payloads)
        .map(|(seq, payload)| (*seq, std::str::from_utf8(payload).is_err(), payload.to_vec()))
        .collect();
    assert_eq!(on_stomp, expected);

    let on_socketio: Vec<_> = socketio
        .wait_count("event", 3)
        .await
        .iter()
        .map(|e| (e["args"][1]["seq"].as_u64().unwrap(), e["args"][0].clone()))
        .collect();
    assert_eq!(on_socketio, seqs.iter().copied().zip(data.clone()).collect::<Vec<_>>());
    let on_centrifugal: Vec<_> = centrifugal
        .wait_count("pub", 3)
        .await
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["data"].clone()))
        .collect();
    assert_eq!(on_centrifugal, seqs.iter().copied().zip(data).collect::<Vec<_>>());
}
