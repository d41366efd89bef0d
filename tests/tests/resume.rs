//! Exact delivery: the offline inbox, resume with `since` and from device cursors, retention
//! reported honestly, publisher retries delivered once.

use herald_gateway::ReplayMethod;
use herald_shared::frame::ServerFrame;
use herald_tests::gateway::token;
use herald_tests::kv::connect_while_a_read_goes_unanswered;
use herald_tests::{Publisher, TestGateway, TestNats, eventually};

#[tokio::test]
async fn an_offline_user_gets_everything_in_order_exactly_once_from_since_and_from_its_device_cursor() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let query = |device: &str, since: Option<u64>| {
        let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
        format!("token={}&device={device}{since}", token("ada"))
    };

    let phone = gateway.connect_with(&query("phone", None)).await;
    let start = phone.welcome_seq();
    drop(phone);

    // 100 messages for ada while she is away, mixed with others' and with broadcasts.
    let mut expected = Vec::new();
    let mut personal = Vec::new();
    for n in 0..100 {
        publisher.publish("push.user.someone-else", "not for ada").await;
        let subject = if n % 10 == 0 { "push.all" } else { "push.user.ada" };
        expected.push(publisher.publish(subject, &format!("{{\"n\":{n}}}")).await);
        if n % 10 != 0 {
            personal.push(*expected.last().unwrap());
        }
    }

    let mut phone = gateway.connect_with(&query("phone", Some(start))).await;
    assert_eq!(phone.expect_msgs(100).await, expected);
    assert_eq!(phone.expect_replayed().await, (start + 1, expected[99], 100, true, None));
    // Live delivery follows the replay.
    let live = publisher.publish("push.user.ada", "live").await;
    assert_eq!(phone.expect_msg().await.seq, live);

    // The phone acknowledges up to the 60th message and goes away: its cursor is stored.
    phone.send_json(serde_json::json!({"type": "ack", "seq": expected[59]})).await;
    // A lower ack never moves the cursor back.
    phone.send_json(serde_json::json!({"type": "ack", "seq": expected[10]})).await;
    phone.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(phone.next_frame().await, ServerFrame::Pong);
    drop(phone);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    // Without since, the phone resumes from its cursor.
    let mut phone = gateway.connect_with(&query("phone", None)).await;
    let mut after_cursor = expected[60..].to_vec();
    after_cursor.push(live);
    assert_eq!(phone.expect_msgs(after_cursor.len()).await, after_cursor);
    let (from, to, count, complete, _) = phone.expect_replayed().await;
    assert_eq!((from, to, count as usize, complete), (expected[59] + 1, live, after_cursor.len(), true));

    // A second device has its own cursor: none yet, so it gets what ada has not read (her personal
    // messages, not the broadcasts from before it existed), then goes live.
    let mut laptop = gateway.connect_with(&query("laptop", None)).await;
    personal.push(live);
    assert_eq!(laptop.expect_msgs(personal.len()).await, personal);
    assert_eq!(laptop.expect_replayed().await.2 as usize, personal.len());
    let next = publisher.publish("push.user.ada", "both devices").await;
    assert_eq!(laptop.expect_msg().await.seq, next);
    assert_eq!(phone.expect_msg().await.seq, next);
    laptop.send_json(serde_json::json!({"type": "ack", "seq": next})).await;
    laptop.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(laptop.next_frame().await, ServerFrame::Pong);
    drop(laptop);
    drop(phone);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    let later = publisher.publish("push.user.ada", "later").await;
    let mut laptop = gateway.connect_with(&query("laptop", None)).await;
    assert_eq!(laptop.expect_msgs(1).await, vec![later]);
    assert_eq!(laptop.expect_replayed().await.2, 1);
    // The phone's cursor is where the phone left it (it acknowledged nothing after expected[59]).
    let mut phone = gateway.connect_with(&query("phone", None)).await;
    let (from, ..) = {
        let msgs = phone.expect_msgs(after_cursor.len() + 2).await;
        assert_eq!(msgs.last(), Some(&later));
        phone.expect_replayed().await
    };
    assert_eq!(from, expected[59] + 1);
}

#[tokio::test]
async fn resuming_with_nothing_missed_sends_an_empty_replayed_and_no_duplicates() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.bea", "one").await;
    let mut client = gateway.connect_with(&format!("token={}&since={seq}", token("bea"))).await;
    assert_eq!(client.expect_replayed().await, (seq + 1, seq, 0, true, None));
    let next = publisher.publish("push.user.bea", "two").await;
    assert_eq!(client.expect_msg().await.seq, next);
}

#[tokio::test]
async fn trimmed_messages_are_reported_with_complete_false() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.stream.stream_max_msgs_per_subject = 10).await;
    let publisher = Publisher::new(&nats).await;
    let base = publisher.publish("push.user.nobody", "x").await;

    let mut trimmed = Vec::new();
    for n in 0..15 {
        trimmed.push(publisher.publish("push.user.cleo", &n.to_string()).await);
    }
    let mut kept = Vec::new();
    for n in 0..5 {
        kept.push(publisher.publish("push.user.dan", &n.to_string()).await);
    }

    // cleo's inbox holds 10: the first 5 are gone, and the replay says so.
    let mut cleo = gateway.connect_with(&format!("token={}&since={base}", token("cleo"))).await;
    assert_eq!(cleo.expect_msgs(10).await, trimmed[5..].to_vec());
    assert_eq!(cleo.expect_replayed().await, (base + 1, trimmed[14], 10, false, None));
    // dan's 5 are all there.
    let mut dan = gateway.connect_with(&format!("token={}&since={base}", token("dan"))).await;
    assert_eq!(dan.expect_msgs(5).await, kept);
    assert_eq!(dan.expect_replayed().await, (base + 1, kept[4], 5, true, None));
    assert_eq!(gateway.metric("herald_gateway_replays_incomplete_total").await, 1.0);
}

/// A gateway whose stream keeps 40 messages per subject, with small socket buffers both ways (the
/// client's by [`connect_with_small_buffer`]): a replay waits after a few messages.
async fn gateway_with_small_buffers(nats: &TestNats, adjust: impl FnOnce(&mut herald_gateway::Config)) -> TestGateway {
    TestGateway::start_with(nats, |c| {
        c.stream.stream_max_msgs_per_subject = 40;
        c.socket_send_buffer = 16 * 1024;
        adjust(c);
    })
    .await
}

/// Connects with `query` and a small receive buffer, and reads the `welcome`.
async fn connect_with_small_buffer(gateway: &TestGateway, query: &str) -> herald_tests::WsClient {
    let mut client = herald_tests::WsClient::connect_with_receive_buffer(&gateway.ws_url(query), 16 * 1024).await;
    client.expect_welcome().await;
    client
}

/// `count` messages of 128 KiB to `user` (5 MiB for 40: far more than a replay's read-ahead and the
/// small buffers hold), after one to another user: that one's seq (a `since` before them) and theirs.
async fn publish_large(publisher: &Publisher, user: &str, count: usize) -> (u64, Vec<u64>) {
    let base = publisher.publish("push.user.nobody", "x").await;
    let large = format!("\"{}\"", "x".repeat(128 * 1024));
    let mut stored = Vec::new();
    for _ in 0..count {
        stored.push(publisher.publish(&format!("push.user.{user}"), &large).await);
    }
    (base, stored)
}

/// Messages published during a replay count towards the per-subject limit too: here they trim
/// messages the replay has not read yet (it waits on a client that stopped reading), and the
/// replay, which read fewer than the limit, must still say it may have missed some.
/// (Direct gets only: a consumer replay pulls in batches of hundreds of messages, so here it has
/// all 40 before the newer ones come.)
#[tokio::test]
async fn messages_trimmed_while_a_replay_waits_are_reported_with_complete_false() {
    let nats = TestNats::start().await;
    let gateway = gateway_with_small_buffers(&nats, |c| c.replay_method = ReplayMethod::Direct).await;
    let publisher = Publisher::new(&nats).await;
    let (base, stored) = publish_large(&publisher, "fay", 40).await;

    let mut fay = connect_with_small_buffer(&gateway, &format!("token={}&since={base}", token("fay"))).await;
    // The replay has begun (its bounds end at the 40th); the client stops reading.
    assert_eq!(fay.expect_msg().await.seq, stored[0]);
    let mut newer = Vec::new();
    for n in 0..35 {
        newer.push(publisher.publish("push.user.fay", &n.to_string()).await);
    }
    let mut received = vec![stored[0]];
    let complete = loop {
        match fay.next_frame().await {
            ServerFrame::Msg(msg) => received.push(msg.seq),
            ServerFrame::Replayed { complete, .. } => break complete,
            other => panic!("unexpected {other:?}"),
        }
    };
    received.extend(fay.expect_msgs(newer.len()).await);
    // The premise: the newer messages trimmed some the replay had not read.
    let missed: Vec<u64> = stored.iter().chain(&newer).filter(|seq| !received.contains(seq)).copied().collect();
    assert!(!missed.is_empty() && received.is_sorted(), "received {received:?}");
    assert!(!complete, "the replay missed {missed:?} and said it was complete");
}

/// A connection that ends while its replay sends messages that follow some the per-subject limit
/// removed, before its `replayed` frame said so, leaves the loss noted for the device: its client
/// resumes from the last `seq` it got, past the removed ones, and that resume says `complete:false`
/// (it said `complete:true`, and the loss went unreported).
#[tokio::test]
async fn a_replay_cut_short_past_trimmed_messages_leaves_the_loss_for_the_next_resume() {
    let nats = TestNats::start().await;
    let gateway = gateway_with_small_buffers(&nats, |_| {}).await;
    let publisher = Publisher::new(&nats).await;
    let (base, stored) = publish_large(&publisher, "gil", 50).await;

    // The limit kept the last 40: the first message replayed follows 10 removed ones. The client
    // leaves after it, long before the replay's 5 MiB and its `replayed` frame could be written.
    let query = format!("token={}&device=phone&since={base}", token("gil"));
    let mut gil = connect_with_small_buffer(&gateway, &query).await;
    let first = gil.expect_msg().await.seq;
    assert_eq!(first, stored[10]);
    drop(gil);
    let cursors = nats.jetstream().await.get_key_value("herald-cursors").await.unwrap();
    let note = eventually("the loss noted", std::time::Duration::from_secs(30), || async {
        cursors.get("gil.phone.lost").await.ok().flatten()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&note), (base + 1).to_string());

    let mut gil = gateway.connect_with(&format!("token={}&device=phone&since={first}", token("gil"))).await;
    assert_eq!(gil.expect_msgs(39).await, stored[11..]);
    assert_eq!(gil.expect_replayed().await, (first + 1, stored[49], 39, false, None));
}

#[tokio::test]
async fn aged_out_messages_are_reported_with_complete_false() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.stream.stream_max_age = std::time::Duration::from_secs(1)).await;
    let publisher = Publisher::new(&nats).await;
    let old = publisher.publish("push.user.eve", "old").await;
    let admin = nats.jetstream().await;
    // Wait until the stream dropped it (max age), then publish a fresh one.
    herald_tests::eventually("the old message aged out", std::time::Duration::from_secs(30), || async {
        let info = admin.get_stream("HERALD").await.ok()?.cached_info().state.clone();
        (info.first_sequence > old).then_some(())
    })
    .await;
    let fresh = publisher.publish("push.user.eve", "fresh").await;
    let mut eve = gateway.connect_with(&format!("token={}&since={}", token("eve"), old - 1)).await;
    assert_eq!(eve.expect_msgs(1).await, vec![fresh]);
    assert_eq!(eve.expect_replayed().await, (old, fresh, 1, false, None));
}

#[tokio::test]
async fn a_retried_publish_with_the_same_msg_id_is_delivered_once() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect("fay").await;

    let (first, duplicate) = publisher.publish_with("push.user.fay", &[("Nats-Msg-Id", "order-42")], "shipped").await;
    assert!(!duplicate);
    let (again, duplicate) = publisher.publish_with("push.user.fay", &[("Nats-Msg-Id", "order-42")], "shipped").await;
    assert!(duplicate);
    assert_eq!(again, first);
    let marker = publisher.publish("push.user.fay", "marker").await;

    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.id.as_str()), (first, "order-42"));
    assert_eq!(client.expect_msg().await.seq, marker);
}

#[tokio::test]
async fn a_new_device_that_drops_before_its_first_message_still_gets_what_it_missed() {
    let nats = TestNats::start().await;
    // New devices start live (no unread replay), so only the cursor can bring back what was missed.
    let live_start = |c: &mut herald_gateway::Config| c.new_device_replay = herald_gateway::NewDeviceReplay::None;
    let first_gateway = TestGateway::start_with(&nats, live_start).await;
    let publisher = Publisher::new(&nats).await;
    let query = format!("token={}&device=watch", token("gil"));
    let first = first_gateway.connect_with(&query).await;
    let start = first.welcome_seq();
    // The gateway dies with the socket: nothing is written at a close, only what was before.
    first_gateway.kill().await;
    drop(first);

    let missed = publisher.publish("push.user.gil", "while away").await;
    // No since, no ack ever: the cursor set before the first welcome is the resume point.
    let gateway = TestGateway::start_with(&nats, live_start).await;
    let mut again = gateway.connect_with(&query).await;
    assert_eq!(again.expect_msgs(1).await, vec![missed]);
    assert_eq!(again.expect_replayed().await, (start + 1, missed, 1, true, None));
}

#[tokio::test]
async fn a_since_beyond_the_stream_replays_nothing_reports_incomplete_and_goes_live() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.eve", "one").await;
    let query = format!("token={}&since={}", herald_tests::gateway::token_with("eve", &["news"], 3600), u64::MAX);
    let mut client = gateway.connect_with(&query).await;
    // Ahead of the stream (a replaced stream, or a bogus value): nothing to replay, and the client
    // is told its history does not match the stream's.
    assert_eq!(client.expect_replayed().await, (seq + 1, seq, 0, false, None));
    let next = publisher.publish("push.user.eve", "two").await;
    assert_eq!(client.expect_msg().await.seq, next);

    client.send_json(serde_json::json!({"type": "sub", "topic": "news", "since": u64::MAX})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    assert_eq!(client.expect_replayed().await, (next + 1, next, 0, false, Some("news".into())));
}

#[tokio::test]
async fn a_cursor_written_elsewhere_meanwhile_is_never_moved_back() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut phone = gateway.connect_with(&format!("token={}&device=phone", token("ada"))).await;
    let mut seqs = Vec::new();
    for n in 0..4 {
        seqs.push(publisher.publish("push.user.ada", &n.to_string()).await);
    }
    assert_eq!(phone.expect_msgs(4).await, seqs);
    let cursors = nats.jetstream().await.get_key_value("herald-cursors").await.unwrap();
    let stored = async || cursors.get("ada.phone").await.unwrap().and_then(|v| String::from_utf8(v.to_vec()).ok());

    // The gateway writes the cursor and remembers which revision it wrote.
    phone.send_json(serde_json::json!({"type": "ack", "seq": seqs[1]})).await;
    eventually("the cursor at the ack", herald_tests::functions::WAIT, async || {
        (stored().await == Some(seqs[1].to_string())).then_some(())
    })
    .await;
    // Another writer (the device's next session, on another gateway) moves it on meanwhile.
    cursors.put("ada.phone", seqs[3].to_string().into()).await.unwrap();
    // The gateway's next write, at the latest when the connection closes, must not take it back.
    phone.send_json(serde_json::json!({"type": "ack", "seq": seqs[2]})).await;
    phone.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(phone.next_frame().await, ServerFrame::Pong);
    drop(phone);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    assert_eq!(stored().await, Some(seqs[3].to_string()));
}

/// A cursor not written for `cursors_max_age` is gone, so that device ids clients make up do not pile
/// up: the device is a new one again (its unread personal messages). A device that connects past half
/// the max age has its cursor written again, though it had nothing to acknowledge.
#[tokio::test]
async fn a_cursor_expires_unless_its_device_connects_and_a_device_back_after_it_is_new() {
    use std::time::{Duration, SystemTime};
    // Long enough that the reconnect past half of it resumes from the cursor on a slow machine.
    let max_age = Duration::from_secs(20);
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.stream.cursors_max_age = max_age).await;
    let publisher = Publisher::new(&nats).await;
    let js = nats.jetstream().await;
    let mut bucket = js.get_stream("KV_herald-cursors").await.unwrap();
    assert_eq!(bucket.info().await.unwrap().config.max_age, max_age);
    let cursors = js.get_key_value("herald-cursors").await.unwrap();
    let entry = async || {
        cursors.entry("kai.tablet").await.unwrap().filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
    };

    let unread = publisher.publish("push.user.kai", "unread").await;
    let query = format!("token={}&device=tablet", token("kai"));
    let mut first = gateway.connect_with(&query).await;
    assert_eq!(first.expect_msgs(1).await, vec![unread]);
    first.expect_replayed().await;
    first.send_json(serde_json::json!({"type": "ack", "seq": unread})).await;
    let written = eventually("the cursor at the ack", herald_tests::functions::WAIT, async || {
        entry().await.filter(|e| e.value.as_ref() == unread.to_string().as_bytes())
    })
    .await;
    drop(first);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    // Past half the max age, a connection that resumes from the cursor writes it again as it is.
    eventually("half the max age passed", max_age, async || {
        let age = SystemTime::now().duration_since(SystemTime::from(written.created)).unwrap_or_default();
        (age > max_age / 2 + Duration::from_millis(500)).then_some(())
    })
    .await;
    let mut again = gateway.connect_with(&query).await;
    assert_eq!(again.expect_replayed().await, (unread + 1, unread, 0, true, None), "from the cursor");
    let rewritten = eventually("the cursor written again", herald_tests::functions::WAIT, async || {
        entry().await.filter(|entry| entry.revision > written.revision)
    })
    .await;
    assert_eq!(rewritten.value, written.value);
    drop(again);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    // Not written for the max age: gone, and the device's next connection is a new device's.
    eventually("the cursor expired", max_age * 2, async || entry().await.is_none().then_some(())).await;
    let mut new = gateway.connect_with(&query).await;
    assert_eq!(new.expect_msgs(1).await, vec![unread], "the unread message again");
    assert_eq!(new.expect_replayed().await, (1, unread, 1, true, None));
}

#[tokio::test]
async fn cursors_over_the_write_rate_are_written_in_turn_so_none_is_left_behind() {
    let nats = TestNats::start().await;
    // Five cursor writes a second and a flush every 100 ms: one cursor a flush, for three devices
    // that all keep acknowledging.
    let gateway = TestGateway::start_with(&nats, |config| {
        config.cursor_flush_interval = std::time::Duration::from_millis(100);
        config.cursor_write_rate = 5;
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let mut devices = Vec::new();
    for device in ["d0", "d1", "d2"] {
        devices.push(gateway.connect_with(&format!("token={}&device={device}", token("ria"))).await);
    }
    let cursors = nats.jetstream().await.get_key_value("herald-cursors").await.unwrap();
    let first = publisher.publish("push.user.ria", "0").await;
    let mut seq = first;
    // Every device keeps acknowledging each new message until all three cursors are stored.
    let deadline = tokio::time::Instant::now() + herald_tests::functions::WAIT;
    loop {
        for device in &mut devices {
            assert_eq!(device.expect_msgs(1).await, [seq]);
            device.send_json(serde_json::json!({"type": "ack", "seq": seq})).await;
        }
        let mut stored = Vec::new();
        for key in ["ria.d0", "ria.d1", "ria.d2"] {
            let value = cursors.get(key).await.unwrap();
            stored.push(value.and_then(|value| std::str::from_utf8(&value).ok()?.parse::<u64>().ok()));
        }
        if stored.iter().all(|cursor| cursor.is_some_and(|cursor| cursor >= first)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a device's cursor was never written: {stored:?}");
        seq = publisher.publish("push.user.ria", "next").await;
    }
}

/// A replay the stream fails for a moment (here its direct gets are switched off, as when no
/// server answers them while the stream elects a leader) is opened again where it stopped, within
/// a few seconds: the resume completes on the same connection, exactly.
#[tokio::test]
async fn a_replay_the_stream_fails_for_a_moment_is_opened_again_and_completes() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut published = Vec::new();
    for payload in ["one", "two", "three"] {
        published.push(publisher.publish("push.user.rita", payload).await);
    }
    let admin = nats.jetstream().await;
    let config = admin.get_stream("HERALD").await.unwrap().info().await.unwrap().config.clone();
    let no_direct = async_nats::jetstream::stream::Config { allow_direct: false, ..config.clone() };
    admin.update_stream(no_direct).await.unwrap();
    let mut client = gateway.connect_with(&format!("token={}&since=0", token("rita"))).await;
    eventually("the replay failed", std::time::Duration::from_secs(4), || async {
        (gateway.metric("herald_gateway_replays_reopened_total").await >= 1.0).then_some(())
    })
    .await;
    admin.update_stream(config).await.unwrap();
    assert_eq!(client.expect_msgs(3).await, published);
    assert_eq!(client.expect_replayed().await, (1, published[2], 3, true, None));
}

/// The same, failing in the middle: a replay held back by a client that reads slowly, whose next
/// read fails, is opened again after the last message it read. Here a topic's block (a `sub` with
/// `since`), which sends what it reads whatever the connection sent before: every message arrives
/// once, in order, and the block is complete.
#[tokio::test]
async fn a_replay_failing_midway_is_opened_again_after_the_last_message_it_read() {
    const MESSAGES: usize = 900;
    let nats = TestNats::start().await;
    // Small batches: the replay reads ahead little of what the client has not taken.
    let gateway = TestGateway::start_with(&nats, |config| {
        config.outbound_queue_bytes = 64 * 1024;
        config.replay_batch = 8;
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let payload = "x".repeat(1000);
    let mut acks = Vec::new();
    for _ in 0..MESSAGES {
        acks.push(publisher.send("push.topic.news", &[], &payload).await);
    }
    let mut published = Vec::new();
    for ack in acks {
        published.push(ack.await.expect("published").sequence);
    }
    // The socket's small buffer and queue hold a few dozen messages: the block waits on the
    // client long before its end.
    let token = herald_tests::gateway::token_with("mia", &["news"], 600);
    let mut client =
        herald_tests::WsClient::connect_with_receive_buffer(&gateway.ws_url(&format!("token={token}")), 4096).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Welcome { .. }));
    client.send_json(serde_json::json!({"type": "sub", "topic": "news", "since": 0})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    let first = client.expect_msgs(1).await;

    let admin = nats.jetstream().await;
    let config = admin.get_stream("HERALD").await.unwrap().info().await.unwrap().config.clone();
    let no_direct = async_nats::jetstream::stream::Config { allow_direct: false, ..config.clone() };
    admin.update_stream(no_direct).await.unwrap();
    let switch_back = async {
        eventually("the replay failed", std::time::Duration::from_secs(60), || async {
            (gateway.metric("herald_gateway_replays_reopened_total").await >= 1.0).then_some(())
        })
        .await;
        admin.update_stream(config).await.unwrap();
    };
    let (_, rest) = tokio::join!(switch_back, client.expect_msgs(MESSAGES - 1));
    assert_eq!([first, rest].concat(), published, "each once, in order");
    let block = (1, published[MESSAGES - 1], MESSAGES as u64, true, Some("news".to_string()));
    assert_eq!(client.expect_replayed().await, block);
}

/// KV that does not answer a resume from the device's cursor (here the cursors' bucket stops
/// answering direct reads, which the gateway uses for cursors): the gateway gives it the stream's
/// patience, then cannot tell where the device stopped. Instead of going live in silence, skipping
/// what the device missed, it resumes from the stream's end and reports the replay incomplete, so
/// the client reloads its state. With KV back, the same resume replays from the cursor.
#[tokio::test]
async fn a_resume_whose_cursor_cannot_be_read_reports_itself_incomplete() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let query = format!("token={}&device=phone", token("kim"));
    let phone = gateway.connect_with(&query).await;
    drop(phone);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    let missed = publisher.publish("push.user.kim", "while away").await;

    let js = nats.jetstream().await;
    let mut cursors = js.get_stream("KV_herald-cursors").await.unwrap().info().await.unwrap().config.clone();
    assert!(cursors.allow_direct, "the gateway reads cursors with direct gets");
    cursors.allow_direct = false;
    js.update_stream(&cursors).await.unwrap();

    let mut phone = gateway.connect_with(&query).await;
    assert_eq!(phone.expect_replayed().await, (missed + 1, missed, 0, false, None));
    let live = publisher.publish("push.user.kim", "live").await;
    assert_eq!(phone.expect_msg().await.seq, live);
    drop(phone);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    cursors.allow_direct = true;
    js.update_stream(&cursors).await.unwrap();
    let mut phone = gateway.connect_with(&query).await;
    assert_eq!(phone.expect_msgs(2).await, [missed, live]);
    assert_eq!(phone.expect_replayed().await, (missed, live, 2, true, None), "from the cursor, nothing missed");
}

/// KV that fails the first read of a device's cursor, as it may for a moment while it fails over:
/// the gateway reads it again, and the device resumes from its cursor as usual.
#[tokio::test]
async fn a_cursor_kv_fails_to_read_for_a_moment_is_read_again() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let query = format!("token={}&device=phone", token("kim"));
    drop(gateway.connect_with(&query).await);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    let missed = publisher.publish("push.user.kim", "while away").await;

    let mut phone = connect_while_a_read_goes_unanswered(&nats, "herald-cursors", gateway.ws_url(&query)).await;
    phone.expect_welcome().await;
    assert_eq!(phone.expect_msg().await.seq, missed);
    assert_eq!(phone.expect_replayed().await, (missed, missed, 1, true, None));
}

/// The same for the read position a new device starts from: read again, the device gets only what
/// its user has not read, and `welcome` counts that.
#[tokio::test]
async fn a_read_position_kv_fails_to_read_for_a_moment_is_read_again() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut seqs = Vec::new();
    for n in 0..3 {
        seqs.push(publisher.publish("push.user.kim", &n.to_string()).await);
    }
    let reads = nats.jetstream().await.get_key_value("herald-reads").await.unwrap();
    reads.put("kim", seqs[1].to_string().into()).await.unwrap();
    // Another user's first connection has the gateway open its handle on the bucket now, while the
    // bucket allows direct reads: one opened after it stopped would read otherwise, unseen here.
    let _warm_up = gateway.connect("warm-up").await;

    let url = gateway.ws_url(&format!("token={}&device=laptop", token("kim")));
    let mut laptop = connect_while_a_read_goes_unanswered(&nats, "herald-reads", url).await;
    laptop.expect_welcome().await;
    let Some(ServerFrame::Welcome { read, unread, .. }) = &laptop.welcome else { unreachable!() };
    assert_eq!((*read, *unread), (seqs[1], 1));
    assert_eq!(laptop.expect_msg().await.seq, seqs[2]);
    assert_eq!(laptop.expect_replayed().await, (seqs[1] + 1, seqs[2], 1, true, None));
}
