//! Session policies across two gateways, and muted kinds.

use async_nats::jetstream::kv;
use bytes::Bytes;
use herald_gateway::SessionPolicy;
use herald_shared::frame::close_code;
use herald_tests::gateway::token;
use herald_tests::kv::connect_while_a_read_goes_unanswered;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient, eventually};

async fn two_gateways(nats: &TestNats, policy: SessionPolicy) -> (TestGateway, TestGateway) {
    let a = TestGateway::start_with(nats, |c| c.session_policy = policy).await;
    let b = TestGateway::start_with(nats, |c| c.session_policy = policy).await;
    (a, b)
}

fn query(user: &str, device: &str) -> String {
    format!("token={}&device={device}", token(user))
}

#[tokio::test]
async fn multi_replaces_the_same_device_anywhere_and_keeps_other_devices() {
    let nats = TestNats::start().await;
    let (a, b) = two_gateways(&nats, SessionPolicy::Multi).await;
    let mut phone = a.connect_with(&query("lea", "phone")).await;
    let mut laptop = a.connect_with(&query("lea", "laptop")).await;
    let mut new_phone = b.connect_with(&query("lea", "phone")).await;
    // The phone is a known device: it resumes from its cursor (nothing to replay).
    assert_eq!(new_phone.expect_replayed().await, (1, 0, 0, true, None));

    assert_eq!(phone.expect_close().await.map(|c| c.0), Some(close_code::REPLACED));
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.lea", "still here").await;
    assert_eq!(laptop.expect_msg().await.seq, seq);
    assert_eq!(new_phone.expect_msg().await.seq, seq);
}

#[tokio::test]
async fn single_keeps_only_the_newest_socket_of_a_user() {
    let nats = TestNats::start().await;
    let (a, b) = two_gateways(&nats, SessionPolicy::Single).await;
    let mut first = a.connect_with(&query("max", "phone")).await;
    let mut second = b.connect_with(&query("max", "laptop")).await;
    assert_eq!(first.expect_close().await.map(|c| c.0), Some(close_code::REPLACED));
    let mut third = a.connect_with(&query("max", "tablet")).await;
    assert_eq!(second.expect_close().await.map(|c| c.0), Some(close_code::REPLACED));
    let seq = Publisher::new(&nats).await.publish("push.user.max", "only the newest").await;
    assert_eq!(third.expect_msg().await.seq, seq);
}

#[tokio::test]
async fn reject_refuses_a_second_socket_until_the_first_closes() {
    let nats = TestNats::start().await;
    let (a, b) = two_gateways(&nats, SessionPolicy::Reject).await;
    let first = a.connect_with(&query("ned", "phone")).await;
    let refused = WsClient::connect(&b.ws_url(&query("ned", "laptop"))).await.err().expect("refused");
    assert_eq!((refused.status, refused.body["error"].as_str()), (409, Some("conflict")));
    let refused = WsClient::connect(&a.ws_url(&query("ned", "phone"))).await.err().expect("refused");
    assert_eq!(refused.status, 409);
    // Another user is not affected.
    let _other = b.connect_with(&query("ola", "phone")).await;

    drop(first);
    a.wait_metric("herald_gateway_connections", 0.0).await;
    let mut again = b.connect_with(&query("ned", "laptop")).await;
    let seq = Publisher::new(&nats).await.publish("push.user.ned", "welcome back").await;
    assert_eq!(again.expect_msg().await.seq, seq);
}

#[tokio::test]
async fn a_reject_slot_is_refreshed_while_open_and_expires_when_its_gateway_died() {
    let nats = TestNats::start().await;
    let max_age = std::time::Duration::from_secs(2);
    let short = |c: &mut herald_gateway::Config| {
        c.session_policy = SessionPolicy::Reject;
        c.stream.sessions_max_age = max_age;
    };
    let a = TestGateway::start_with(&nats, short).await;
    let b = TestGateway::start_with(&nats, short).await;
    let sessions = nats.jetstream().await.get_key_value("herald-sessions").await.unwrap();
    assert_eq!(sessions.status().await.unwrap().info.config.max_age, max_age);

    let _ned = a.connect_with(&query("ned", "phone")).await;
    let first = sessions.entry("ned").await.unwrap().expect("ned's slot").revision;
    // Refreshed every quarter of the max age: after eight refreshes, the slot is older than the
    // max age would allow unless refreshed, and still holds.
    eventually("eight refreshes of ned's slot", std::time::Duration::from_secs(30), || async {
        let revision = sessions.entry("ned").await.ok()??.revision;
        (revision >= first + 8).then_some(())
    })
    .await;
    let refused = WsClient::connect(&b.ws_url(&query("ned", "laptop"))).await.err().expect("refused");
    assert_eq!(refused.status, 409);

    // Its gateway dies without freeing it: the slot expires, and ned may connect elsewhere.
    a.kill().await;
    let mut again = eventually("ned accepted on b", std::time::Duration::from_secs(30), || async {
        WsClient::connect(&b.ws_url(&query("ned", "laptop"))).await.ok()
    })
    .await;
    again.expect_welcome().await;
}

#[tokio::test]
async fn after_a_switch_from_single_to_reject_entries_single_left_refuse_nobody() {
    let nats = TestNats::start().await;
    let old = TestGateway::start_with(&nats, |c| c.session_policy = SessionPolicy::Single).await;
    // uma's session closed, but single never deletes its claim; vic's is still open.
    drop(old.connect_with(&query("uma", "phone")).await);
    let mut vic_old = old.connect_with(&query("vic", "phone")).await;
    old.wait_metric("herald_gateway_connections", 1.0).await;
    let sessions = nats.jetstream().await.get_key_value("herald-sessions").await.unwrap();
    assert!(sessions.get("uma").await.unwrap().is_some(), "single left a claim");

    // The operator switches the cluster to reject; a restarted gateway adopts it.
    let config = nats.jetstream().await.get_key_value("herald-config").await.unwrap();
    config.put("session_policy", Bytes::from_static(b"reject")).await.unwrap();
    let new = TestGateway::start_with(&nats, |c| c.session_policy = SessionPolicy::Single).await;

    let mut uma = new.connect_with(&query("uma", "laptop")).await;
    let refused = WsClient::connect(&new.ws_url(&query("uma", "phone"))).await.err().expect("refused");
    assert_eq!(refused.status, 409);
    // vic, still open on a gateway that runs single until its restart, is replaced there.
    let mut vic = new.connect_with(&query("vic", "laptop")).await;
    assert_eq!(vic_old.expect_close().await.map(|c| c.0), Some(close_code::REPLACED));
    let refused = WsClient::connect(&new.ws_url(&query("vic", "tablet"))).await.err().expect("refused");
    assert_eq!(refused.status, 409);

    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.uma", "hello").await;
    assert_eq!(uma.expect_msg().await.seq, seq);
    let seq = publisher.publish("push.user.vic", "hello").await;
    assert_eq!(vic.expect_msg().await.seq, seq);
}

#[tokio::test]
async fn the_clusters_policy_in_nats_wins_over_a_gateways_own_setting() {
    let nats = TestNats::start().await;
    // The first gateway finds no policy in herald-config and writes its own.
    let a = TestGateway::start_with(&nats, |c| c.session_policy = SessionPolicy::Single).await;
    let config = nats.jetstream().await.get_key_value("herald-config").await.unwrap();
    assert_eq!(config.get("session_policy").await.unwrap(), Some(Bytes::from_static(b"single")));
    // A gateway set to multi follows the cluster: a second device replaces the first, across gateways.
    let b = TestGateway::start_with(&nats, |c| c.session_policy = SessionPolicy::Multi).await;
    let mut phone = a.connect_with(&query("max", "phone")).await;
    let mut laptop = b.connect_with(&query("max", "laptop")).await;
    assert_eq!(phone.expect_close().await.map(|c| c.0), Some(close_code::REPLACED));
    let seq = Publisher::new(&nats).await.publish("push.user.max", "only the laptop").await;
    assert_eq!(laptop.expect_msg().await.seq, seq);
    assert_eq!(config.get("session_policy").await.unwrap(), Some(Bytes::from_static(b"single")));
}

/// A NATS, a gateway, a publisher and the prefs bucket, with `user` muting kind `marketing`.
async fn marketing_muted_for(user: &str) -> (TestNats, TestGateway, Publisher, kv::Store) {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let prefs = nats.jetstream().await.get_key_value("herald-prefs").await.unwrap();
    prefs.put(user, Bytes::from_static(br#"{"muted":["marketing"]}"#)).await.unwrap();
    (nats, gateway, publisher, prefs)
}

/// Kinds muted before the user connects are read at its first connection to a gateway (the
/// preferences watch brings only later changes): KV that fails that read for a moment, as while the
/// bucket elects a leader, is read again, and the kind stays muted.
#[tokio::test]
async fn muted_kinds_are_read_again_when_kv_fails_for_a_moment_at_connect() {
    let (nats, gateway, publisher, _prefs) = marketing_muted_for("pat").await;
    let url = gateway.ws_url(&format!("token={}", token("pat")));
    let mut client = connect_while_a_read_goes_unanswered(&nats, "herald-prefs", url).await;
    client.expect_welcome().await;
    publisher.publish_with("push.user.pat", &[("Herald-Type", "marketing")], "buy now").await;
    let (mail, _) = publisher.publish_with("push.user.pat", &[("Herald-Type", "mail")], "you've got mail").await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.kind.as_str()), (mail, "mail"));
}

#[tokio::test]
async fn muted_kinds_are_not_delivered_and_unmuting_takes_effect_live() {
    let (_nats, gateway, publisher, prefs) = marketing_muted_for("pia").await;
    let mut client = gateway.connect("pia").await;

    publisher.publish_with("push.user.pia", &[("Herald-Type", "marketing")], "buy now").await;
    let (mail, _) = publisher.publish_with("push.user.pia", &[("Herald-Type", "mail")], "you've got mail").await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.kind.as_str()), (mail, "mail"));

    // Un-muted while connected: marketing arrives again, without a reconnect.
    prefs.put("pia", Bytes::from_static(br#"{"muted":[]}"#)).await.unwrap();
    for attempt in 0.. {
        assert!(attempt < 500, "un-muting never took effect");
        let (ad, _) = publisher.publish_with("push.user.pia", &[("Herald-Type", "marketing")], "sale").await;
        let marker = publisher.publish("push.user.pia", "marker").await;
        let msg = client.expect_msg().await;
        if msg.seq == ad {
            assert_eq!(client.expect_msg().await.seq, marker);
            break;
        }
        // Still muted for a moment: the ad was dropped and the marker came instead.
        assert_eq!(msg.seq, marker);
    }

    // Muted again while connected: marketing stops.
    prefs.put("pia", Bytes::from_static(br#"{"muted":["marketing"]}"#)).await.unwrap();
    for attempt in 0.. {
        assert!(attempt < 500, "muting never took effect");
        let (ad, _) = publisher.publish_with("push.user.pia", &[("Herald-Type", "marketing")], "sale").await;
        let marker = publisher.publish("push.user.pia", "marker").await;
        let msg = client.expect_msg().await;
        if msg.seq == marker {
            break;
        }
        assert_eq!(msg.seq, ad);
        assert_eq!(client.expect_msg().await.seq, marker);
    }
}

#[tokio::test]
async fn a_muted_kind_published_while_a_resuming_first_socket_joins_is_not_delivered() {
    let (_nats, gateway, publisher, _prefs) = marketing_muted_for("quinn").await;
    let query = |since: u64| format!("token={}&device=phone&since={since}", token("quinn"));
    let mut since = gateway.connect_with(&query(0)).await.welcome_seq();
    gateway.wait_metric("herald_gateway_users", 0.0).await;

    // Only ads, without pause, so that some are stored while each socket is away and some arrive
    // while it joins, before and after the gateway has read quinn's muted kinds.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (publisher, stop) = (publisher.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut acks = Vec::new();
                for _ in 0..20 {
                    acks.push(publisher.send("push.user.quinn", &[("Herald-Type", "marketing")], "sale").await);
                }
                for ack in acks {
                    ack.await.expect("publish acknowledged");
                }
                sent += 20;
            }
            sent
        })
    };
    for round in 0..10 {
        // Resuming, and the first socket of its user on this gateway: the replay and the live
        // frames held during the join must both leave the ads out.
        let mut client = gateway.connect_with(&query(since)).await;
        // No msg before `replayed` (the ads stored meanwhile are muted), and the first after it is
        // the marker.
        client.expect_replayed().await;
        let marker = publisher.publish("push.user.quinn", "marker").await;
        let msg = client.expect_msg().await;
        assert_eq!((msg.seq, msg.kind.as_str()), (marker, ""), "round {round}: a muted kind was delivered");
        since = marker;
        drop(client);
        gateway.wait_metric("herald_gateway_users", 0.0).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(feeder.await.unwrap() >= 20);
}
