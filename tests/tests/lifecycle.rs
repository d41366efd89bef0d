//! Gateway core, lifecycle: graceful shutdown, NATS going away and coming back.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use herald_shared::frame::close_code;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient, eventually};

#[tokio::test]
async fn shutdown_closes_every_socket_with_1012_and_stops_accepting() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut first = gateway.connect("a").await;
    let mut second = gateway.connect("b").await;
    let addr = gateway.addr;

    gateway.shutdown().await;
    assert_eq!(first.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    assert_eq!(second.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    // The listener is gone: a new connection is refused at the TCP level.
    let refused = tokio::net::TcpStream::connect(addr).await.expect_err("the listener is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
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
    // What is wrong, and nothing that is not: the stream and the buckets were not found missing.
    let problems = gateway.readyz_problems().await;
    assert!(problems.contains(&"not connected to NATS".to_string()), "{problems:?}");
    assert!(problems.iter().all(|problem| !problem.contains("stream HERALD")), "{problems:?}");
    // The gauge says what /readyz says, at once (it lagged while a JetStream check waited).
    assert_eq!(gateway.metric("herald_gateway_nats_connected").await, 0.0);
    // New sockets are refused while NATS is away; the open one stays.
    let refused = WsClient::connect(&gateway.ws_url(&format!("token={}", herald_tests::gateway::token("late"))))
        .await
        .err()
        .expect("refused while NATS is down");
    assert_eq!((refused.status, refused.body["error"].as_str()), (503, Some("unavailable")));
    assert_eq!(gateway.refusals(503, "unavailable").await, 1.0);
    // An SSE stream ends at once with a `close` event (EventSource retries), a refusal as counted.
    let sse = gateway.http_url(&format!("/sse?token={}", herald_tests::gateway::token("late")));
    let stream = reqwest::get(sse).await.unwrap().text().await.unwrap();
    assert!(stream.contains(r#""code":1013"#), "{stream}");
    assert_eq!(gateway.refusals(503, "unavailable").await, 2.0);
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

#[tokio::test]
async fn kv_buckets_missing_while_the_stream_exists_are_recreated_and_the_gateway_becomes_ready() {
    // What a fresh cluster can leave behind: the stream made (by one gateway), the buckets by none
    // (JetStream had no leader yet when they were tried).
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let js = nats.jetstream().await;
    for bucket in herald_shared::subject::BUCKETS {
        js.delete_key_value(bucket).await.unwrap();
    }
    assert!(js.get_stream("HERALD").await.is_ok());

    for bucket in herald_shared::subject::BUCKETS {
        eventually(&format!("{bucket} recreated"), Duration::from_secs(30), || async {
            js.get_key_value(bucket).await.ok().map(|_| ())
        })
        .await;
    }
    eventually("readyz 200", Duration::from_secs(30), || async { (gateway.readyz().await == 200).then_some(()) }).await;
    assert!(gateway.metric("herald_gateway_kv_buckets_recreated_total").await >= 1.0);

    // Everything works on the new buckets: sockets, delivery, and a preference applied live.
    let mut client = gateway.connect("phoenix").await;
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.phoenix", "risen").await;
    assert_eq!(client.expect_msg().await.seq, seq);
    let prefs = js.get_key_value("herald-prefs").await.unwrap();
    prefs.put("phoenix", r#"{"muted":["marketing"]}"#.into()).await.unwrap();
    for attempt in 0.. {
        assert!(attempt < 500, "the preference never took effect");
        let (ad, _) = publisher.publish_with("push.user.phoenix", &[("Herald-Type", "marketing")], "sale").await;
        let marker = publisher.publish("push.user.phoenix", "marker").await;
        let msg = client.expect_msg().await;
        if msg.seq == marker {
            break;
        }
        assert_eq!(msg.seq, ad);
        assert_eq!(client.expect_msg().await.seq, marker);
    }
}

/// A stream made by another hand (without the republish that feeds the gateways, with other
/// limits) is updated to the gateway's settings when it starts, and delivers.
#[tokio::test]
async fn a_stream_made_with_other_settings_is_updated_to_the_gateways_when_it_starts() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    let settings = herald_shared::stream::StreamSettings::default();
    let mut other = settings.stream_config();
    other.republish = None;
    other.max_messages_per_subject = 5;
    js.create_stream(other).await.unwrap();
    // Nothing is missing: the gateway finds everything there.
    herald_shared::stream::ensure_buckets(&js, &settings).await.unwrap();

    let gateway = TestGateway::start(&nats).await;
    let config = js.get_stream("HERALD").await.unwrap().cached_info().config.clone();
    assert_eq!((config.republish, config.max_messages_per_subject), (settings.stream_config().republish, 1000));
    let mut client = gateway.connect("updated").await;
    let seq = Publisher::new(&nats).await.publish("push.user.updated", "1").await;
    assert_eq!(client.expect_msg().await.seq, seq);
}

#[tokio::test]
async fn buckets_still_being_made_when_the_gateway_starts_are_not_taken_for_recreated_ones() {
    // The functions make the buckets one after another: a gateway starting meanwhile finds some.
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    herald_shared::stream::ensure_buckets(&js, &Default::default()).await.unwrap();
    js.delete_key_value("herald-config").await.unwrap();

    let gateway = TestGateway::start(&nats).await;
    assert!(js.get_key_value("herald-config").await.is_ok());
    // Nothing was lost, so the KV watches were not restarted (that logs a warning).
    assert_eq!(gateway.metric("herald_gateway_kv_buckets_recreated_total").await, 0.0);
}

#[tokio::test]
async fn a_jetstream_that_does_not_answer_for_a_while_is_not_taken_for_a_lost_one() {
    // As a gateway sees its NATS node cut off from the cluster: the connection stays, questions
    // about the stream and buckets time out (5 s). Unanswered is not absent: the gateway says so,
    // makes nothing again, and does not restart its KV watches when the answers come back.
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut client = gateway.connect("patient").await;

    nats.pause().await;
    eventually("readyz: JetStream does not answer", Duration::from_secs(30), || async {
        gateway.readyz_problems().await.iter().any(|problem| problem == "JetStream does not answer").then_some(())
    })
    .await;
    nats.unpause().await;

    gateway.wait_ready().await;
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.patient", "still here").await;
    assert_eq!(client.expect_msg().await.seq, seq);
    assert_eq!(gateway.metric("herald_gateway_kv_buckets_recreated_total").await, 0.0);
    // Nor is the stream taken for one made again: the connection stays.
    assert_eq!(gateway.metric("herald_gateway_streams_replaced_total").await, 0.0);
    let seq = publisher.publish("push.user.patient", "and still").await;
    assert_eq!(client.expect_msg().await.seq, seq);
}

/// A gateway whose NATS password is wrong keeps trying (the operator may fix nats.conf rather than
/// the gateway), and /readyz says what is wrong: the credentials, not just "not connected".
#[tokio::test]
async fn readiness_names_credentials_nats_refuses() {
    let nats = TestNats::start().await;
    let gateway =
        TestGateway::start_unready(&nats.url(), |c| c.nats.nats_password = Some("not-the-password".into())).await;
    let expected = "NATS refuses the gateway's credentials (authorization violation): check nats_user and \
                    nats_password, or nats_creds";
    let problems = eventually("readyz names the credentials", Duration::from_secs(30), || async {
        let problems = gateway.readyz_problems().await;
        problems.iter().any(|problem| problem == expected).then_some(problems)
    })
    .await;
    assert!(!problems.iter().any(|problem| problem == "not connected to NATS"), "{problems:?}");
    assert_eq!(gateway.readyz().await, 503);
}

/// NATS without JetStream (a newcomer's config without the jetstream block): the gateway says so
/// rather than that JetStream "does not answer", which reads as a cluster problem.
#[tokio::test]
async fn a_nats_without_jetstream_is_named_as_such() {
    let nats = TestNats::start_with_config("jetstream: disabled").await;
    let gateway = TestGateway::start_unready(&nats.url(), |_| {}).await;
    let expected = "NATS runs without JetStream (nats.conf needs its jetstream block)";
    eventually("readyz names the missing JetStream", Duration::from_secs(30), || async {
        gateway.readyz_problems().await.iter().any(|problem| problem == expected).then_some(())
    })
    .await;
    assert_eq!(gateway.readyz().await, 503);
}

/// The real binary, stopped by a real SIGTERM, as an orchestrator stops it.
#[tokio::test]
async fn the_binary_closes_sockets_with_1012_and_exits_on_sigterm() {
    let nats = TestNats::start().await;
    let port = herald_tests::free_port();
    let gateway = std::process::Command::new(herald_tests::gateway::binary())
        .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_NATS_URL", nats.url())
        .env("HERALD_NATS_USER", herald_tests::nats::Role::Gateway.user())
        .env("HERALD_NATS_PASSWORD", herald_tests::nats::Role::Gateway.password())
        .env("HERALD_JWT_SECRET", herald_tests::gateway::SECRET)
        .env("HERALD_LOG", "warn")
        .spawn()
        .expect("start herald-gateway");
    let ready = format!("http://127.0.0.1:{port}/readyz");
    eventually("the gateway binary ready", Duration::from_secs(30), || async {
        let status = reqwest::get(&ready).await.ok()?.status();
        status.is_success().then_some(())
    })
    .await;
    let url = format!("ws://127.0.0.1:{port}/ws?token={}", herald_tests::gateway::token("sig"));
    let mut client = WsClient::connect(&url).await.expect("connected");
    client.expect_welcome().await;
    // Event streams served as a second request of a kept-alive connection (as browsers open
    // them after the page), whose chunked bodies the gateway's HTTP layer writes.
    let mut streams = Vec::new();
    for n in 0..16 {
        streams.push(sse_on_a_reused_connection(port, &format!("sse-{n}")).await);
    }

    let killed = std::process::Command::new("kill").args(["-TERM", &gateway.id().to_string()]).status();
    assert!(killed.expect("run kill").success());
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    // Each stream ends whole: its `close` event, then the body's last chunk, before the exit.
    for mut stream in streams {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
        let rest = String::from_utf8_lossy(&rest).into_owned();
        assert!(read.is_ok_and(|read| read.is_ok()), "a stream still open or reset: {rest:?}");
        assert!(rest.contains("event: close") && rest.contains("1012"), "no close event: {rest:?}");
        assert!(rest.ends_with("0\r\n\r\n"), "the chunked body cut short: {rest:?}");
    }
    let gateway = std::sync::Mutex::new(gateway);
    let exited = eventually("the gateway binary exited", Duration::from_secs(30), || {
        let status = gateway.lock().unwrap().try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(exited.success(), "exit status {exited}");
}

/// A connection that asked for a page, then for an event stream as `user`: the stream's response
/// head and `welcome` are read, the rest left to read.
async fn sse_on_a_reused_connection(port: u16, user: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("{\"ok\":true}") {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "closed before the page");
        seen.extend_from_slice(&buffer[..n]);
    }
    let token = herald_tests::gateway::token(user);
    stream.write_all(format!("GET /sse?token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("event: welcome") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the welcome");
        seen.extend_from_slice(&buffer[..n]);
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("transfer-encoding: chunked"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    stream
}

/// What NATS losing its store looks like to a running gateway: the stream comes back empty and
/// its sequences start over, so a connection's `seq`s no longer say what it has. Each connection
/// ends with 4008 and its loss noted: its resume reports `complete:false`. Routing starts over:
/// the new stream's messages arrive, to new connections and to resumed ones.
#[tokio::test]
async fn a_stream_made_again_under_a_running_gateway_ends_its_connections_and_their_resume_is_incomplete() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut client = gateway.connect("phoenix").await;
    let mut old = Vec::new();
    for n in 0..5 {
        old.push(publisher.publish("push.user.phoenix", &format!("old {n}")).await);
    }
    assert_eq!(client.expect_msgs(5).await, old);

    let js = nats.jetstream().await;
    js.delete_stream("HERALD").await.unwrap();
    assert_eq!(client.expect_close().await.map(|close| close.0), Some(close_code::SLOW_CONSUMER));
    assert_eq!(gateway.metric("herald_gateway_streams_replaced_total").await, 1.0);

    let since = old[4];
    let query = format!("token={}&since={since}", herald_tests::gateway::token("phoenix"));
    let mut resumed = gateway.connect_with(&query).await;
    // Beyond the new stream's end: nothing replayed, from its end (0), and incomplete.
    assert_eq!(resumed.expect_replayed().await, (1, 0, 0, false, None));
    let mut newcomer = gateway.connect("newbie").await;
    let to_all = publisher.publish("push.all", "new").await;
    let to_newbie = publisher.publish("push.user.newbie", "hello").await;
    assert_eq!((to_all, to_newbie), (1, 2), "the stream's sequences started over");
    assert_eq!(resumed.expect_msgs(1).await, vec![to_all]);
    assert_eq!(newcomer.expect_msgs(2).await, vec![to_all, to_newbie]);
}

/// A `since` the new stream has already passed looks like one of its own: the `welcome`'s `epoch`
/// tells them apart. Given back with `since`, another epoch resumes from the stream's end, reported
/// incomplete, instead of replaying other messages as complete; the current one resumes as usual.
#[tokio::test]
async fn a_since_of_a_stream_made_again_is_known_by_the_epoch_given_with_it() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let epoch_of = |client: &WsClient| match &client.welcome {
        Some(herald_shared::frame::ServerFrame::Welcome { epoch: Some(epoch), .. }) => epoch.clone(),
        other => panic!("no epoch in {other:?}"),
    };
    let mut client = gateway.connect("phoenix").await;
    let old_epoch = epoch_of(&client);
    let mut old = Vec::new();
    for n in 0..3 {
        old.push(publisher.publish("push.user.phoenix", &format!("old {n}")).await);
    }
    assert_eq!(client.expect_msgs(3).await, old);
    nats.jetstream().await.delete_stream("HERALD").await.unwrap();
    assert_eq!(client.expect_close().await.map(|close| close.0), Some(close_code::SLOW_CONSUMER));
    let mut new = Vec::new();
    for n in 0..5 {
        new.push(publisher.publish("push.user.phoenix", &format!("new {n}")).await);
    }
    assert_eq!(new, vec![1, 2, 3, 4, 5], "the sequences started over, past the old `since`");

    let token = herald_tests::gateway::token("phoenix");
    let since = old[2];
    let mut stale = gateway.connect_with(&format!("token={token}&since={since}&epoch={old_epoch}")).await;
    let new_epoch = epoch_of(&stale);
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(stale.expect_replayed().await, (6, 5, 0, false, None), "from the end, incomplete");
    // Other devices: the 4008 noted a loss for the first one's, which its resumes report until
    // the note is gone.
    let mut current =
        gateway.connect_with(&format!("token={token}&device=current&since={since}&epoch={new_epoch}")).await;
    assert_eq!(current.expect_msgs(2).await, new[3..].to_vec());
    assert_eq!(current.expect_replayed().await, (since + 1, 5, 2, true, None));
    // Without the epoch the gateway cannot tell (docs/protocol.md).
    let mut blind = gateway.connect_with(&format!("token={token}&device=blind&since={since}")).await;
    assert_eq!(blind.expect_msgs(2).await, new[3..].to_vec());
    assert_eq!(blind.expect_replayed().await, (since + 1, 5, 2, true, None));
    for bad in ["xyz", "", "12345678901234567", "+1"] {
        let refused = WsClient::connect(&gateway.ws_url(&format!("token={token}&since=1&epoch={bad}"))).await;
        let refused = refused.err().expect("refused");
        assert_eq!((refused.status, refused.body["error"].as_str()), (400, Some("bad_request")), "{bad:?}");
    }
}
