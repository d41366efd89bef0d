//! Exact delivery when the path is briefly too slow: a socket that overflows its queue resumes
//! losslessly, and messages the gateway itself dropped are repaired from the stream.

use herald_shared::frame::{ServerFrame, close_code};
use herald_tests::gateway::token;
use herald_tests::ws::Event;
use herald_tests::{Publisher, TestGateway, TestNats};

#[tokio::test]
async fn a_slow_socket_closed_with_4008_resumes_with_since_and_misses_nothing() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.outbound_queue_bytes = 64 * 1024).await;
    let publisher = Publisher::new(&nats).await;
    let mut slow = gateway.connect("ray").await;

    let body = format!("\"{}\"", "x".repeat(32 * 1024));
    let mut published = Vec::new();
    for _ in 0..100 {
        published.push(publisher.publish("push.user.ray", &body).await);
    }
    gateway.wait_metric("herald_gateway_slow_consumer_closes_total", 1.0).await;

    let mut received = Vec::new();
    loop {
        match slow.next_event().await {
            Event::Frame(ServerFrame::Msg(msg)) => received.push(msg.seq),
            Event::Frame(other) => panic!("unexpected {other:?}"),
            Event::Close(close) => {
                assert_eq!(close.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
                break;
            }
        }
    }
    assert!(received.len() < published.len());
    // Maybe nothing got through before the overflow: then the resume starts at the welcome.
    let since = received.last().copied().unwrap_or(slow.welcome_seq());
    let mut resumed = gateway.connect_with(&format!("token={}&since={since}", token("ray"))).await;
    let rest = published.len() - received.len();
    received.extend(resumed.expect_msgs(rest).await);
    assert_eq!(received, published);
    assert!(resumed.expect_replayed().await.3, "complete");
}

#[tokio::test]
async fn messages_dropped_inside_the_gateway_are_repaired_from_the_stream() {
    let nats = TestNats::start().await;
    // A one-message buffer per subscription: async-nats drops whatever arrives while it is full.
    let gateway = TestGateway::start_with(&nats, |c| c.nats.nats_subscription_capacity = 1).await;
    let publisher = Publisher::new(&nats).await;
    let mut clients = Vec::new();
    for user in ["s0", "s1", "s2"] {
        clients.push((user, gateway.connect(user).await));
    }

    // A burst for each user, pipelined so that messages arrive faster than one at a time.
    let mut acks = Vec::new();
    for n in 0..600 {
        let user = ["s0", "s1", "s2"][n % 3];
        acks.push((user, publisher.send(&format!("push.user.{user}"), &[], &n.to_string()).await));
    }
    let mut expected: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    for (user, ack) in acks {
        expected.entry(user).or_default().push(ack.await.unwrap().sequence);
    }
    for (user, client) in &mut clients {
        let want = &expected[*user];
        assert_eq!(&client.expect_msgs(want.len()).await, want, "{user}");
    }
    // The repair path really ran: the buffer overflowed and sessions replayed from the stream.
    assert!(gateway.metric("herald_gateway_repairs_total").await >= 1.0);
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_connections").await, 3.0);
}
