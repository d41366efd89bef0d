//! STOMP 1.2 over WebSocket at `/stomp` (docs/protocols.md): real NATS, real gateways, a raw frame
//! client for exact frames and edge cases, and stomp.py (a client Herald did not write).

use std::time::Duration;

use herald_functions::{Function, RpcReply, RpcRequest};
use herald_tests::functions::{start, test_config};
use herald_tests::gateway::{token, token_with};
use herald_tests::stomp::{StompClient, StompEvent, StompFrame};
use herald_tests::{Publisher, TestGateway, TestNats};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn url(gateway: &TestGateway) -> String {
    format!("ws://{}/stomp", gateway.addr)
}

/// Connects with `headers` and reads CONNECTED.
async fn connect(gateway: &TestGateway, headers: &[(&str, &str)]) -> (StompClient, StompFrame) {
    let mut client = StompClient::connect(&url(gateway), headers).await;
    let connected = client.expect("CONNECTED").await;
    (client, connected)
}

/// Subscribes and waits for the RECEIPT (the subscription is live then).
async fn subscribe(client: &mut StompClient, id: &str, destination: &str, extra: &[(&str, &str)]) {
    let receipt = format!("sub-{id}");
    let mut headers = vec![("id", id), ("destination", destination), ("receipt", receipt.as_str())];
    headers.extend_from_slice(extra);
    client.send_frame("SUBSCRIBE", &headers, "").await;
    let frame = client.expect("RECEIPT").await;
    assert_eq!(frame.header("receipt-id"), receipt);
}

/// The `message-id` (= seq) and body of the next MESSAGE.
async fn next_message(client: &mut StompClient) -> (u64, String) {
    let message = client.expect("MESSAGE").await;
    (message.header("message-id").parse().unwrap(), message.body)
}

#[tokio::test]
async fn user_and_topic_messages_reach_stomp_clients_across_two_gateways() {
    let nats = TestNats::start().await;
    let (one, two) = (TestGateway::start(&nats).await, TestGateway::start(&nats).await);
    let publisher = Publisher::new(&nats).await;

    let alice_token = token_with("alice", &["news"], 3600);
    let (mut alice, connected) = connect(&one, &[("passcode", &alice_token), ("herald-device", "laptop")]).await;
    assert_eq!(alice.subprotocol.as_deref(), Some("v12.stomp"));
    assert_eq!((connected.header("version"), connected.header("user-name")), ("1.2", "alice"));
    assert_eq!(connected.header("herald-device"), "laptop");
    subscribe(&mut alice, "inbox", "/user/queue/inbox", &[]).await;
    subscribe(&mut alice, "news", "/topic/news", &[]).await;
    // Bob authenticates with an Authorization header in CONNECT.
    let bearer = format!("Bearer {}", token_with("bob", &["news"], 3600));
    let (mut bob, _) = connect(&two, &[("Authorization", &bearer)]).await;
    subscribe(&mut bob, "n", "/topic/news", &[]).await;
    subscribe(&mut bob, "q", "/user/queue/x", &[]).await;

    let (personal, _) = publisher.publish_with("push.user.alice", &[("Herald-Type", "mail")], r#"{"n":1}"#).await;
    let topic = publisher.publish("push.topic.news", r#"{"n":2}"#).await;

    let message = alice.expect("MESSAGE").await;
    let expected = [
        ("subscription", "inbox"),
        ("destination", "/user/queue/inbox"),
        ("content-type", "application/json"),
        ("herald-kind", "mail"),
    ];
    for (name, value) in expected {
        assert_eq!(message.header(name), value, "{name}");
    }
    // No `ack` on an `ack:auto` subscription, no `content-length` for a body without NUL.
    assert_eq!((message.get("ack"), message.get("content-length")), (None, None));
    assert_eq!((message.header("message-id"), message.body.as_str()), (personal.to_string().as_str(), r#"{"n":1}"#));
    let message = alice.expect("MESSAGE").await;
    assert_eq!((message.header("subscription"), message.header("destination")), ("news", "/topic/news"));
    assert_eq!((message.header("message-id"), message.body.as_str()), (topic.to_string().as_str(), r#"{"n":2}"#));
    // Bob, on the other gateway, gets the topic message and not Alice's.
    assert_eq!(next_message(&mut bob).await, (topic, r#"{"n":2}"#.to_string()));
    let mine = publisher.publish("push.user.bob", r#"{"n":3}"#).await;
    assert_eq!(next_message(&mut bob).await, (mine, r#"{"n":3}"#.to_string()));
}

#[tokio::test]
async fn tokens_from_the_query_and_the_upgrade_header_and_bad_ones() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;

    let query = format!("{}?token={}", url(&gateway), token("carol"));
    let mut client = StompClient::connect(&query, &[]).await;
    assert_eq!(client.expect("CONNECTED").await.header("user-name"), "carol");
    let mut client =
        StompClient::open(&url(&gateway), "", &[("authorization", &format!("Bearer {}", token("dave")))]).await;
    assert_eq!(client.subprotocol, None);
    client.send_frame("STOMP", &[("accept-version", "1.1,1.2")], "").await;
    let connected = client.expect("CONNECTED").await;
    assert_eq!((connected.header("user-name"), connected.header("version")), ("dave", "1.2"));

    // A login and passcode of the app's own (Spring ignored them), empty or not, beside the token
    // in the URL.
    for headers in [[("login", "guest"), ("passcode", "guest")], [("login", ""), ("passcode", "")]] {
        let mut client = StompClient::connect(&query, &headers).await;
        assert_eq!(client.expect("CONNECTED").await.header("user-name"), "carol", "{headers:?}");
    }

    for headers in [vec![("passcode", "not-a-token")], vec![], vec![("passcode", &*token_with("eve", &[], -10))]] {
        let mut client = StompClient::connect(&url(&gateway), &headers).await;
        let (error, close) = client.expect_error_and_close().await;
        assert_eq!((error.header("message"), close), ("unauthorized", Some(1008)), "{headers:?}");
        if headers.is_empty() {
            // Where a STOMP client puts it.
            assert!(error.body.contains("passcode"), "{}", error.body);
        }
    }
    // Each refusal is counted as `/ws` counts the same error.
    assert_eq!(gateway.refusals(401, "unauthorized").await, 3.0);
}

/// A RECEIPT says every frame up to its own was processed: a later frame's receipt never comes
/// before the answer to an earlier topic SUBSCRIBE or UNSUBSCRIBE, which the session gives later.
#[tokio::test]
async fn receipts_come_in_the_order_of_their_frames() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let user_token = token_with("rita", &["news"], 3600);

    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client
        .send_raw(concat!(
            "SUBSCRIBE\nid:n\ndestination:/topic/news\nreceipt:r1\n\n\0",
            "SUBSCRIBE\nid:q\ndestination:/user/queue/x\nreceipt:r2\n\n\0",
            "UNSUBSCRIBE\nid:n\n\n\0",
            "SUBSCRIBE\nid:all\ndestination:/topic/all\nreceipt:r3\n\n\0",
        ))
        .await;
    let mut receipts = Vec::new();
    for _ in 0..3 {
        receipts.push(client.expect("RECEIPT").await.header("receipt-id").to_string());
    }
    assert_eq!(receipts, ["r1", "r2", "r3"]);

    // A DISCONNECT's RECEIPT comes after those of the frames before it, in the same message too.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client
        .send_raw(concat!(
            "SUBSCRIBE\nid:q\ndestination:/user/queue/x\nreceipt:r1\n\n\0",
            "SUBSCRIBE\nid:n\ndestination:/topic/news\nreceipt:r2\n\n\0",
            "DISCONNECT\nreceipt:bye\n\n\0",
        ))
        .await;
    let mut receipts = Vec::new();
    let close = loop {
        match client.next_event().await {
            StompEvent::Frame(frame) => receipts.push(frame.header("receipt-id").to_string()),
            StompEvent::HeartBeat => {}
            StompEvent::Close(close) => break close.map(|(code, _)| code),
        }
    };
    assert_eq!((receipts, close), (vec!["r1".to_string(), "r2".into(), "bye".into()], Some(1000)));

    // A frame refused in its turn: the receipts of the frames before it come first, then its ERROR.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client
        .send_raw(concat!(
            "SUBSCRIBE\nid:n\ndestination:/topic/news\nreceipt:r1\n\n\0",
            "UNSUBSCRIBE\nid:n\nreceipt:r2\n\n\0",
            "UNSUBSCRIBE\nid:n\nreceipt:r3\n\n\0",
        ))
        .await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "r1");
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "r2");
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), error.header("receipt-id"), close), ("bad_request", "r3", Some(1008)));

    // A refused topic ends the connection: its ERROR comes first, and no later frame's RECEIPT.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client
        .send_raw(concat!(
            "SUBSCRIBE\nid:s\ndestination:/topic/secret\nreceipt:r1\n\n\0",
            "SUBSCRIBE\nid:q\ndestination:/user/queue/x\nreceipt:r2\n\n\0",
        ))
        .await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), error.header("receipt-id"), close), ("forbidden", "r1", Some(1008)));
}

/// Header values are escaped as STOMP 1.1 and 1.2 say, but in CONNECTED (which never escapes: ids
/// may hold a colon) and on a 1.0 connection (1.0 has no escapes: `C:\temp` is a value, and
/// `order-7:42` comes back as it went). They were escaped in every frame of every version.
#[tokio::test]
async fn header_values_are_escaped_only_where_the_version_says() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let (mut client, connected) =
        connect(&gateway, &[("passcode", &token("tenant:ann")), ("herald-device", "a:b")]).await;
    assert!(connected.head.contains("\nuser-name:tenant:ann\n"), "{}", connected.head);
    assert!(connected.head.contains("\nherald-device:a:b\n"), "{}", connected.head);
    client.send_raw("SUBSCRIBE\nid:q\\c1\ndestination:/user/queue/x\nreceipt:order-7\\c42\n\n\0").await;
    assert_eq!(client.expect("RECEIPT").await.head, "RECEIPT\nreceipt-id:order-7\\c42");

    let mut client = StompClient::open(&url(&gateway), "v10.stomp", &[]).await;
    client.send_frame("CONNECT", &[("accept-version", "1.0"), ("passcode", &token("bo"))], "").await;
    assert_eq!(client.expect("CONNECTED").await.header("version"), "1.0");
    client.send_raw("SUBSCRIBE\nid:C:\\temp\ndestination:/user/queue/x\nreceipt:order-7:42\n\n\0").await;
    assert_eq!(client.expect("RECEIPT").await.head, "RECEIPT\nreceipt-id:order-7:42");
    let seq = Publisher::new(&nats).await.publish("push.user.bo", "hi").await;
    let message = client.expect("MESSAGE").await;
    let head = format!(
        "MESSAGE\nsubscription:C:\\temp\ndestination:/user/queue/x\nmessage-id:{seq}\ncontent-type:application/json"
    );
    assert_eq!(message.head, head);

    // A broadcast's frames are shared per version: a kind and an id with `:` are escaped for 1.2 only.
    let (mut v12, _) = connect(&gateway, &[("passcode", &token("cy"))]).await;
    for client in [&mut client, &mut v12] {
        client.send_raw("SUBSCRIBE\nid:all\ndestination:/topic/all\nreceipt:all\n\n\0").await;
        client.expect("RECEIPT").await;
    }
    let headers = [("Herald-Type", "order:created"), ("Nats-Msg-Id", "shop:7")];
    let (seq, _) = Publisher::new(&nats).await.publish_with("push.all", &headers, "{}").await;
    let tail = format!("message-id:{seq}\ncontent-type:application/json");
    let head = format!(
        "MESSAGE\nsubscription:all\ndestination:/topic/all\n{tail}\nherald-kind:order:created\nherald-id:shop:7"
    );
    assert_eq!(client.expect("MESSAGE").await.head, head);
    let head = format!(
        "MESSAGE\nsubscription:all\ndestination:/topic/all\n{tail}\nherald-kind:order\\ccreated\nherald-id:shop\\c7"
    );
    assert_eq!(v12.expect("MESSAGE").await.head, head);
    // And a message of the user's own, which is no broadcast's.
    let headers = [("Herald-Type", "order:paid"), ("Nats-Msg-Id", "shop:8")];
    let (seq, _) = Publisher::new(&nats).await.publish_with("push.user.bo", &headers, "{}").await;
    let head = format!(
        "MESSAGE\nsubscription:C:\\temp\ndestination:/user/queue/x\nmessage-id:{seq}\ncontent-type:application/json\nherald-kind:order:paid\nherald-id:shop:8"
    );
    assert_eq!(client.expect("MESSAGE").await.head, head);
}

#[tokio::test]
async fn a_forbidden_topic_and_malformed_frames_get_error_then_close() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let user_token = token_with("frank", &["news"], 3600);

    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client.send_frame("SUBSCRIBE", &[("id", "1"), ("destination", "/topic/secret"), ("receipt", "r")], "").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), error.header("receipt-id"), close), ("forbidden", "r", Some(1008)));
    assert_eq!(error.body, "the token does not allow topic secret");
    // A SEND to a name no function can have: refused with its receipt, no RECEIPT before.
    for name in ["", "bad name!"] {
        let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
        let destination = format!("/app/{name}");
        client.send_frame("SEND", &[("destination", &destination), ("receipt", "s")], "{}").await;
        let (error, close) = client.expect_error_and_close().await;
        assert_eq!((error.header("message"), error.header("receipt-id"), close), ("bad_request", "s", Some(1008)));
    }

    let cases = [
        ("SEND\ndestination /app/echo\n\n\0", "bad_request"),
        ("SEND\ncontent-length:2\n\nabc\0", "bad_request"),
        ("SEND\ndestination:/queue/x\n\n\0", "bad_request"),
        ("SUBSCRIBE\ndestination:/topic/news\n\n\0", "bad_request"),
        ("SUBSCRIBE\nid:1\ndestination:/elsewhere\n\n\0", "bad_request"),
        ("SUBSCRIBE\nid:1\ndestination:/topic/news\nack:sometimes\n\n\0", "bad_request"),
        // A NUL ends a frame: inside a header it would come back in every MESSAGE's `subscription`.
        ("SUBSCRIBE\nid:1\0x\ndestination:/topic/all\nreceipt:r\n\n\0", "bad_request"),
        ("ACK\nid:not-a-seq\n\n\0", "bad_request"),
        ("NACK\n\n\0", "bad_request"),
        ("NACK\nid:not-a-seq\n\n\0", "bad_request"),
        ("BEGIN\ntransaction:t1\n\n\0", "bad_request"),
        ("DANCE\n\n\0", "unknown_type"),
        ("CONNECT\naccept-version:1.2\n\n\0", "bad_request"),
    ];
    for (frame, message) in cases {
        let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
        client.send_raw(frame).await;
        let (error, close) = client.expect_error_and_close().await;
        assert_eq!((error.header("message"), close), (message, Some(1008)), "{frame:?}: {}", error.body);
    }
    // Subscriptions up to the limit (each queue name is one), and no more: the 257th is refused.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    for n in 0..256 {
        subscribe(&mut client, &n.to_string(), &format!("/user/queue/q{n}"), &[]).await;
    }
    client.send_raw("SUBSCRIBE\nid:256\ndestination:/user/queue/q256\nreceipt:r256\n\n\0").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("receipt-id"), error.body.as_str()), ("r256", "at most 256 subscriptions per connection"));
    assert_eq!(close, Some(1008));

    // A topic past the connection's `max_topics` (64), refused by the session: its ERROR names its receipt.
    let topics_token = token_with("frank", &["t*"], 3600);
    let (mut client, _) = connect(&gateway, &[("passcode", &topics_token)]).await;
    for n in 0..64 {
        subscribe(&mut client, &n.to_string(), &format!("/topic/t{n}"), &[]).await;
    }
    client.send_raw("SUBSCRIBE\nid:64\ndestination:/topic/t64\nreceipt:r64\n\n\0").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), error.header("receipt-id"), close), ("bad_request", "r64", Some(1008)));

    // A frame past the gateway's `max_frame_bytes`, sent in pieces each under it.
    let small = TestGateway::start_with(&nats, |config| config.max_frame_bytes = 1024).await;
    let (mut client, _) = connect(&small, &[("passcode", &user_token)]).await;
    let send = format!("SEND\ndestination:/app/echo\n\n{}\0", "x".repeat(3000));
    for piece in send.as_bytes().chunks(512) {
        client.send_raw(std::str::from_utf8(piece).unwrap()).await;
    }
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), error.body.as_str()), ("bad_request", "a frame longer than 1024 bytes"));
    assert_eq!(close, Some(1008));

    // Before CONNECT too.
    let mut client = StompClient::open(&url(&gateway), "v12.stomp", &[]).await;
    client.send_raw("HELLO\n\n\0").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("bad_request", Some(1008)));
    assert_eq!(error.body, "expected CONNECT, got HELLO");
    // Closed with a close frame, as after CONNECT: a binary message is refused with 1008; a
    // client's close is echoed.
    let mut client = StompClient::open(&url(&gateway), "v12.stomp", &[]).await;
    client.send_message(Message::binary(b"CONNECT\n\n\0".to_vec())).await;
    assert!(matches!(client.next_event().await, StompEvent::Close(Some((1008, _)))));
    let mut client = StompClient::open(&url(&gateway), "v12.stomp", &[]).await;
    let close = CloseFrame { code: CloseCode::from(4000), reason: "bye".into() };
    client.send_message(Message::Close(Some(close))).await;
    assert!(matches!(client.next_event().await, StompEvent::Close(Some((4000, _)))));
}

#[tokio::test]
async fn resume_with_herald_since_after_a_gateway_restart_misses_nothing() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let (mut client, _) = connect(&gateway, &[("passcode", &token("gina"))]).await;
    subscribe(&mut client, "q", "/user/queue/updates", &[]).await;
    let first = publisher.publish("push.user.gina", "1").await;
    assert_eq!(next_message(&mut client).await, (first, "1".to_string()));
    gateway.kill().await;

    let missed = [publisher.publish("push.user.gina", "2").await, publisher.publish("push.user.gina", "3").await];
    let gateway = TestGateway::start(&nats).await;
    let since = first.to_string();
    let (mut client, _) = connect(&gateway, &[("passcode", &token("gina")), ("herald-since", &since)]).await;
    // The replay runs before the client subscribes (the gateway counted it): its messages wait.
    gateway.wait_metric("herald_gateway_replayed_messages_total", 2.0).await;
    client.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/updates"), ("receipt", "r")], "").await;
    assert_eq!(next_message(&mut client).await, (missed[0], "2".to_string()));
    assert_eq!(next_message(&mut client).await, (missed[1], "3".to_string()));
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "r");
    let live = publisher.publish("push.user.gina", "4").await;
    assert_eq!(next_message(&mut client).await, (live, "4".to_string()));
}

#[tokio::test]
async fn ack_moves_the_device_cursor() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let headers = [("passcode", token("hana")), ("herald-device", "tablet".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let (mut client, _) = connect(&gateway, &headers).await;
    subscribe(&mut client, "q", "/user/queue/inbox", &[("ack", "client")]).await;
    let seqs: Vec<u64> = futures::future::join_all((1..=3).map(|n| {
        let publisher = &publisher;
        async move { publisher.publish("push.user.hana", &n.to_string()).await }
    }))
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let message = client.expect("MESSAGE").await;
        assert_eq!(message.header("ack"), message.header("message-id"));
        got.push(message.header("message-id").parse::<u64>().unwrap());
    }
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    let second = sorted[1].to_string();
    client.send_frame("ACK", &[("id", &second), ("receipt", "acked")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "acked");
    client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");
    assert_eq!(client.next_event().await, StompEvent::Close(Some((1000, "the client disconnected".into()))));

    // The same device, no herald-since: it resumes after its cursor, the acknowledged message.
    let (mut client, _) = connect(&gateway, &headers).await;
    subscribe(&mut client, "q", "/user/queue/inbox", &[("ack", "client")]).await;
    assert_eq!(next_message(&mut client).await.0, sorted[2]);
    let live = publisher.publish("push.user.hana", "4").await;
    assert_eq!(next_message(&mut client).await, (live, "4".to_string()));
}

/// Every subscription to a topic gets its own copy, as Spring's broker gives (two parts of a page
/// may each subscribe to `/topic/news`); the user's own messages go to the first `/user/queue/…`
/// subscription only (those destinations are one inbox).
#[tokio::test]
async fn each_subscription_to_a_topic_gets_its_own_copy() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let (mut client, _) = connect(&gateway, &[("passcode", &token_with("tess", &["news"], 3600))]).await;
    for (id, destination) in [
        ("a1", "/topic/all"),
        ("a2", "/topic/all"),
        ("n1", "/topic/news"),
        ("n2", "/topic/news"),
        ("q1", "/user/queue/a"),
    ] {
        subscribe(&mut client, id, destination, &[]).await;
    }
    subscribe(&mut client, "q2", "/user/queue/b", &[("ack", "client")]).await;
    // At once: a burst, which the gateway encodes once for every socket.
    let all: Vec<u64> = futures::future::join_all(["0", "1", "2"].map(|n| publisher.publish("push.all", n))).await;
    let news = publisher.publish("push.topic.news", "n").await;
    let mine = publisher.publish("push.user.tess", "u").await;
    let mut expected: Vec<(String, u64)> = Vec::new();
    for seq in &all {
        expected.extend([("a1".to_string(), *seq), ("a2".to_string(), *seq)]);
    }
    expected.extend([("n1".to_string(), news), ("n2".to_string(), news), ("q1".to_string(), mine)]);
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let message = client.expect("MESSAGE").await;
        got.push((message.header("subscription").to_string(), message.header("message-id").parse::<u64>().unwrap()));
    }
    got.sort_by_key(|(id, seq)| (*seq, id.clone()));
    expected.sort_by_key(|(id, seq)| (*seq, id.clone()));
    assert_eq!(got, expected);

    // Without the first, the second still gets them.
    client.send_frame("UNSUBSCRIBE", &[("id", "a1"), ("receipt", "left")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "left");
    let after = publisher.publish("push.all", "3").await;
    let message = client.expect("MESSAGE").await;
    assert_eq!((message.header("subscription"), message.header("message-id")), ("a2", after.to_string().as_str()));
}

/// A second subscription to a topic with `herald-since` replays the topic from there, as `/ws`'s `sub`
/// with `since` of a topic it has does (it got only what came next); the replay goes to every
/// subscription of the topic made by then, the first one too.
#[tokio::test]
async fn a_second_subscription_to_a_topic_with_herald_since_gets_its_replay() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let mut stored = Vec::new();
    for n in 0..3 {
        stored.push(publisher.publish("push.topic.news", &n.to_string()).await);
    }
    let (mut client, _) = connect(&gateway, &[("passcode", &token_with("uma", &["news"], 3600))]).await;
    subscribe(&mut client, "n1", "/topic/news", &[]).await;
    let since = (stored[0] - 1).to_string();
    let second = [("id", "n2"), ("destination", "/topic/news"), ("receipt", "sub-n2"), ("herald-since", &since)];
    client.send_frame("SUBSCRIBE", &second, "").await;
    let (mut got, mut receipts) = (Vec::new(), 0);
    while got.len() < 2 * stored.len() || receipts == 0 {
        let frame = client.next_frame().await;
        match frame.command.as_str() {
            "RECEIPT" => {
                assert_eq!(frame.header("receipt-id"), "sub-n2");
                receipts += 1;
            }
            "MESSAGE" => {
                got.push((frame.header("subscription").to_string(), frame.header("message-id").parse().unwrap()))
            }
            other => panic!("unexpected {other}: {frame:?}"),
        }
    }
    assert_eq!(receipts, 1);
    got.sort_by_key(|(id, seq): &(String, u64)| (*seq, id.clone()));
    let expected: Vec<(String, u64)> =
        stored.iter().flat_map(|seq| [("n1".to_string(), *seq), ("n2".to_string(), *seq)]).collect();
    assert_eq!(got, expected);
    let live = publisher.publish("push.topic.news", "live").await;
    for id in ["n1", "n2"] {
        let message = client.expect("MESSAGE").await;
        assert_eq!((message.header("subscription"), message.header("message-id")), (id, live.to_string().as_str()));
    }
}

/// An `ack:auto` subscription's cursor counts what the client's TCP acknowledged, not what the
/// gateway wrote: a client that stops reading is closed (4008) with messages still in the gateway's
/// send queue, which the connection's end discards (the client spoke after the gateway stopped
/// reading: its close resets the connection); the device's next connection, from its cursor, gets
/// them. It got none of them when the cursor counted the written ones.
#[tokio::test]
async fn an_auto_acknowledged_cursor_counts_what_reached_the_client_not_what_was_written() {
    const MESSAGES: usize = 400;
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.write_stall_timeout = Duration::from_secs(1)).await;
    let publisher = Publisher::new(&nats).await;
    let headers = [("passcode", token("val")), ("herald-device", "phone".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(gateway.addr).await.unwrap();
    let mut first = StompClient::connect_over(tcp, &url(&gateway), &headers).await;
    first.expect("CONNECTED").await;
    subscribe(&mut first, "q", "/user/queue/inbox", &[]).await;
    let body = "x".repeat(4000);
    let mut sent = Vec::new();
    for _ in 0..MESSAGES {
        sent.push(publisher.publish("push.user.val", &body).await);
    }
    // The client reads nothing until the gateway gives up on it, then speaks while it closes.
    gateway.wait_metric("herald_gateway_slow_consumer_closes_total", 1.0).await;
    first.send_raw("\n").await;
    let mut got = Vec::new();
    loop {
        match first.next_event().await {
            StompEvent::Frame(frame) if frame.command == "MESSAGE" => {
                got.push(frame.header("message-id").parse().unwrap())
            }
            StompEvent::Frame(frame) => assert_eq!(frame.command, "ERROR", "{frame:?}"),
            StompEvent::HeartBeat => {}
            StompEvent::Close(_) => break,
        }
    }
    assert!(got.len() < MESSAGES, "the client's buffers took every message: nothing tested");

    let (mut again, _) = connect(&gateway, &headers).await;
    subscribe(&mut again, "q", "/user/queue/inbox", &[]).await;
    while got.last() != sent.last() {
        got.push(next_message(&mut again).await.0);
    }
    let received: std::collections::BTreeSet<u64> = got.into_iter().collect();
    let missed: Vec<u64> = sent.into_iter().filter(|seq| !received.contains(seq)).collect();
    assert_eq!(missed, Vec::<u64>::new(), "never delivered");
}

/// The cursor of an `ack:auto` subscription that then stays quiet reaches KV while the connection
/// lasts, not only at its close: the gateway asks the socket again what its peer acknowledged (on
/// its own timer, or whenever else the connection's task wakes; no heart-beats within the wait).
#[tokio::test]
async fn a_quiet_auto_acknowledged_connection_writes_its_cursor_while_it_lasts() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |c| c.heartbeat = Duration::from_secs(300)).await;
    let headers = [("passcode", token("wes")), ("herald-device", "phone".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut client, _) = connect(&gateway, &headers).await;
    subscribe(&mut client, "q", "/user/queue/inbox", &[]).await;
    let seq = publisher.publish("push.user.wes", "hello").await;
    assert_eq!(next_message(&mut client).await.0, seq);
    assert_eq!(nats.device_cursor_at_least("wes.phone", seq).await, seq);
    drop(client);
}

/// An `ack:auto` cursor moves while the connection's queue never empties (a client reading a
/// backlog): each written batch counts once the client's TCP acknowledged it, not only the moment
/// the gateway has nothing left to write. It stayed where the backlog began when it counted only then.
#[tokio::test]
async fn an_auto_acknowledged_cursor_moves_while_the_queue_never_empties() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        // Small socket buffers, so that what is not read stays queued in the gateway, all of it in
        // the session's mailbox (no catch-up from the stream, which would pause the queue); no
        // close for it.
        c.socket_send_buffer = 16 * 1024;
        c.outbound_queue_bytes = 4 << 20;
        c.write_stall_timeout = Duration::from_secs(300);
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let headers = [("passcode", token("yan")), ("herald-device", "phone".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(gateway.addr).await.unwrap();
    let mut client = StompClient::connect_over(tcp, &url(&gateway), &headers).await;
    client.expect("CONNECTED").await;
    subscribe(&mut client, "q", "/user/queue/inbox", &[]).await;
    let body = "x".repeat(4000);
    let mut sent = Vec::new();
    for _ in 0..400 {
        sent.push(publisher.publish("push.user.yan", &body).await);
    }
    // The client reads part of the backlog, then stops: the rest stays queued.
    for expected in &sent[..250] {
        assert_eq!(next_message(&mut client).await.0, *expected);
    }
    nats.device_cursor_at_least("yan.phone", sent[100]).await;
    drop(client);
}

/// A new device's unread messages, sent on a `client-individual` subscription and never
/// acknowledged, come again on its next connection.
#[tokio::test]
async fn unread_messages_never_acknowledged_come_again_on_the_next_connection() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let mut unread = Vec::new();
    for n in 0..3 {
        unread.push(publisher.publish("push.user.ivo", &n.to_string()).await);
    }
    let headers = [("passcode", token("ivo")), ("herald-device", "tab".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for _ in 0..2 {
        let (mut client, connected) = connect(&gateway, &headers).await;
        assert_eq!((connected.header("herald-read"), connected.header("herald-unread")), ("0", "3"));
        let subscription = [("id", "q"), ("destination", "/user/queue/inbox"), ("ack", "client-individual")];
        client.send_frame("SUBSCRIBE", &subscription, "").await;
        let mut got = Vec::new();
        while got.len() < unread.len() {
            got.push(next_message(&mut client).await.0);
        }
        assert_eq!(got, unread);
        client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
        assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");
    }
}

/// A new device gets its unread messages, not the broadcasts stored before its first connection:
/// once it has the unread ones on `ack:auto`, its cursor is CONNECTED's `herald-seq`, and its next
/// connection does not get those broadcasts either. (Its cursor stayed at its last unread message,
/// and the broadcasts after it came on the next connection.)
#[tokio::test]
async fn a_new_devices_auto_cursor_passes_the_broadcasts_from_before_its_first_connection() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let unread = [publisher.publish("push.user.zed", "1").await, publisher.publish("push.user.zed", "2").await];
    for n in 0..2 {
        publisher.publish("push.all", &n.to_string()).await;
    }
    let headers = [("passcode", token("zed")), ("herald-device", "pad".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut client, connected) = connect(&gateway, &headers).await;
    let end: u64 = connected.header("herald-seq").parse().unwrap();
    subscribe_inbox_and_all_auto(&mut client).await;
    assert_eq!([next_message(&mut client).await.0, next_message(&mut client).await.0], unread);
    assert_eq!(nats.device_cursor_at_least("zed.pad", end).await, end);
    client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");

    let (mut again, _) = connect(&gateway, &headers).await;
    subscribe_inbox_and_all_auto(&mut again).await;
    let news = publisher.publish("push.all", "news").await;
    assert_eq!(next_message(&mut again).await.0, news);
}

/// The inbox and `push.all`, both `ack:auto`, without receipts (what a SUBSCRIBE releases comes
/// before its RECEIPT).
async fn subscribe_inbox_and_all_auto(client: &mut StompClient) {
    client.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/inbox")], "").await;
    client.send_frame("SUBSCRIBE", &[("id", "all"), ("destination", "/topic/all")], "").await;
}

/// The inbox acknowledged by the client, `push.all` on `ack:auto`.
async fn subscribe_inbox_and_all(client: &mut StompClient) {
    subscribe(client, "q", "/user/queue/inbox", &[("ack", "client")]).await;
    subscribe(client, "all", "/topic/all", &[]).await;
}

#[tokio::test]
async fn a_message_never_acknowledged_comes_again_though_an_auto_subscription_wrote_newer_ones() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let headers = [("passcode", token("ines")), ("herald-device", "laptop".to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let (mut client, _) = connect(&gateway, &headers).await;
    subscribe_inbox_and_all(&mut client).await;
    let unacked = publisher.publish("push.user.ines", "read me").await;
    let everyone = publisher.publish("push.all", "news").await;
    assert_eq!(next_message(&mut client).await.0, unacked);
    assert_eq!(next_message(&mut client).await.0, everyone);
    client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");

    // The same device resumes from its cursor: before the message it did not acknowledge. (What
    // a SUBSCRIBE releases comes before its RECEIPT.)
    let (mut client, _) = connect(&gateway, &headers).await;
    client.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/inbox"), ("ack", "client")], "").await;
    client.send_frame("SUBSCRIBE", &[("id", "all"), ("destination", "/topic/all"), ("receipt", "both")], "").await;
    let marker = publisher.publish("push.user.ines", "marker").await;
    let mut got: Vec<u64> = Vec::new();
    while got.len() < 3 {
        match client.next_event().await {
            StompEvent::Frame(frame) if frame.command == "MESSAGE" => {
                got.push(frame.header("message-id").parse().unwrap())
            }
            StompEvent::Frame(frame) if frame.command == "RECEIPT" => {}
            StompEvent::HeartBeat => {}
            other => panic!("expected MESSAGE, got {other:?}"),
        }
    }
    assert_eq!(got, [unacked, everyone, marker]);
}

#[tokio::test]
async fn send_to_app_echo_gets_the_reply_or_an_error() {
    let nats = TestNats::start().await;
    let echo = Function::rpc("echo", |request: RpcRequest| async move {
        let body = request.json::<serde_json::Value>()?;
        RpcReply::json(&serde_json::json!({"user": request.user, "body": body}))
    });
    let runtime = start(&nats, &test_config(&nats), vec![echo]).await;
    let gateway = TestGateway::start(&nats).await;
    let (mut client, _) = connect(&gateway, &[("passcode", &token("ivan"))]).await;
    subscribe(&mut client, "replies", "/user/queue/replies", &[("ack", "client")]).await;

    let headers = [("destination", "/app/echo"), ("reply-to", "/user/queue/replies"), ("correlation-id", "c-1")];
    client.send_frame("SEND", &headers, r#"{"hello":"world"}"#).await;
    let reply = client.expect("MESSAGE").await;
    assert_eq!((reply.header("subscription"), reply.header("correlation-id")), ("replies", "c-1"));
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body, serde_json::json!({"user": "ivan", "body": {"hello": "world"}}));
    // A page acknowledging every message of its subscription acknowledges the reply too: no error.
    assert_eq!(reply.header("ack"), reply.header("message-id"));
    client.send_frame("ACK", &[("id", reply.header("ack")), ("receipt", "acked")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "acked");

    // As stomp.js 2 sends a frame over 16 KiB: in 16 KiB WebSocket messages; and two frames in one.
    let long = serde_json::json!({"text": "x".repeat(40_000)}).to_string();
    let send = format!("SEND\ndestination:/app/echo\nreply-to:/user/queue/replies\ncorrelation-id:c-2\n\n{long}\0");
    for piece in send.as_bytes().chunks(16 * 1024) {
        client.send_raw(std::str::from_utf8(piece).unwrap()).await;
    }
    let reply = client.expect("MESSAGE").await;
    assert_eq!(reply.header("correlation-id"), "c-2");
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["body"]["text"].as_str().map(str::len), Some(40_000));
    let two = "SEND\ndestination:/app/echo\nreply-to:/user/queue/replies\ncorrelation-id:c-3\n\n3\0\n\
               SEND\ndestination:/app/echo\nreply-to:/user/queue/replies\ncorrelation-id:c-4\n\n4\0";
    client.send_raw(two).await;
    let replies = [client.expect("MESSAGE").await, client.expect("MESSAGE").await];
    let mut ids: Vec<&str> = replies.iter().map(|reply| reply.header("correlation-id")).collect();
    ids.sort();
    assert_eq!(ids, ["c-3", "c-4"]);

    // A failed call is answered on the reply-to subscription and the session goes on.
    let headers = [("destination", "/app/nobody"), ("reply-to", "/user/queue/replies"), ("correlation-id", "c-5")];
    client.send_frame("SEND", &headers, "{}").await;
    let failed = client.expect("MESSAGE").await;
    assert_eq!((failed.header("herald-error"), failed.header("correlation-id")), ("no_function", "c-5"));
    let body: serde_json::Value = serde_json::from_str(&failed.body).unwrap();
    assert_eq!(body["code"], "no_function", "{body}");
    client.send_frame("SEND", &[("destination", "/app/echo"), ("reply-to", "replies")], "6").await;
    let body: serde_json::Value = serde_json::from_str(&client.expect("MESSAGE").await.body).unwrap();
    assert_eq!(body, serde_json::json!({"user": "ivan", "body": 6}));
    runtime.shutdown().await;
}

#[tokio::test]
async fn heart_beats_keep_an_idle_connection_and_a_silent_client_is_closed() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |config| {
        config.heartbeat = Duration::from_millis(300);
        config.heartbeat_timeout = Duration::from_millis(300);
    })
    .await;

    let beats = [("passcode", token("jo")), ("heart-beat", "300,300".to_string())];
    let beats: Vec<(&str, &str)> = beats.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut client, connected) = connect(&gateway, &beats).await;
    assert_eq!(connected.header("heart-beat"), "300,300");
    subscribe(&mut client, "q", "/user/queue/q", &[]).await;
    // Answered beat for beat, the connection outlives many heartbeat periods.
    for _ in 0..10 {
        assert_eq!(client.next_event().await, StompEvent::HeartBeat);
        client.send_raw("\n").await;
    }
    let seq = publisher.publish("push.user.jo", "1").await;
    assert_eq!(next_message(&mut client).await, (seq, "1".to_string()));

    // A client that wants heart-beats but sends none is pinged too: its WebSocket pongs keep it.
    let wants_only = [("passcode", token("kai")), ("heart-beat", "0,300".to_string())];
    let wants_only: Vec<(&str, &str)> = wants_only.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut quiet, _) = connect(&gateway, &wants_only).await;
    subscribe(&mut quiet, "q", "/user/queue/q", &[]).await;
    for _ in 0..10 {
        assert_eq!(quiet.next_event().await, StompEvent::HeartBeat);
    }
    let seq = publisher.publish("push.user.kai", "2").await;
    assert_eq!(next_message(&mut quiet).await, (seq, "2".to_string()));

    // A client that asked for heart-beats and sends none is closed (1001) with an ERROR.
    let (mut silent, _) = connect(&gateway, &beats).await;
    let (error, close) = silent.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("no heartbeat", Some(1001)));
}

/// The Python of the venv scripts/test-browser builds (with stomp.py), if it was built; without it
/// the test is skipped with a notice, unless HERALD_REQUIRE_BROWSER=1.
fn venv_python() -> Option<std::path::PathBuf> {
    let python = herald_tests::workspace_root().join(".tools/browser-venv/bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import stomp, websocket"])
        .status()
        .is_ok_and(|status| status.success());
    if ready {
        return Some(python);
    }
    let why = "no venv with stomp.py in .tools/browser-venv (scripts/test-browser builds it)";
    assert!(std::env::var("HERALD_REQUIRE_BROWSER").as_deref() != Ok("1"), "HERALD_REQUIRE_BROWSER=1 but {why}");
    eprintln!("SKIPPED: {why}");
    None
}

#[tokio::test]
async fn stomp_py_receives_user_and_topic_messages_acks_and_calls_a_function() {
    use tokio::io::AsyncBufReadExt;
    let Some(python) = venv_python() else { return };
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let echo = Function::rpc("echo", |request: RpcRequest| async move {
        RpcReply::json(&serde_json::json!({"user": request.user, "device": request.device,
            "body": request.json::<serde_json::Value>()?}))
    });
    let runtime = start(&nats, &test_config(&nats), vec![echo]).await;
    let gateway = TestGateway::start(&nats).await;

    let script = herald_tests::workspace_root().join("tests/browser/stomp_py_client.py");
    let port = gateway.addr.port().to_string();
    let mut child = tokio::process::Command::new(python)
        .args([script.to_str().unwrap(), "127.0.0.1", &port, &token_with("kim", &["news"], 3600)])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let line = line.expect("stomp.py said nothing in time").unwrap().expect("stomp.py ended early");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    };
    assert_eq!(next().await["event"], "ready");

    let personal = publisher.publish_with("push.user.kim", &[("Herald-Type", "note")], r#"{"n":1}"#).await.0;
    let topic = publisher.publish("push.topic.news", r#"{"n":2}"#).await;
    let expected =
        [(personal, "inbox", "/user/queue/inbox", r#"{"n":1}"#), (topic, "news", "/topic/news", r#"{"n":2}"#)];
    for (seq, subscription, destination, body) in expected {
        let message = next().await;
        assert_eq!(message["event"], "message");
        let headers = &message["headers"];
        assert_eq!(headers["message-id"], seq.to_string());
        assert_eq!(
            (headers["subscription"].as_str(), headers["destination"].as_str()),
            (Some(subscription), Some(destination))
        );
        assert_eq!(message["body"], body);
        // The inbox is acknowledged by the client (`client-individual`): its frames carry `ack`.
        let ack = (subscription == "inbox").then(|| seq.to_string());
        assert_eq!(headers["ack"].as_str(), ack.as_deref());
    }
    let reply = next().await;
    assert_eq!((reply["event"].as_str(), reply["headers"]["correlation-id"].as_str()), (Some("reply"), Some("py-1")));
    let body: serde_json::Value = serde_json::from_str(reply["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"user": "kim", "device": "python", "body": {"from": "stomp.py"}}));
    assert_eq!(next().await["event"], "done");
    assert!(child.wait().await.unwrap().success());
    runtime.shutdown().await;
}

/// A resume that replays more than the gateway holds for a destination nobody subscribed to yet:
/// once the subscription comes, every message is there, in order (the dropped ones are read
/// again from the stream), and live ones follow.
#[tokio::test]
async fn a_long_resume_before_the_subscription_loses_nothing() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |c| c.stream.stream_max_msgs_per_subject = 5000).await;
    let base = publisher.publish("push.user.nobody", "x").await;
    let mut sent = Vec::new();
    for n in 0..3000 {
        sent.push(publisher.publish("push.user.leo", &n.to_string()).await);
    }
    let since = base.to_string();
    let (mut client, _) = connect(&gateway, &[("passcode", &token("leo")), ("herald-since", &since)]).await;
    // The whole replay ran before the client subscribes: 1,024 of its messages wait, the rest
    // were dropped.
    gateway.wait_metric("herald_gateway_replayed_messages_total", 3000.0).await;
    client.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/updates"), ("receipt", "r")], "").await;
    let mut received = Vec::new();
    while received.len() < sent.len() {
        match client.next_event().await {
            StompEvent::Frame(frame) if frame.command == "MESSAGE" => {
                received.push(frame.header("message-id").parse::<u64>().unwrap());
            }
            StompEvent::Frame(frame) if frame.command == "RECEIPT" => {}
            StompEvent::HeartBeat => {}
            other => panic!("after {} messages: {other:?}", received.len()),
        }
    }
    assert_eq!(received, sent);
    let live = publisher.publish("push.user.leo", "live").await;
    assert_eq!(next_message(&mut client).await, (live, "live".to_string()));
}

/// A STOMP resume from the device's cursor while KV does not answer (the cursors' bucket stops
/// answering direct reads): STOMP cannot tell a client that its resume may skip messages, as `/ws`
/// does with `complete:false`, so the gateway closes it before CONNECTED with 1013 (try again
/// later), as when the stream cannot be read, instead of starting at the stream's end. With KV back, the same resume replays from the
/// cursor.
#[tokio::test]
async fn a_resume_whose_cursor_cannot_be_read_is_refused_for_now() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let passcode = token("gus");
    let (client, _) = connect(&gateway, &[("passcode", &passcode)]).await;
    drop(client);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    let missed = publisher.publish("push.user.gus", "while away").await;

    cursor_direct_reads(&nats, false).await;
    let mut client = StompClient::connect(&url(&gateway), &[("passcode", &passcode)]).await;
    expect_refusal_for_now(&mut client).await;

    cursor_direct_reads(&nats, true).await;
    let (mut client, _) = connect(&gateway, &[("passcode", &passcode)]).await;
    subscribe(&mut client, "q", "/user/queue/updates", &[]).await;
    assert_eq!(client.expect("MESSAGE").await.header("message-id"), missed.to_string());
}

/// A connection refused before CONNECTED for now: an ERROR that says why and names the close
/// (as every close but a restart's is explained), then the close 1013.
async fn expect_refusal_for_now(client: &mut StompClient) {
    let error = client.expect("ERROR").await;
    assert_eq!(error.header("herald-close"), "1013", "{error:?}");
    assert!(error.header("message").starts_with("KV unavailable"), "{error:?}");
    match client.next_event().await {
        StompEvent::Close(close) => assert_eq!(close.map(|(code, _)| code), Some(1013)),
        other => panic!("expected the close 1013, got {other:?}"),
    }
}

/// The refusal above comes before the connection claims its device's place: under the default
/// `multi` policy a second connection of the same device replaces the first (4009), and one that is
/// refused must not take a working connection down on its way out.
#[tokio::test]
async fn a_resume_refused_for_an_unreadable_cursor_leaves_the_connection_it_would_replace() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let passcode = token("ivy");
    // A device named: connections naming none share theirs and never replace each other.
    let headers = [("passcode", passcode.as_str()), ("herald-device", "tablet")];
    let (mut working, _) = connect(&gateway, &headers).await;
    subscribe(&mut working, "q", "/user/queue/updates", &[]).await;

    cursor_direct_reads(&nats, false).await;
    let mut refused = StompClient::connect(&url(&gateway), &headers).await;
    expect_refusal_for_now(&mut refused).await;

    let live = publisher.publish("push.user.ivy", "still here").await;
    assert_eq!(next_message(&mut working).await, (live, "still here".to_string()));
}

/// Turns the cursors bucket's direct reads off or on again: while off, the gateway's reads of
/// cursors (direct gets, on its cached handle of the bucket) go unanswered, as while KV fails over.
async fn cursor_direct_reads(nats: &TestNats, on: bool) {
    let js = nats.jetstream().await;
    let mut cursors = js.get_stream("KV_herald-cursors").await.unwrap().info().await.unwrap().config.clone();
    cursors.allow_direct = on;
    js.update_stream(&cursors).await.unwrap();
}

/// Two tabs of an app moved unchanged from Spring (no `herald-device`): both stay and both get the
/// user's messages. Two connections naming one device still replace each other (4009).
#[tokio::test]
async fn connections_naming_no_device_coexist_and_two_naming_one_replace_each_other() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let passcode = token("tabs");
    let (mut one, _) = connect(&gateway, &[("passcode", &passcode)]).await;
    subscribe(&mut one, "q", "/user/queue/updates", &[]).await;
    let (mut two, _) = connect(&gateway, &[("passcode", &passcode)]).await;
    subscribe(&mut two, "q", "/user/queue/updates", &[]).await;
    // Twice: a replacement (4009) that came after the first message would show before the second.
    for text in ["to both", "still both"] {
        let seq = publisher.publish("push.user.tabs", text).await;
        assert_eq!(next_message(&mut one).await, (seq, text.to_string()));
        assert_eq!(next_message(&mut two).await, (seq, text.to_string()));
    }

    let laptop = [("passcode", passcode.as_str()), ("herald-device", "laptop")];
    let (mut first, _) = connect(&gateway, &laptop).await;
    let (_second, _) = connect(&gateway, &laptop).await;
    let (error, close) = first.expect_error_and_close().await;
    assert_eq!((error.header("herald-close"), close), ("4009", Some(4009)));
}
