//! STOMP over SockJS's WebSocket transport and its transports over HTTP requests (XHR streaming,
//! EventSource, XHR polling), as pages written for Spring's `withSockJS()` endpoints connect
//! (docs/protocols.md, "STOMP over SockJS"): the info request, SockJS's framing around the same
//! STOMP session, refusals and bad framing, sessions that outlive their requests. Real NATS, a real
//! gateway, a raw client for exact frames; tests/browser/test_sockjs.py drives sockjs-client itself
//! in Chromium, over each transport.

use herald_tests::gateway::{token, token_with};
use herald_tests::stomp::{Receiver, StompClient, StompEvent, StompFrame};
use herald_tests::{Publisher, TestGateway, TestNats};

fn transport_url(gateway: &TestGateway, session: &str) -> String {
    format!("ws://{}/stomp/042/{session}/websocket", gateway.addr)
}

async fn connect(gateway: &TestGateway, headers: &[(&str, &str)]) -> (StompClient, StompFrame) {
    let mut client = StompClient::connect_sockjs(&transport_url(gateway, "s1"), headers).await;
    let connected = client.expect("CONNECTED").await;
    (client, connected)
}

async fn subscribe(client: &mut StompClient, id: &str, destination: &str) {
    let receipt = format!("sub-{id}");
    client.send_frame("SUBSCRIBE", &[("id", id), ("destination", destination), ("receipt", &receipt)], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), receipt);
}

async fn next_message(client: &mut StompClient) -> (u64, String, String) {
    let message = client.expect("MESSAGE").await;
    (message.header("message-id").parse().unwrap(), message.header("destination").to_string(), message.body)
}

#[tokio::test]
async fn the_info_request_offers_the_websocket_transport_and_the_others_are_not_found() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();

    let info = http
        .get(gateway.http_url("/stomp/info?t=1764860000000"))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 200);
    let header = |name: &str| info.headers().get(name).map(|value| value.to_str().unwrap().to_string());
    assert_eq!(header("access-control-allow-origin").as_deref(), Some("http://app.example"));
    assert_eq!(header("access-control-allow-credentials").as_deref(), Some("true"));
    assert!(header("cache-control").unwrap().contains("no-store"));
    let body: serde_json::Value = info.json().await.unwrap();
    assert_eq!(body["websocket"], true);
    assert_eq!(body["cookie_needed"], false);
    assert_eq!(body["origins"], serde_json::json!(["*:*"]));
    assert!(body["entropy"].is_u64(), "{body}");

    let preflight = http
        .request(reqwest::Method::OPTIONS, gateway.http_url("/stomp/info"))
        .header("origin", "http://app.example")
        .header("access-control-request-headers", "x-requested-with")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-methods"], "OPTIONS, GET");
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["access-control-allow-headers"], "x-requested-with");
    let without_origin = http.get(gateway.http_url("/stomp/info")).send().await.unwrap();
    assert_eq!(without_origin.headers()["access-control-allow-origin"], "*");

    // An origin the gateway does not allow is refused, as its upgrades refuse it.
    let strict =
        TestGateway::start_with(&nats, |config| config.allowed_origins = vec!["http://ok.example".into()]).await;
    let refused =
        http.get(strict.http_url("/stomp/info")).header("origin", "http://evil.example").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.json::<serde_json::Value>().await.unwrap()["error"], "forbidden_origin");
    let allowed = http.get(strict.http_url("/stomp/info")).header("origin", "http://ok.example").send().await.unwrap();
    assert_eq!(allowed.status(), 200);

    for (method, path) in [
        (reqwest::Method::GET, "/stomp/042/s1/xhr"),
        (reqwest::Method::GET, "/stomp/042/s1/htmlfile"),
        (reqwest::Method::GET, "/stomp/042/s1/jsonp"),
        (reqwest::Method::GET, "/stomp/iframe.html"),
        (reqwest::Method::GET, "/stomp/042/s.1/websocket"),
    ] {
        let response = http.request(method.clone(), gateway.http_url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "not_found");
    }
}

#[tokio::test]
async fn stomp_over_sockjs_delivers_user_and_topic_messages_and_resumes_with_herald_since() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let user_token = token_with("sam", &["news"], 3600);

    // No subprotocol over SockJS: `accept-version` decides, as stomp.js sends it.
    let mut client = StompClient::open_sockjs(&transport_url(&gateway, "first")).await;
    client.send_frame("CONNECT", &[("accept-version", "1.1,1.0"), ("passcode", &user_token)], "").await;
    let connected = client.expect("CONNECTED").await;
    assert_eq!((connected.header("version"), connected.header("user-name")), ("1.1", "sam"));
    subscribe(&mut client, "sub-0", "/user/queue/inbox").await;
    subscribe(&mut client, "sub-1", "/topic/all").await;
    subscribe(&mut client, "sub-2", "/topic/news").await;

    // A body that needs escaping inside SockJS's JSON arrives as published.
    let body = r#"{"text":"a \"quote\", a \\ and a line\nbreak, é, \u2028"}"#;
    let personal = publisher.publish("push.user.sam", body).await;
    let all = publisher.publish("push.all", r#"{"n":2}"#).await;
    let topic = publisher.publish("push.topic.news", r#"{"n":3}"#).await;
    assert_eq!(next_message(&mut client).await, (personal, "/user/queue/inbox".into(), body.into()));
    assert_eq!(next_message(&mut client).await, (all, "/topic/all".into(), r#"{"n":2}"#.into()));
    assert_eq!(next_message(&mut client).await, (topic, "/topic/news".into(), r#"{"n":3}"#.into()));

    // The client leaves; what is published meanwhile is replayed on its next session.
    client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");
    let missed = [publisher.publish("push.user.sam", "4").await, publisher.publish("push.all", "5").await];
    let since = topic.to_string();
    let mut client = StompClient::open_sockjs(&transport_url(&gateway, "second")).await;
    client
        .send_frame("CONNECT", &[("accept-version", "1.2"), ("passcode", &user_token), ("herald-since", &since)], "")
        .await;
    client.expect("CONNECTED").await;
    subscribe_without_receipt(&mut client, "sub-0", "/user/queue/inbox").await;
    subscribe_without_receipt(&mut client, "sub-1", "/topic/all").await;
    assert_eq!(next_message(&mut client).await, (missed[0], "/user/queue/inbox".into(), "4".into()));
    assert_eq!(next_message(&mut client).await, (missed[1], "/topic/all".into(), "5".into()));
    let live = publisher.publish("push.user.sam", "6").await;
    assert_eq!(next_message(&mut client).await, (live, "/user/queue/inbox".into(), "6".into()));
}

/// SUBSCRIBE with no receipt (a RECEIPT could come before or after the replayed messages).
async fn subscribe_without_receipt(client: &mut StompClient, id: &str, destination: &str) {
    client.send_frame("SUBSCRIBE", &[("id", id), ("destination", destination)], "").await;
}

#[tokio::test]
async fn refusals_and_bad_framing_get_an_error_then_sockjs_close() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;

    let mut client = StompClient::connect_sockjs(&transport_url(&gateway, "bad-token"), &[("passcode", "nope")]).await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("unauthorized", Some(1008)));
    // SockJS's close frame is followed by WebSocket's.
    assert!(matches!(client.next_event().await, StompEvent::Close(Some((1008, _)))));
    assert_eq!(gateway.refusals(401, "unauthorized").await, 1.0);

    // The token in the transport URL's query, as `new SockJS("/stomp?token=…")` sends it.
    let query = format!("{}?token={}", transport_url(&gateway, "query"), token("tia"));
    let mut client = StompClient::connect_sockjs(&query, &[]).await;
    assert_eq!(client.expect("CONNECTED").await.header("user-name"), "tia");

    let user_token = token_with("tia", &["news"], 3600);
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client.send_frame("SUBSCRIBE", &[("id", "1"), ("destination", "/topic/secret")], "").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("forbidden", Some(1008)));

    // SockJS's raw WebSocket URL is plain STOMP over WebSocket.
    let raw = format!("ws://{}/stomp/websocket", gateway.addr);
    let mut client = StompClient::connect(&raw, &[("passcode", &token("uma"))]).await;
    assert_eq!(client.subprotocol.as_deref(), Some("v12.stomp"));
    assert_eq!(client.expect("CONNECTED").await.header("user-name"), "uma");

    // Not SockJS's framing (a bare STOMP frame), after CONNECT and before it.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    client.send_websocket("SUBSCRIBE\nid:1\ndestination:/topic/all\n\n\0").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("bad_request", Some(1008)));
    assert_eq!(error.body, "a SockJS message must be a JSON array of strings");
    let mut client = StompClient::open_sockjs(&transport_url(&gateway, "raw")).await;
    client.send_websocket("CONNECT\naccept-version:1.2\n\n\0").await;
    let (error, close) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), close), ("bad_request", Some(1008)));

    // Two frames in the first message: the second would have no session to run in yet.
    let mut client = StompClient::open_sockjs(&transport_url(&gateway, "two")).await;
    let connect_frame = format!("CONNECT\naccept-version:1.2\npasscode:{user_token}\n\n\0");
    let two = serde_json::json!([connect_frame, "SUBSCRIBE\nid:1\ndestination:/topic/all\n\n\0"]).to_string();
    client.send_websocket(&two).await;
    let (error, _) = client.expect_error_and_close().await;
    assert_eq!(error.body, "CONNECT must come alone in its SockJS message");

    // Several frames in one message after CONNECT are each read, in order.
    let (mut client, _) = connect(&gateway, &[("passcode", &user_token)]).await;
    let frames = [
        "SUBSCRIBE\nid:1\ndestination:/topic/all\nreceipt:a\n\n\0",
        "\n",
        "SUBSCRIBE\nid:2\ndestination:/topic/news\nreceipt:b\n\n\0",
    ];
    client.send_websocket(&serde_json::json!(frames).to_string()).await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "a");
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "b");
    client.send_frame("DISCONNECT", &[], "").await;
    loop {
        match client.next_event().await {
            StompEvent::HeartBeat => continue,
            StompEvent::Close(close) => {
                assert_eq!(close.map(|(code, _)| code), Some(1000));
                break;
            }
            other => panic!("expected the close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_idle_client_without_stomp_heart_beats_gets_sockjs_heartbeats_and_stays() {
    idle_client_stays(None).await;
}

/// Over HTTP requests the client cannot answer the WebSocket ping: its requests are its liveness,
/// and the gateway answers the ping for it.
#[tokio::test]
async fn an_idle_xhr_streaming_client_without_stomp_heart_beats_stays() {
    idle_client_stays(Some(Receiver::XhrStreaming)).await;
}

#[tokio::test]
async fn an_idle_eventsource_client_without_stomp_heart_beats_stays() {
    idle_client_stays(Some(Receiver::EventSource)).await;
}

/// Each heartbeat ends a poll, and the client polls again.
#[tokio::test]
async fn an_idle_xhr_polling_client_without_stomp_heart_beats_stays() {
    idle_client_stays(Some(Receiver::XhrPolling)).await;
}

async fn idle_client_stays(receiver: Option<Receiver>) {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |config| {
        config.heartbeat = std::time::Duration::from_millis(300);
        config.heartbeat_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // heart-beat 0,0 (Spring's WebSocketStompClient without a scheduler): SockJS's `h` each period,
    // and a WebSocket ping whose pong keeps the connection, many periods long.
    let headers = [("passcode", token("ida")), ("heart-beat", "0,0".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let (mut client, connected) = if let Some(receiver) = receiver {
        let mut client = StompClient::connect_xhr(&xhr_base(&gateway, "idle"), receiver, &headers).await;
        let connected = client.expect("CONNECTED").await;
        (client, connected)
    } else {
        connect(&gateway, &headers).await
    };
    assert_eq!(connected.header("heart-beat"), "300,300");
    subscribe(&mut client, "q", "/user/queue/q").await;
    for _ in 0..10 {
        assert_eq!(client.next_event().await, StompEvent::HeartBeat);
    }
    let seq = publisher.publish("push.user.ida", "1").await;
    assert_eq!(next_message(&mut client).await, (seq, "/user/queue/q".into(), "1".into()));
}

fn xhr_base(gateway: &TestGateway, session: &str) -> String {
    format!("http://{}/stomp/042/{session}", gateway.addr)
}

/// The transports over HTTP requests run the same session: CONNECT, SUBSCRIBE and DISCONNECT go
/// by `xhr_send`, frames come by the receiving requests.
#[tokio::test]
async fn over_xhr_streaming_the_same_session_delivers_and_ends_with_its_close() {
    delivers_and_ends_with_its_close(Receiver::XhrStreaming).await;
}

#[tokio::test]
async fn over_eventsource_the_same_session_delivers_and_ends_with_its_close() {
    delivers_and_ends_with_its_close(Receiver::EventSource).await;
}

#[tokio::test]
async fn over_xhr_polling_the_same_session_delivers_and_ends_with_its_close() {
    delivers_and_ends_with_its_close(Receiver::XhrPolling).await;
}

async fn delivers_and_ends_with_its_close(receiver: Receiver) {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let base = xhr_base(&gateway, "x1");
    let passcode = token_with("xena", &["news"], 3600);
    let mut client = StompClient::connect_xhr(&base, receiver, &[("passcode", &passcode)]).await;
    assert_eq!(client.expect("CONNECTED").await.header("version"), "1.2");
    subscribe(&mut client, "sub-0", "/user/queue/inbox").await;
    subscribe(&mut client, "sub-1", "/topic/news").await;
    let body = r#"{"text":"a \"quote\"\nline \u00e9"}"#;
    let personal = publisher.publish("push.user.xena", body).await;
    let topic = publisher.publish("push.topic.news", "2").await;
    assert_eq!(next_message(&mut client).await, (personal, "/user/queue/inbox".into(), body.into()));
    assert_eq!(next_message(&mut client).await, (topic, "/topic/news".into(), "2".into()));

    client.send_frame("DISCONNECT", &[("receipt", "bye")], "").await;
    assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), "bye");
    assert_eq!(client.next_event().await, StompEvent::Close(Some((1000, "the client disconnected".into()))));
    assert_eq!(client.next_event().await, StompEvent::Close(None), "the response ends");
    herald_tests::eventually("the session is gone", std::time::Duration::from_secs(10), || async {
        (client.xhr_send(r#"["x"]"#).await.0 == 404).then_some(())
    })
    .await;
}

/// A streaming response ends after 128 KiB of frames and the client opens the next; the session
/// goes on across them and nothing is lost or repeated (polls: across every poll).
#[tokio::test]
async fn over_xhr_streaming_a_long_session_spans_responses_and_loses_nothing() {
    spans_requests_and_loses_nothing(Receiver::XhrStreaming).await;
}

#[tokio::test]
async fn over_eventsource_a_long_session_spans_responses_and_loses_nothing() {
    spans_requests_and_loses_nothing(Receiver::EventSource).await;
}

#[tokio::test]
async fn over_xhr_polling_a_long_session_spans_polls_and_loses_nothing() {
    spans_requests_and_loses_nothing(Receiver::XhrPolling).await;
}

async fn spans_requests_and_loses_nothing(receiver: Receiver) {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let mut client =
        StompClient::connect_xhr(&xhr_base(&gateway, "long"), receiver, &[("passcode", &token("lou"))]).await;
    client.expect("CONNECTED").await;
    subscribe(&mut client, "q", "/user/queue/q").await;
    // 40 messages of 8,000 bytes: about 320 KiB of frames, so at least three responses of at most
    // 128 KiB and a last frame each. Read as they come, as a client keeps receiving.
    let publish = async {
        let mut published = Vec::new();
        for n in 0..40 {
            let body = format!("{n:02}{}", "x".repeat(7998));
            published.push((publisher.publish("push.user.lou", &body).await, "/user/queue/q".to_string(), body));
        }
        published
    };
    let receive = async {
        let mut received = Vec::new();
        while received.len() < 40 {
            received.push(next_message(&mut client).await);
        }
        received
    };
    let (published, received) = tokio::join!(publish, receive);
    assert_eq!(received, published);
    let requests = client.receiving_requests();
    assert!(requests >= 3, "{requests} receiving requests for about 320 KiB");
    let last = publisher.publish("push.user.lou", "last").await;
    assert_eq!(next_message(&mut client).await, (last, "/user/queue/q".into(), "last".into()));
}

/// A gateway that stops while a polling client is between two polls keeps its listener open for
/// that client's next poll, on a new connection, which takes the session's close (1012); other
/// requests then get 503, and the listener closes once the close was taken.
#[tokio::test]
async fn over_xhr_polling_a_stopping_gateway_hands_its_close_to_the_next_poll() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let base = xhr_base(&gateway, "stopping");
    let mut client = StompClient::connect_xhr(&base, Receiver::XhrPolling, &[("passcode", &token("sam"))]).await;
    client.expect("CONNECTED").await;
    subscribe(&mut client, "q", "/user/queue/q").await;
    let seq = publisher.publish("push.user.sam", "1").await;
    // The poll that carried it ended; the client sends the next one only when it reads again.
    assert_eq!(next_message(&mut client).await, (seq, "/user/queue/q".into(), "1".into()));
    let mut watcher = gateway.connect("watcher").await;

    gateway.begin_shutdown();
    assert_eq!(watcher.expect_close().await.map(|c| c.0), Some(1012), "the gateway drains");
    let http = reqwest::Client::new();
    let alive = http.get(gateway.http_url("/healthz")).send().await.expect("answered while draining");
    assert_eq!(alive.status(), 200, "the process runs");
    let other = http.get(gateway.http_url("/readyz")).send().await.unwrap();
    assert_eq!(other.status(), 503);
    let body: serde_json::Value = other.json().await.unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");
    let unknown = http.post(format!("{}/xhr", xhr_base(&gateway, "unknown"))).send().await.unwrap();
    assert_eq!(unknown.status(), 503, "no session opens while draining");
    client.drop_http_connections();
    // A send (a heart-beat) into the ended session is taken, as SockJS takes it, and dropped.
    assert_eq!(client.xhr_send(r#"["\n"]"#).await, (204, String::new()));
    assert_eq!(client.next_event().await, StompEvent::Close(Some((1012, "gateway restarting".into()))));
    herald_tests::eventually("the listener closes", std::time::Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(gateway.addr).await.is_err().then_some(())
    })
    .await;
}

/// A client that polls all the time keeps its session past the disconnect delay: each poll counts,
/// also one answered at once because frames were waiting (here a client that takes 100 ms over each
/// message, behind a publisher that sends one each 50 ms: about 8 s of polls answered at once).
#[tokio::test]
async fn over_xhr_polling_a_busy_session_outlives_the_disconnect_delay() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let base = xhr_base(&gateway, "busy");
    let mut client = StompClient::connect_xhr(&base, Receiver::XhrPolling, &[("passcode", &token("bea"))]).await;
    client.expect("CONNECTED").await;
    subscribe(&mut client, "q", "/user/queue/q").await;
    let publish = async {
        let mut published = Vec::new();
        for n in 0..80 {
            let body = n.to_string();
            published.push((publisher.publish("push.user.bea", &body).await, "/user/queue/q".to_string(), body));
            // Pacing, so that the session lives past the delay; nothing waits on it.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        published
    };
    let receive = async {
        let mut received = Vec::new();
        while received.len() < 80 {
            received.push(next_message(&mut client).await);
            // A client busy with each message: frames wait for its next poll.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        received
    };
    let (published, received) = tokio::join!(publish, receive);
    assert_eq!(received, published);
}

/// What SockJS servers answer to a second stream of an open session, to `xhr_send` without a
/// session or with a broken body, and to the preflights; the open session goes on.
#[tokio::test]
async fn over_xhr_streaming_bad_requests_get_sockjs_answers_and_the_session_goes_on() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();
    let base = xhr_base(&gateway, "x2");
    let mut client = StompClient::connect_xhr(&base, Receiver::XhrStreaming, &[("passcode", &token("yann"))]).await;
    client.expect("CONNECTED").await;

    // While the stream is open, a second receiving request of any kind is refused.
    let refusal = r#"c[2010,"Another connection still open"]"#;
    let second = http.post(format!("{base}/xhr_streaming")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.text().await.unwrap(), format!("{}\n{refusal}\n", "h".repeat(2048)));
    let poll = http.post(format!("{base}/xhr")).send().await.unwrap();
    assert_eq!(poll.text().await.unwrap(), format!("{refusal}\n"));
    let events = http.get(format!("{base}/eventsource")).send().await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream; charset=UTF-8");
    assert_eq!(events.text().await.unwrap(), format!("\r\ndata: {refusal}\r\n\r\n"));

    assert_eq!(client.xhr_send("").await, (500, "Payload expected.".into()));
    assert_eq!(client.xhr_send(r#"["unterminated"#).await, (500, "Broken JSON encoding.".into()));
    let unknown = http.post(format!("{}/xhr_send", xhr_base(&gateway, "nobody"))).body(r#"["x"]"#).send().await;
    assert_eq!(unknown.unwrap().status(), 404);
    for transport in ["xhr_send", "xhr_streaming", "xhr"] {
        let preflight = http
            .request(reqwest::Method::OPTIONS, format!("{base}/{transport}"))
            .header("origin", "http://app.example")
            .send()
            .await
            .unwrap();
        assert_eq!(preflight.status(), 204, "{transport}");
        assert_eq!(preflight.headers()["access-control-allow-methods"], "OPTIONS, POST");
        assert_eq!(preflight.headers()["access-control-allow-origin"], "http://app.example");
    }

    subscribe(&mut client, "q", "/user/queue/q").await;
    let seq = publisher.publish("push.user.yann", "1").await;
    assert_eq!(next_message(&mut client).await, (seq, "/user/queue/q".into(), "1".into()));

    // A bad STOMP frame by xhr_send: ERROR, then the close, as over the WebSocket.
    client.send_raw("NOPE\n\n\0").await;
    let (error, code) = client.expect_error_and_close().await;
    assert_eq!((error.header("message"), code), ("unknown_type", Some(1008)));
}

/// A client that goes away stops its receiving requests: its session ends 5 s after the last (SockJS's
/// disconnect delay), not at its next heartbeat (an hour away here), and its path answers 404.
#[tokio::test]
async fn an_xhr_streaming_session_ends_when_its_stream_is_dropped() {
    ends_without_receiving_requests(Receiver::XhrStreaming).await;
}

#[tokio::test]
async fn an_eventsource_session_ends_when_its_stream_is_dropped() {
    ends_without_receiving_requests(Receiver::EventSource).await;
}

#[tokio::test]
async fn an_xhr_polling_session_ends_when_its_client_stops_polling() {
    ends_without_receiving_requests(Receiver::XhrPolling).await;
}

async fn ends_without_receiving_requests(receiver: Receiver) {
    let nats = TestNats::start().await;
    let gateway =
        TestGateway::start_with(&nats, |config| config.heartbeat = std::time::Duration::from_secs(3600)).await;
    let base = xhr_base(&gateway, "gone");
    let mut client = StompClient::connect_xhr(&base, receiver, &[("passcode", &token("gus"))]).await;
    client.expect("CONNECTED").await;
    assert_eq!(gateway.metric("herald_gateway_connections").await, 1.0);
    drop(client);
    herald_tests::eventually("the session ends", std::time::Duration::from_secs(30), || async {
        (gateway.metric("herald_gateway_connections").await == 0.0).then_some(())
    })
    .await;
    let send = reqwest::Client::new().post(format!("{base}/xhr_send")).body(r#"["x"]"#).send().await.unwrap();
    assert_eq!(send.status(), 404);
}

/// A session whose answers wait for its client (large messages, polled) reads none of the client's
/// frames meanwhile, so its `xhr_send` requests wait; the pong that answers the session's WebSocket
/// ping for the client (it sends no STOMP heart-beats) must not wait behind them, or the receiving
/// request stops taking frames, and the session stops for good.
#[tokio::test]
async fn over_xhr_polling_large_messages_and_busy_sends_do_not_stop_the_session() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |c| c.heartbeat = std::time::Duration::from_secs(1)).await;
    let base = xhr_base(&gateway, "large");
    let mut client = StompClient::connect_xhr(&base, Receiver::XhrPolling, &[("passcode", &token("lea"))]).await;
    client.expect("CONNECTED").await;
    subscribe(&mut client, "q", "/user/queue/q").await;
    const COUNT: usize = 16;
    let publish = async {
        let mut published = Vec::new();
        for n in 0..COUNT {
            let body = format!("{n:02}{}", "x".repeat(600_000));
            published.push((publisher.publish("push.user.lea", &body).await, "/user/queue/q".to_string(), body));
        }
        published
    };
    // Heart-beat EOLs, 2 KB a request, sent all along.
    let (done, receiving) = tokio::sync::watch::channel(false);
    let send = async {
        let http = reqwest::Client::new();
        let eols = serde_json::json!(["\n".repeat(2000)]).to_string();
        let mut sent = 0;
        while !*receiving.borrow() && sent < 400 {
            let status = http.post(format!("{base}/xhr_send")).body(eols.clone()).send().await.map(|r| r.status());
            assert_eq!(status.map(|s| s.as_u16()).ok(), Some(204), "xhr_send {sent}");
            sent += 1;
        }
    };
    let receive = async {
        let mut received = Vec::new();
        while received.len() < COUNT {
            received.push(next_message(&mut client).await);
            // A client busy with each message: the session's answers wait for it.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        done.send_replace(true);
        received
    };
    let (published, received, ()) = tokio::join!(publish, receive, send);
    assert_eq!(received.len(), published.len());
    assert!(received == published, "messages differ");
}
