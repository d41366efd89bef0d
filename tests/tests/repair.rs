//! Exact delivery when the path is briefly too slow: a socket that overflows its queue resumes
//! losslessly, a gateway slower than its feed drops nothing, and a loss between the stream and the
//! gateway that cannot be repaired in order is reported to the client's resume.

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use herald_shared::frame::{ServerFrame, close_code};
use herald_tests::gateway::token;
use herald_tests::ws::{Event, FRAME_TIMEOUT};
use herald_tests::{Publisher, TestGateway, TestNats};

#[tokio::test]
async fn a_slow_socket_closed_with_4008_resumes_with_since_and_misses_nothing() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.outbound_queue_bytes = 64 * 1024;
        c.write_stall_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let mut slow = gateway.connect("ray").await;

    // At most 200 × 256 KiB: more than the socket buffers hold here (4 MiB to send, 32 MiB to
    // receive at most), under the stream's 1,000 messages per subject so that all stay stored, and
    // a resume the test's debug-built gateway replays in a few seconds.
    let body = format!("\"{}\"", "x".repeat(256 * 1024));
    let published = gateway.publish_until_slow_consumer_close(&publisher, "push.user.ray", &body, 200).await;

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
async fn a_gateway_slower_than_its_feed_makes_nats_wait_and_drops_nothing() {
    let nats = TestNats::start().await;
    // One message buffered between the delivery feed and the dispatcher: the feed stops reading
    // from NATS while it is full, instead of dropping what comes next.
    let gateway = TestGateway::start_with(&nats, |c| c.nats.nats_subscription_capacity = 1).await;
    let publisher = Publisher::new(&nats).await;
    let mut clients = Vec::new();
    for user in ["s0", "s1", "s2"] {
        clients.push((user, gateway.connect(user).await));
    }

    // A burst for each user and for everyone, pipelined so that it arrives faster than it is read.
    let mut acks = Vec::new();
    for n in 0..600 {
        let subject = if n % 5 == 0 { "push.all".to_string() } else { format!("push.user.s{}", n % 3) };
        acks.push((subject.clone(), publisher.send(&subject, &[], &n.to_string()).await));
    }
    let mut expected: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    for (subject, ack) in acks {
        let seq = ack.await.unwrap().sequence;
        for user in ["s0", "s1", "s2"] {
            if subject == "push.all" || subject == format!("push.user.{user}") {
                expected.entry(user).or_default().push(seq);
            }
        }
    }
    for (user, client) in &mut clients {
        let want = &expected[*user];
        assert_eq!(&client.expect_msgs(want.len()).await, want, "{user}");
    }
    // Nothing was lost on the way, so nothing needed repairing.
    assert_eq!(gateway.metric("herald_gateway_delivery_gaps_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_repairs_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_connections").await, 3.0);
}

#[tokio::test]
async fn a_gap_behind_newer_messages_is_repaired_when_the_stream_holds_nothing_older_that_was_missed() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect("gap").await;
    let first = publisher.publish("push.user.gap", "1").await;
    let second = publisher.publish("push.all", "2").await;
    assert_eq!(client.expect_msgs(2).await, vec![first, second]);

    // What the gateway sees when the user's next message names a predecessor it never got while
    // push.all went on (here its previous is push.all's `second`, so nothing of the user's is
    // missing): the gateway asks the stream's leader, finds no message of the user's between
    // `first` and `second`, and repairs instead of closing the connection (a loss reported for
    // nothing would have the client reload its state for nothing).
    forge_delivery(&nats, "herald.deliver.user.gap", second + 1, second).await;
    assert_eq!(client.expect_msg().await.seq, second + 1);
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_repairs_total").await, 1.0);
    assert_eq!(gateway.metric("herald_gateway_connections").await, 1.0);
}

/// A message stored but never delivered to the gateway (a stream leader that failed between
/// storing and republishing it; here, the stream stops republishing for one message) behind a
/// newer `push.all` message the client already has: it cannot be sent in order. The gateway notes
/// the loss in KV and closes with 4008; the resume reports `complete:false`. KV refuses the note when
/// the gateway first tries to write it, as it may in the failure that caused the loss (here the
/// bucket's stream takes other subjects for a while, which the gateway's health check does not
/// undo, as it would recreate a deleted bucket): the gateway keeps trying, and closes once the
/// note is written.
#[tokio::test]
async fn an_unrepairable_gap_is_noted_even_when_kv_is_down_at_first_and_the_resume_reports_it() {
    unrepairable_gap_noted(WhileNoting::Stays).await;
}

/// The same, but the client leaves while the gateway waits for KV: the note is still written, and
/// the client's next resume reports the loss.
#[tokio::test]
async fn an_unrepairable_gap_is_noted_even_when_the_client_leaves_while_kv_is_down() {
    unrepairable_gap_noted(WhileNoting::Leaves).await;
}

/// The same, but the client comes back on another gateway before the note is written: its resume
/// cannot report the loss yet. Once the note is written, every gateway closes the device's other
/// sockets with 4008, and the resume after that reports it.
#[tokio::test]
async fn a_client_that_resumed_before_its_loss_was_noted_is_closed_once_it_is_and_told_by_its_next_resume() {
    unrepairable_gap_noted(WhileNoting::ResumesElsewhere).await;
}

/// A client of `user` that got a `push.all` message newer than one of its own that was stored
/// but never republished (so never delivered, with nothing after it on its subject yet).
struct MissedBehind {
    nats: TestNats,
    gateway: TestGateway,
    publisher: Publisher,
    client: herald_tests::ws::WsClient,
    admin: jetstream::Context,
    missed: u64,
    newer: u64,
}

async fn missed_behind(user: &str) -> MissedBehind {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect(user).await;
    let subject = format!("push.user.{user}");
    let first = publisher.publish(&subject, "1").await;
    assert_eq!(client.expect_msg().await.seq, first);

    let admin = nats.jetstream().await;
    let missed = stored_unpublished(&admin, &publisher, &subject, "2").await;
    let newer = publisher.publish("push.all", "3").await;
    assert_eq!(client.expect_msg().await.seq, newer);
    MissedBehind { nats, gateway, publisher, client, admin, missed, newer }
}

/// Delivers a forged message `seq` on the republish subject `subject`, naming `last` as its
/// subject's predecessor, as the stream's republish would.
async fn forge_delivery(nats: &TestNats, subject: &'static str, seq: u64, last: u64) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Sequence", seq.to_string().as_str());
    headers.insert("Nats-Last-Sequence", last.to_string().as_str());
    headers.insert("Nats-Time-Stamp", "2026-01-01T00:00:00Z");
    let admin = nats.client().await;
    admin.publish_with_headers(subject, headers, "3".into()).await.unwrap();
    admin.flush().await.unwrap();
}

/// Publishes `payload` to `subject` while the stream does not republish: stored, never delivered.
async fn stored_unpublished(admin: &jetstream::Context, publisher: &Publisher, subject: &str, payload: &str) -> u64 {
    stored_unpublished_times(admin, publisher, subject, payload, 1).await
}

/// The same `times` times; returns the last one's seq.
async fn stored_unpublished_times(
    admin: &jetstream::Context,
    publisher: &Publisher,
    subject: &str,
    payload: &str,
    times: usize,
) -> u64 {
    let mut stream = admin.get_stream("HERALD").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    admin.update_stream(jetstream::stream::Config { republish: None, ..config.clone() }).await.unwrap();
    let mut seq = 0;
    for _ in 0..times {
        seq = publisher.publish(subject, payload).await;
    }
    admin.update_stream(config).await.unwrap();
    seq
}

/// A user's first message after the join, stored but never delivered (here the stream does not
/// republish it; in a cluster, bounds read from a server with a stale view miss it the same way):
/// the user's route is new, so nothing was routed on the subject to compare with, but the next
/// message's predecessor is past what the join replayed. The gateway repairs: both arrive, in
/// order.
#[tokio::test]
async fn a_message_missed_right_after_the_join_is_repaired_when_the_next_one_names_it() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    publisher.publish("push.all", "before").await;
    let mut client = gateway.connect("fresh").await;
    let Some(ServerFrame::Welcome { seq: joined_at, .. }) = client.welcome else { panic!("no welcome") };
    let admin = nats.jetstream().await;
    let missed = stored_unpublished(&admin, &publisher, "push.user.fresh", "1").await;
    let next = publisher.publish("push.user.fresh", "2").await;
    assert_eq!((missed, next), (joined_at + 1, joined_at + 2));
    assert_eq!(client.expect_msgs(2).await, vec![missed, next], "nothing skipped in silence");
    assert_eq!(gateway.metric("herald_gateway_repairs_total").await, 1.0);
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0);
}

/// The same for a topic joined with the connection, which the client then subscribes to again
/// without `since` (many clients re-send their subscriptions): the `sub` promises it nothing
/// older, but the join still owes it everything after what it replayed.
#[tokio::test]
async fn a_topic_message_missed_right_after_the_join_is_repaired_though_the_topic_is_subscribed_again() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    publisher.publish("push.all", "before").await;
    let token = herald_tests::gateway::token_with("reader", &["news"], 600);
    let mut client = gateway.connect_with(&format!("token={token}&topics=news")).await;
    let Some(ServerFrame::Welcome { seq: joined_at, .. }) = client.welcome else { panic!("no welcome") };
    client.send_json(serde_json::json!({"type": "sub", "topic": "news"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    let admin = nats.jetstream().await;
    let missed = stored_unpublished(&admin, &publisher, "push.topic.news", "1").await;
    let next = publisher.publish("push.topic.news", "2").await;
    assert_eq!((missed, next), (joined_at + 1, joined_at + 2));
    assert_eq!(client.expect_msgs(2).await, vec![missed, next], "nothing skipped in silence");
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0);
}

/// What the client does while the gateway tries to note its loss.
enum WhileNoting {
    Stays,
    Leaves,
    /// Leaves and resumes on another gateway before the note is written.
    ResumesElsewhere,
}

async fn unrepairable_gap_noted(client: WhileNoting) {
    let MissedBehind { nats, gateway, publisher, client: mut socket, admin, missed, newer } =
        missed_behind("lost").await;

    let cursors = admin.get_stream("KV_herald-cursors").await.unwrap().info().await.unwrap().config.clone();
    let mut notes = nats.client().await.subscribe("$KV.herald-cursors.>").await.unwrap();
    let elsewhere = jetstream::stream::Config { subjects: vec!["herald-test.elsewhere.>".into()], ..cursors.clone() };
    admin.update_stream(elsewhere).await.unwrap();
    let last = publisher.publish("push.user.lost", "4").await;
    let attempt = tokio::time::timeout(FRAME_TIMEOUT, async {
        while let Some(note) = notes.next().await {
            if note.subject.ends_with(".lost") {
                return note;
            }
        }
        panic!("the subscription ended");
    });
    let attempt = attempt.await.expect("the gateway tries to note the loss");
    assert_eq!(String::from_utf8_lossy(&attempt.payload), missed.to_string());
    let resume = format!("token={}&since={newer}", token("lost"));
    match client {
        WhileNoting::Stays => {
            admin.update_stream(cursors).await.unwrap();
            assert_eq!(socket.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
        }
        WhileNoting::Leaves => {
            drop(socket);
            admin.update_stream(cursors).await.unwrap();
            let bucket = admin.get_key_value("herald-cursors").await.unwrap();
            let key = attempt.subject.strip_prefix("$KV.herald-cursors.").unwrap().to_string();
            herald_tests::eventually("the note written", std::time::Duration::from_secs(30), || async {
                bucket.get(&key).await.ok().flatten().map(|_| ())
            })
            .await;
        }
        WhileNoting::ResumesElsewhere => {
            drop(socket);
            let other = TestGateway::start(&nats).await;
            let mut early = other.connect_with(&resume).await;
            assert_eq!(early.expect_msg().await.seq, last);
            assert!(early.expect_replayed().await.3, "no note yet: the replay reports itself complete");
            admin.update_stream(cursors).await.unwrap();
            let close = early.expect_close().await;
            assert_eq!(close.map(|c| c.0), Some(close_code::SLOW_CONSUMER), "told once the note is written");
        }
    }
    let mut resumed = gateway.connect_with(&resume).await;
    assert_eq!(resumed.expect_msg().await.seq, last);
    assert!(!resumed.expect_replayed().await.3, "the resume reports the loss");
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 1.0);
}

/// A device whose earlier loss is still noted, not reported to any resume yet, loses another,
/// newer message: the note keeps the older one, which tells every resume the newer one would and
/// more (a resume from between the two must report the older loss).
#[tokio::test]
async fn a_newer_loss_keeps_the_older_note_no_resume_reported_yet() {
    let MissedBehind { nats: _nats, gateway, publisher, mut client, admin, missed, newer } =
        missed_behind("again").await;
    let cursors = admin.get_key_value("herald-cursors").await.unwrap();
    let older = missed - 1;
    let revision = cursors.put("again.default.lost", older.to_string().into()).await.unwrap();
    publisher.publish("push.user.again", "4").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
    let note = cursors.entry("again.default.lost").await.unwrap().expect("the note");
    assert_eq!(String::from_utf8_lossy(&note.value), older.to_string(), "not raised to {missed}");
    // Written again: a resume that reported it and removes it by the revision it read leaves it.
    assert!(note.revision > revision);
    let mut resumed = gateway.connect_with(&format!("token={}&since={newer}", token("again"))).await;
    resumed.expect_msg().await;
    assert!(!resumed.expect_replayed().await.3);
}

/// A resume that ends before its `replayed` frame is written (the client stops reading during a
/// long replay, then leaves) has not told the client of its loss: the note stays, the next resume
/// reports it, and once that report is written the note goes.
#[tokio::test]
async fn a_loss_stays_noted_until_a_resume_has_written_its_report() {
    // `_nats` keeps the server running.
    let MissedBehind { nats: _nats, gateway, publisher, mut client, admin, missed, newer } =
        missed_behind("twice").await;
    let last = publisher.publish("push.user.twice", "4").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
    // More than the sockets' buffers hold, for the replay to stall on.
    let body = format!("\"{}\"", "x".repeat(256 * 1024));
    let mut expected = vec![last];
    for _ in 0..40 {
        expected.push(publisher.publish("push.all", &body).await);
    }

    let resume = format!("token={}&since={newer}", token("twice"));
    let mut stalled = herald_tests::ws::WsClient::connect_with_receive_buffer(&gateway.ws_url(&resume), 4096).await;
    stalled.expect_welcome().await;
    drop(stalled);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    let mut resumed = gateway.connect_with(&resume).await;
    assert_eq!(resumed.expect_msgs(expected.len()).await, expected);
    assert!(!resumed.expect_replayed().await.3, "the resume reports the loss of {missed}");
    let cursors = admin.get_key_value("herald-cursors").await.unwrap();
    herald_tests::eventually("the reported note removed", std::time::Duration::from_secs(30), || async {
        matches!(cursors.get("twice.default.lost").await, Ok(None)).then_some(())
    })
    .await;
}

/// A message stored but never delivered, with nothing after it on its subject yet, behind a newer
/// one already sent; then NATS restarts, so the delivery feed reconnects and every session catches
/// up from what it sent, which cannot find the message. When the subject's next message shows the
/// gap, it is still reported: the catch-up covered only what it read.
#[tokio::test]
async fn a_message_missed_before_nats_restarts_is_still_reported_after_the_catch_up() {
    let MissedBehind { nats, gateway, mut client, missed, newer, .. } = missed_behind("kim").await;
    nats.stop().await;
    nats.start_again().await;
    gateway.wait_ready().await;
    herald_tests::eventually("the catch-up after the feed reconnected", FRAME_TIMEOUT, || async {
        (gateway.metric("herald_gateway_repairs_total").await >= 1.0).then_some(())
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let last = publisher.publish("push.user.kim", "4").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER), "not {last} in silence");
    let mut resumed = gateway.connect_with(&format!("token={}&since={newer}", token("kim"))).await;
    assert_eq!(resumed.expect_msg().await.seq, last);
    let replayed = resumed.expect_replayed().await;
    assert!(!replayed.3, "the resume reports the loss of {missed}");
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 1.0);
}

/// A message stored but never delivered, behind a newer one already sent, whose loss shows (its
/// subject's next message names it) while the gateway catches up from the stream for another
/// reason and its client has stopped reading: live delivery waits behind the catch-up, so the
/// connection never reads what shows the loss, and the client leaves. The connection's end looks
/// through what it left unread: the loss is noted, and the client's resume reports it instead of
/// skipping the message in silence.
#[tokio::test]
async fn a_loss_shown_behind_a_catch_up_is_noted_when_the_client_leaves_before_reading_it() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.write_stall_timeout = std::time::Duration::from_secs(300)).await;
    let publisher = Publisher::new(&nats).await;
    let url = gateway.ws_url(&format!("token={}", token("held")));
    let mut client = herald_tests::ws::WsClient::connect_with_receive_buffer(&url, 4096).await;
    client.expect_welcome().await;
    let first = publisher.publish("push.user.held", "1").await;
    assert_eq!(client.expect_msg().await.seq, first);
    let admin = nats.jetstream().await;
    let missed = stored_unpublished(&admin, &publisher, "push.user.held", "2").await;
    let newer = publisher.publish("push.all", "3").await;
    assert_eq!(client.expect_msg().await.seq, newer);

    // The client reads no more. Broadcasts stored but not delivered, more than the sockets'
    // buffers hold, then one delivered that names them: a gap above what was sent, so the gateway
    // catches up from the stream, and stalls writing to the client.
    let body = format!("\"{}\"", "x".repeat(256 * 1024));
    let burst = 40;
    let burst_end = stored_unpublished_times(&admin, &publisher, "push.all", &body, burst).await;
    let shows_gap = publisher.publish("push.all", "4").await;
    gateway.wait_metric("herald_gateway_repairs_total", 1.0).await;
    // The user's next message names `missed`, behind `newer`: it waits behind the catch-up.
    let shows_loss = publisher.publish("push.user.held", "5").await;
    gateway.wait_metric("herald_gateway_delivery_gaps_total", 2.0).await;
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0, "not looked at yet");
    drop(client);

    let cursors = admin.get_key_value("herald-cursors").await.expect("the cursors bucket");
    let note = herald_tests::eventually("the loss noted", std::time::Duration::from_secs(30), || async {
        cursors.get("held.default.lost").await.ok().flatten()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&note), missed.to_string());
    let mut resumed = gateway.connect_with(&format!("token={}&since={newer}", token("held"))).await;
    let mut expected: Vec<u64> = (burst_end + 1 - burst as u64..=burst_end).collect();
    expected.extend([shows_gap, shows_loss]);
    assert_eq!(resumed.expect_msgs(expected.len()).await, expected);
    assert!(!resumed.expect_replayed().await.3, "the resume reports the loss of {missed}");
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 1.0);
}

/// STOMP has no way to say a resume misses something: a STOMP resume past a noted loss replays
/// from the lost message instead (again what the client had from there, `message-id` telling
/// which), and the note is gone after it.
#[tokio::test]
async fn a_stomp_resume_past_a_noted_loss_replays_from_the_lost_message() {
    let MissedBehind { nats: _nats, gateway, publisher, mut client, admin, missed, newer } = missed_behind("stl").await;
    let last = publisher.publish("push.user.stl", "4").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
    let cursors = admin.get_key_value("herald-cursors").await.unwrap();
    let noted = herald_tests::eventually("the loss noted", std::time::Duration::from_secs(30), || async {
        cursors.get("stl.default.lost").await.ok().flatten()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&noted), missed.to_string());

    let url = format!("ws://{}/stomp", gateway.addr);
    let since = newer.to_string();
    let headers = [("passcode", token("stl")), ("herald-since", since), ("herald-device", "default".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let mut stomp = herald_tests::stomp::StompClient::connect(&url, &headers).await;
    stomp.expect("CONNECTED").await;
    let mut received = Vec::new();
    for (id, destination) in [("q", "/user/queue/updates"), ("a", "/topic/all")] {
        stomp.send_frame("SUBSCRIBE", &[("id", id), ("destination", destination)], "").await;
    }
    while received.len() < 3 {
        let message = stomp.expect("MESSAGE").await;
        received.push(message.header("message-id").parse::<u64>().unwrap());
    }
    received.sort();
    assert_eq!(received, [missed, newer, last], "the lost message and what followed it");
    herald_tests::eventually("the note removed", std::time::Duration::from_secs(30), || async {
        matches!(cursors.get("stl.default.lost").await, Ok(None)).then_some(())
    })
    .await;
}

/// A STOMP client holds nothing until it subscribes: a resume past a noted loss that ends after
/// CONNECTED but before any SUBSCRIBE never delivered the lost message, so the note stays and the
/// next resume replays from it.
#[tokio::test]
async fn a_stomp_resume_that_ends_before_subscribing_keeps_the_note() {
    let MissedBehind { nats: _nats, gateway, publisher, mut client, admin, missed, newer } = missed_behind("stk").await;
    let last = publisher.publish("push.user.stk", "4").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
    let cursors = admin.get_key_value("herald-cursors").await.unwrap();
    herald_tests::eventually("the loss noted", std::time::Duration::from_secs(30), || async {
        cursors.get("stk.default.lost").await.ok().flatten()
    })
    .await;

    let url = format!("ws://{}/stomp", gateway.addr);
    let since = newer.to_string();
    let headers = [("passcode", token("stk")), ("herald-since", since), ("herald-device", "default".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let replayed = gateway.metric("herald_gateway_replayed_messages_total").await;
    let mut stomp = herald_tests::stomp::StompClient::connect(&url, &headers).await;
    stomp.expect("CONNECTED").await;
    // The replay from the lost message ended (held: nothing subscribes), then the client leaves.
    gateway.wait_metric("herald_gateway_replayed_messages_total", replayed + 3.0).await;
    drop(stomp);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    let mut stomp = herald_tests::stomp::StompClient::connect(&url, &headers).await;
    stomp.expect("CONNECTED").await;
    for (id, destination) in [("q", "/user/queue/updates"), ("a", "/topic/all")] {
        stomp.send_frame("SUBSCRIBE", &[("id", id), ("destination", destination)], "").await;
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        received.push(stomp.expect("MESSAGE").await.header("message-id").parse::<u64>().unwrap());
    }
    received.sort();
    assert_eq!(received, [missed, newer, last], "the lost message and what followed it, again");
}

/// A loss check whose question the stream leaves unanswered (as while it elects a leader) when the
/// gateway stops: it would outwait the shutdown grace and be dropped with its loss unnoted, so it
/// assumes the loss halfway through the grace and the note is written before the gateway stops.
#[tokio::test]
async fn a_loss_check_still_unanswered_at_shutdown_notes_the_loss_within_the_grace() {
    let nats = TestNats::start().await;
    let filter = herald_tests::nats_filter::NatsFilter::start(&nats, "$JS.API.STREAM.MSG.GET.HERALD").await;
    let gateway = TestGateway::start_on(&filter.url(), |_| {}).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect("cut").await;
    let first = publisher.publish("push.user.cut", "1").await;
    assert_eq!(client.expect_msg().await.seq, first);
    let admin = nats.jetstream().await;
    let missed = stored_unpublished(&admin, &publisher, "push.user.cut", "2").await;
    let newer = publisher.publish("push.all", "3").await;
    assert_eq!(client.expect_msg().await.seq, newer);

    // The user's next message names `missed` as its predecessor, behind `newer` already sent: the
    // gateway asks the stream's leader whether a message of the user's is stored there.
    filter.drop_publishes();
    publisher.publish("push.user.cut", "4").await;
    filter.wait_dropped(1).await;
    drop(client);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    gateway.shutdown().await;

    let cursors = admin.get_key_value("herald-cursors").await.unwrap();
    let note = cursors.get("cut.default.lost").await.unwrap();
    assert_eq!(note.map(|note| String::from_utf8_lossy(&note).into_owned()), Some(missed.to_string()));
}

/// The same question answered during the drain: a stopping gateway still asks the stream (its
/// delivery connection stays up until the drain is over), so a check the leader answers "nothing of
/// the user's is missing" before the cut notes nothing, instead of reporting a loss for nothing.
#[tokio::test]
async fn a_loss_check_answered_while_the_gateway_stops_notes_nothing() {
    let nats = TestNats::start().await;
    let filter = herald_tests::nats_filter::NatsFilter::start(&nats, "$JS.API.STREAM.MSG.GET.HERALD").await;
    // Long enough for the check to ask again (after its first question times out) before the cut.
    let grace = |config: &mut herald_gateway::Config| config.shutdown_grace = std::time::Duration::from_secs(30);
    let gateway = TestGateway::start_on(&filter.url(), grace).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect("calm").await;
    let first = publisher.publish("push.user.calm", "1").await;
    let second = publisher.publish("push.all", "2").await;
    assert_eq!(client.expect_msgs(2).await, vec![first, second]);

    // The user's next message names push.all's `second` as its predecessor, as in the first test
    // here: nothing of the user's is missing, which only the stream's leader can tell.
    filter.drop_publishes();
    forge_delivery(&nats, "herald.deliver.user.calm", second + 1, second).await;
    filter.wait_dropped(1).await;
    drop(client);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    gateway.begin_shutdown();
    filter.pass_publishes();
    gateway.shutdown().await;

    let cursors = nats.jetstream().await.get_key_value("herald-cursors").await.unwrap();
    assert_eq!(cursors.get("calm.default.lost").await.unwrap(), None, "no loss noted");
}
