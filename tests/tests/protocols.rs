//! One user on Herald JSON, Socket.IO and Centrifugal at once: each socket receives each message
//! once, in `seq` order, whatever its protocol.

use herald_tests::gateway::token_with;
use herald_tests::sdk::{SdkClient, python};
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use serde_json::json;

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

    let mut published = Vec::new();
    for n in 0..30 {
        let subject = ["push.user.tri", "push.all", "push.topic.news"][n % 3];
        published.push(publisher.publish(subject, &n.to_string()).await);
    }
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
