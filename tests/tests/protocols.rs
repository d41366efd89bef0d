//! One user on Herald JSON, STOMP and SSE at once (docs/protocols.md): every protocol is a codec over
//! the same session core, so each connection receives each message exactly once, in order.

use herald_tests::gateway::token;
use herald_tests::sse::SseClient;
use herald_tests::stomp::StompClient;
use herald_tests::{Publisher, TestGateway, TestNats};

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

    let mut published = Vec::new();
    for n in 0..10 {
        let subject = if n % 3 == 0 { "push.all" } else { "push.user.olga" };
        published.push((publisher.publish(subject, &n.to_string()).await, n.to_string()));
    }
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
