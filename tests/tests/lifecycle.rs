//! Gateway core, lifecycle: graceful shutdown, NATS going away and coming back.

use std::time::Duration;

use herald_shared::frame::close_code;
use herald_tests::{TestGateway, TestNats, WsClient, eventually};

#[tokio::test]
async fn shutdown_closes_every_socket_with_1012_and_stops_accepting() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut first = gateway.connect("a").await;
    let mut second = gateway.connect("b").await;
    let url = gateway.ws_url(&format!("token={}", herald_tests::gateway::token("c")));

    gateway.shutdown().await;
    assert_eq!(first.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    assert_eq!(second.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    // The listener is gone: a new connection is refused at the TCP level.
    assert!(tokio_tungstenite::connect_async(&url).await.is_err());
}

#[tokio::test]
async fn readiness_follows_nats_and_delivery_resumes_when_it_returns() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut client = gateway.connect("resilient").await;
    assert_eq!(gateway.readyz().await, 200);

    nats.stop().await;
    eventually("readyz 503 while NATS is down", Duration::from_secs(30), || async {
        (gateway.readyz().await == 503).then_some(())
    })
    .await;
    // New sockets are refused while NATS is away; the open one stays.
    let refused = WsClient::connect(&gateway.ws_url(&format!("token={}", herald_tests::gateway::token("late"))))
        .await
        .err()
        .expect("refused while NATS is down");
    assert_eq!((refused.status, refused.body["error"].as_str()), (503, Some("unavailable")));
    // A bad token is still a 401: the client must renew it whatever else is wrong.
    let bad = WsClient::connect(&gateway.ws_url("token=not.a.jwt")).await.err().expect("refused");
    assert_eq!((bad.status, bad.body["error"].as_str()), (401, Some("unauthorized")));

    nats.start_again().await;
    gateway.wait_ready().await;
    // The gateway's delivery subscription came back by itself, without a restart.
    let js = nats.jetstream().await;
    let seq = eventually("a publish after NATS restarted", Duration::from_secs(30), || async {
        js.publish("push.user.resilient", "back".into()).await.ok()?.await.ok().map(|ack| ack.sequence)
    })
    .await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq, serde_json::json!("back")));
}
