//! The personal inbox: a device's first connection gets the user's unread messages, `welcome` says
//! how many are unread, reading on one device moves the read position for every device (the other
//! sockets are told, on any gateway), and the HTTP API reads and pages the inbox.

use std::time::Duration;

use bytes::Bytes;
use herald_gateway::NewDeviceReplay;
use herald_shared::frame::ServerFrame;
use herald_tests::gateway::token;
use herald_tests::ws::Event;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient, eventually};
use serde_json::{Value, json};

const KEY: &str = "inbox-api-key";

fn with_api(config: &mut herald_gateway::Config) {
    config.api_listen = Some("127.0.0.1:0".parse().unwrap());
    config.api_keys = vec![KEY.into()];
    config.api_nats_user = Some(herald_tests::nats::Role::Publisher.user().into());
    config.api_nats_password = Some(herald_tests::nats::Role::Publisher.password());
}

async fn api(gateway: &TestGateway, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, gateway.api_url(path)).bearer_auth(KEY);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("the API answers");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn get(gateway: &TestGateway, path: &str) -> (u16, Value) {
    api(gateway, reqwest::Method::GET, path, None).await
}

/// `(read, unread)` of a `welcome`.
fn inbox_of(welcome: &Option<ServerFrame>) -> (u64, u64) {
    match welcome {
        Some(ServerFrame::Welcome { read, unread, .. }) => (*read, *unread),
        other => panic!("no welcome: {other:?}"),
    }
}

async fn connect_device(gateway: &TestGateway, user: &str, device: &str) -> WsClient {
    gateway.connect_with(&format!("token={}&device={device}", token(user))).await
}

#[tokio::test]
async fn a_user_who_never_connected_gets_what_was_sent_meanwhile_on_the_first_connect() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    publisher.publish("push.all", "not for the inbox").await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(publisher.publish("push.user.nova", &n.to_string()).await);
    }
    publisher.publish("push.user.someone-else", "not hers").await;

    // No since, no cursor: the user's unread personal messages, then `replayed`, then live.
    let mut client = gateway.connect("nova").await;
    assert_eq!(inbox_of(&client.welcome), (0, 5));
    assert_eq!(client.expect_msgs(5).await, sent);
    let (from, to, count, complete, _) = client.expect_replayed().await;
    assert_eq!((from, to, count, complete), (1, sent[4], 5, true));
    let live = publisher.publish("push.user.nova", "live").await;
    assert_eq!(client.expect_msg().await.seq, live);
}

/// A first connection that ends before its client acknowledged the unread messages leaves them
/// for the device's next connection, `since` or not: its cursor starts below the first of them.
#[tokio::test]
async fn unread_messages_a_first_connection_did_not_acknowledge_come_again() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut sent = Vec::new();
    for n in 0..4 {
        sent.push(publisher.publish("push.user.otto", &n.to_string()).await);
    }
    let mut first = connect_device(&gateway, "otto", "phone").await;
    assert_eq!(first.expect_msgs(4).await, sent);
    first.expect_replayed().await;
    first.send_json(json!({"type": "ack", "seq": sent[1]})).await;
    drop(first);
    let everyone = publisher.publish("push.all", "after the first connection").await;

    // No `since`: from the cursor, the acknowledged message.
    eventually("the ack written", Duration::from_secs(10), || async {
        let mut again = connect_device(&gateway, "otto", "phone").await;
        let seqs: Vec<u64> = again.expect_msgs(3).await;
        (seqs == [sent[2], sent[3], everyone]).then_some(())
    })
    .await;
}

/// After its unread replay, a first connection's client may acknowledge up to the `welcome`'s seq:
/// a `push.all` stored between the user's last personal message and the device's first connection
/// was never owed to it, and the device's cursor passes it (it was held at the last message sent).
#[tokio::test]
async fn acknowledging_the_welcome_after_the_unread_replay_passes_the_broadcasts_before_it() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let personal = publisher.publish("push.user.pia", "unread").await;
    let everyone = publisher.publish("push.all", "before the first connection").await;
    let mut first = connect_device(&gateway, "pia", "phone").await;
    let Some(ServerFrame::Welcome { seq: welcome, .. }) = first.welcome.clone() else { panic!("no welcome") };
    assert_eq!(welcome, everyone);
    assert_eq!(first.expect_msgs(1).await, [personal]);
    first.expect_replayed().await;
    first.send_json(json!({"type": "ack", "seq": welcome})).await;
    drop(first);
    let later = publisher.publish("push.user.pia", "later").await;

    // No `since`: from the cursor, which is the welcome's seq.
    eventually("the ack written", Duration::from_secs(10), || async {
        let mut again = connect_device(&gateway, "pia", "phone").await;
        let seqs: Vec<u64> = again.expect_msgs(1).await;
        (seqs == [later]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn reading_on_one_device_leaves_a_new_device_only_the_unread_and_tells_the_others_on_every_gateway() {
    let nats = TestNats::start().await;
    let gateway_a = TestGateway::start(&nats).await;
    let gateway_b = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(publisher.publish("push.user.orla", &n.to_string()).await);
    }
    let mut phone = connect_device(&gateway_a, "orla", "phone").await;
    assert_eq!(phone.expect_msgs(5).await, sent);
    phone.expect_replayed().await;
    let mut laptop = connect_device(&gateway_b, "orla", "laptop").await;
    assert_eq!(laptop.expect_msgs(5).await, sent);
    laptop.expect_replayed().await;

    // The phone reads the first three: the laptop, on the other gateway, is told.
    phone.send_json(json!({"type": "read", "seq": sent[2]})).await;
    assert_eq!(laptop.next_frame().await, ServerFrame::Read { seq: sent[2], unread: 2 });
    assert_eq!(phone.next_frame().await, ServerFrame::Read { seq: sent[2], unread: 2 });

    // A brand-new tablet gets only what is still unread.
    let mut tablet = connect_device(&gateway_b, "orla", "tablet").await;
    assert_eq!(inbox_of(&tablet.welcome), (sent[2], 2));
    assert_eq!(tablet.expect_msgs(2).await, sent[3..]);
    let (from, _, count, complete, _) = tablet.expect_replayed().await;
    assert_eq!((from, count, complete), (sent[2] + 1, 2, true));

    // A read position never moves back, and reading implies an ack (the phone resumes from it).
    phone.send_json(json!({"type": "read", "seq": sent[0]})).await;
    phone.send_json(json!({"type": "read", "seq": sent[4]})).await;
    assert_eq!(laptop.next_frame().await, ServerFrame::Read { seq: sent[4], unread: 0 });
    drop(phone);
    gateway_a.wait_metric("herald_gateway_connections", 0.0).await;
    let phone = connect_device(&gateway_a, "orla", "phone").await;
    assert_eq!(inbox_of(&phone.welcome), (sent[4], 0));
}

#[tokio::test]
async fn muted_kinds_are_neither_replayed_nor_counted() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let prefs = nats.jetstream().await.get_key_value("herald-prefs").await.unwrap();
    prefs.put("pax", Bytes::from_static(br#"{"muted":["ads"]}"#)).await.unwrap();
    let publisher = Publisher::new(&nats).await;
    let mut mails = Vec::new();
    for n in 0..4 {
        let kind = if n % 2 == 0 { "ads" } else { "mail" };
        let (seq, _) = publisher.publish_with("push.user.pax", &[("Herald-Type", kind)], "x").await;
        if kind == "mail" {
            mails.push(seq);
        }
    }
    let mut client = gateway.connect("pax").await;
    assert_eq!(inbox_of(&client.welcome), (0, 2));
    assert_eq!(client.expect_msgs(2).await, mails);
    assert_eq!(client.expect_replayed().await.2, 2);
}

#[tokio::test]
async fn with_new_device_replay_none_a_first_connection_starts_live() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.new_device_replay = NewDeviceReplay::None).await;
    let publisher = Publisher::new(&nats).await;
    publisher.publish("push.user.quin", "while away").await;
    let mut client = gateway.connect("quin").await;
    assert_eq!(inbox_of(&client.welcome), (0, 1), "still counted as unread");
    let live = publisher.publish("push.user.quin", "live").await;
    match client.next_event().await {
        Event::Frame(ServerFrame::Msg(msg)) => assert_eq!(msg.seq, live),
        other => panic!("expected the live message first, got {other:?}"),
    }
}

#[tokio::test]
async fn the_http_inbox_counts_pages_and_marks_read() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, with_api).await;
    let publisher = Publisher::new(&nats).await;
    // More than the stream keeps per subject (1,000): the first 1,500 are trimmed.
    let mut acks = Vec::new();
    for n in 0..2500 {
        acks.push(publisher.send("push.user.page", &[], &n.to_string()).await);
    }
    let mut sent = Vec::new();
    for ack in acks {
        sent.push(ack.await.unwrap().sequence);
    }
    let kept = &sent[1500..];

    let (status, body) = get(&gateway, "/v1/inbox/page").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"user": "page", "read": 0, "unread": 1000, "last": sent[2499]}));

    let mut after = 0;
    let mut paged = Vec::new();
    let mut completes = Vec::new();
    loop {
        let (status, body) = get(&gateway, &format!("/v1/inbox/page/messages?after={after}&limit=400")).await;
        assert_eq!(status, 200, "{body}");
        let messages = body["messages"].as_array().unwrap();
        if messages.is_empty() {
            assert_eq!(body["next"].as_u64(), Some(after));
            break;
        }
        assert_eq!(messages[0]["type"], "msg");
        paged.extend(messages.iter().map(|m| m["seq"].as_u64().unwrap()));
        completes.push(body["complete"].as_bool().unwrap());
        after = body["next"].as_u64().unwrap();
    }
    assert_eq!(paged, kept);
    // From the start, trimmed messages may be missing: said so; after that, nothing is.
    assert_eq!(completes, [false, true, true]);

    let (status, body) =
        api(&gateway, reqwest::Method::POST, "/v1/inbox/page/read", Some(json!({"seq": kept[899]}))).await;
    assert_eq!((status, body), (200, json!({"user": "page", "read": kept[899], "unread": 100})));
    // Never back.
    let (_, body) = api(&gateway, reqwest::Method::POST, "/v1/inbox/page/read", Some(json!({"seq": 1}))).await;
    assert_eq!(body["read"].as_u64(), Some(kept[899]));
    // Nor past the last message: what comes later is unread.
    let past = json!({"seq": u64::MAX});
    let (_, body) = api(&gateway, reqwest::Method::POST, "/v1/inbox/page/read", Some(past)).await;
    assert_eq!(body, json!({"user": "page", "read": sent[2499], "unread": 0}));
    let later = publisher.publish("push.user.page", "later").await;
    let (_, body) = get(&gateway, "/v1/inbox/page").await;
    assert_eq!(body, json!({"user": "page", "read": sent[2499], "unread": 1, "last": later}));
    let (status, body) = get(&gateway, &format!("/v1/inbox/page/messages?after={}", u64::MAX)).await;
    assert_eq!((status, body["messages"].clone(), body["next"].as_u64()), (200, json!([]), Some(u64::MAX)));
    let (_, body) = get(&gateway, "/v1/inbox/nobody-yet").await;
    assert_eq!(body, json!({"user": "nobody-yet", "read": 0, "unread": 0, "last": 0}));

    for (path, body) in [
        ("/v1/inbox/a.b", None),
        ("/v1/inbox/page/messages?after=x", None),
        ("/v1/inbox/page/messages?limit=0", None),
        ("/v1/inbox/page/messages?limit=5000", None),
        ("/v1/inbox/page/messages?sort=desc", None),
        ("/v1/inbox/page/read", Some(json!({"seq": "x"}))),
    ] {
        let method = if body.is_some() { reqwest::Method::POST } else { reqwest::Method::GET };
        let (status, answer) = api(&gateway, method, path, body).await;
        assert_eq!((status, answer["error"].as_str()), (400, Some("bad_request")), "{path}: {answer}");
    }
    let response = reqwest::get(gateway.api_url("/v1/inbox/page")).await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn a_publish_retried_after_a_503_is_stored_once() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, with_api).await;
    nats.stop().await;
    // NATS is away: the answer is a 503 naming the id the message got.
    let message = json!({"to": {"user": "ray"}, "data": "once"});
    let (status, body) = api(&gateway, reqwest::Method::POST, "/v1/publish", Some(message.clone())).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    let id = body["id"].as_str().expect("the 503 names the message's id").to_string();
    assert!(body["reason"].as_str().unwrap().contains("same id"), "{body}");

    nats.start_again().await;
    gateway.wait_ready().await;
    // The retry with that id: stored once, whether or not the first attempt reached the stream.
    let retry = json!({"to": {"user": "ray"}, "data": "once", "id": id});
    let (status, body) = eventually("the publish goes through", Duration::from_secs(30), || async {
        let (status, body) = api(&gateway, reqwest::Method::POST, "/v1/publish", Some(retry.clone())).await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!((status, body["id"].as_str()), (200, Some(id.as_str())));
    let (_, again) = api(&gateway, reqwest::Method::POST, "/v1/publish", Some(retry.clone())).await;
    assert_eq!((again["seq"].as_u64(), again["duplicate"].as_bool()), (body["seq"].as_u64(), Some(true)));
    let (_, inbox) = get(&gateway, "/v1/inbox/ray").await;
    assert_eq!(inbox["unread"].as_u64(), Some(1), "stored once: {inbox}");
}

/// A stream made again on purpose, as docs/operations.md says to: its buckets of cursors and read
/// positions removed too. A device coming back starts as a new one and gets the new stream's
/// messages; the unread count counts them (the old positions, kept, would have hidden them).
#[tokio::test]
async fn a_stream_made_again_with_its_positions_removed_hides_nothing_from_returning_devices() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, with_api).await;
    let publisher = Publisher::new(&nats).await;
    let mut phone = connect_device(&gateway, "lazarus", "phone").await;
    let mut old = Vec::new();
    for n in 0..5 {
        old.push(publisher.publish("push.user.lazarus", &format!("old {n}")).await);
    }
    assert_eq!(phone.expect_msgs(5).await, old);
    phone.send_json(json!({"type": "read", "seq": old[4]})).await;
    eventually("the phone's cursor and the read position stored", Duration::from_secs(30), || async {
        let (_, body) = get(&gateway, "/v1/users/lazarus").await;
        let devices = json!([{"device": "phone", "cursor": old[4]}]);
        (body["devices"] == devices && body["read"] == old[4]).then_some(())
    })
    .await;
    drop(phone);

    let js = nats.jetstream().await;
    js.delete_stream("HERALD").await.unwrap();
    js.delete_key_value("herald-cursors").await.unwrap();
    js.delete_key_value("herald-reads").await.unwrap();
    gateway.wait_metric("herald_gateway_streams_replaced_total", 1.0).await;
    eventually("the buckets made again", Duration::from_secs(30), || async {
        let ready = reqwest::get(gateway.http_url("/readyz")).await.ok()?.status().is_success();
        (ready && js.get_key_value("herald-reads").await.is_ok() && js.get_key_value("herald-cursors").await.is_ok())
            .then_some(())
    })
    .await;
    let new = vec![
        publisher.publish("push.user.lazarus", "new 0").await,
        publisher.publish("push.user.lazarus", "new 1").await,
    ];
    assert_eq!(new, [1, 2], "the stream's sequences started over");
    let (_, inbox) = get(&gateway, "/v1/inbox/lazarus").await;
    assert_eq!((&inbox["read"], &inbox["unread"]), (&json!(0), &json!(2)), "{inbox}");

    let mut phone = connect_device(&gateway, "lazarus", "phone").await;
    assert_eq!(inbox_of(&phone.welcome), (0, 2));
    assert_eq!(phone.expect_msgs(2).await, new);
}

/// Whether trimmed messages are reported is decided by the stream's own per-subject limit, not by
/// the gateway's setting: another gateway or an operator may have lowered it. A resume past what
/// it trimmed says so, on the socket and in the HTTP inbox.
#[tokio::test]
async fn messages_trimmed_by_a_limit_lowered_under_the_gateway_are_reported() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, with_api).await;
    let admin = nats.jetstream().await;
    let mut config = admin.get_stream("HERALD").await.unwrap().cached_info().config.clone();
    assert_eq!(config.max_messages_per_subject, 1000, "the gateway's setting");
    config.max_messages_per_subject = 3;
    admin.update_stream(config).await.unwrap();
    let publisher = Publisher::new(&nats).await;
    let base = publisher.publish("push.user.nobody", "x").await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(publisher.publish("push.user.trim", &n.to_string()).await);
    }

    let mut client = gateway.connect_with(&format!("token={}&since={base}", token("trim"))).await;
    assert_eq!(client.expect_msgs(3).await, sent[2..].to_vec());
    assert_eq!(client.expect_replayed().await, (base + 1, sent[4], 3, false, None));
    let (status, body) = get(&gateway, &format!("/v1/inbox/trim/messages?after={base}")).await;
    assert_eq!(status, 200, "{body}");
    let seqs: Vec<u64> = body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!((seqs, &body["complete"]), (sent[2..].to_vec(), &json!(false)));
}

/// A `read` sent while NATS is away is kept until KV takes it: once NATS is back the read position
/// holds it and the user's sockets get their `read` frame (it was dropped after one failed write).
#[tokio::test]
async fn a_read_sent_while_nats_is_away_is_written_once_it_is_back() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut sent = Vec::new();
    for n in 0..3 {
        sent.push(publisher.publish("push.user.rhea", &n.to_string()).await);
    }
    let mut phone = connect_device(&gateway, "rhea", "phone").await;
    assert_eq!(phone.expect_msgs(3).await, sent);
    phone.expect_replayed().await;

    nats.stop().await;
    phone.send_json(json!({"type": "read", "seq": sent[1]})).await;
    eventually("a flush of the read failed", Duration::from_secs(60), || async {
        (gateway.metric("herald_gateway_read_flush_failures_total").await >= 1.0).then_some(())
    })
    .await;
    nats.start_again().await;

    assert_eq!(phone.next_frame().await, ServerFrame::Read { seq: sent[1], unread: 1 });
    let reads = nats.jetstream().await.get_key_value("herald-reads").await.expect("the reads bucket");
    let read = reads.get("rhea").await.unwrap().expect("the read position");
    assert_eq!(String::from_utf8_lossy(&read), sent[1].to_string());
}
