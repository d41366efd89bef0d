//! Socket.IO 4 (Engine.IO 4: WebSocket, long-polling, the upgrade) at `/socket.io/`, driven by
//! python-socketio's AsyncClient (PyPI) and, for connection state recovery (which python-socketio
//! does not implement), by raw frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_tests::gateway::{token, token_with};
use herald_tests::sdk::{SdkClient, python};
use herald_tests::{Publisher, TestGateway, TestNats, eventually};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn connected_sdk(python: &std::path::Path, gateway: &TestGateway, token: &str) -> SdkClient {
    connected_over(python, &format!("http://{}", gateway.addr), token, json!(["websocket"])).await
}

/// An SDK client connected to `url` with `transports` (null: the default, polling then the upgrade).
async fn connected_over(python: &std::path::Path, url: &str, token: &str, transports: Value) -> SdkClient {
    let mut sdk = SdkClient::start(python, "socketio_client.py");
    sdk.send(json!({"op": "connect", "url": url, "token": token, "transports": transports})).await;
    let connected = sdk.wait_for("connected", |e| e["event"] == "connected" || e["event"] == "error").await;
    assert_eq!(connected["event"], "connected", "{connected}");
    sdk
}

async fn call(sdk: &mut SdkClient, event: &str, args: Value) -> Value {
    let before = sdk.named("ack").len();
    sdk.send(json!({"op": "call", "event": event, "args": args})).await;
    sdk.wait_count("ack", before + 1).await[before]["answer"].clone()
}

/// The (name, payload, seq) of the events received so far.
fn events(sdk: &SdkClient) -> Vec<(String, Value, u64)> {
    sdk.named("event")
        .into_iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["args"][0].clone(), e["args"][1]["seq"].as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn websocket_clients_get_their_user_all_and_topics_across_two_gateways() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let (one, two) = (TestGateway::start(&nats).await, TestGateway::start(&nats).await);
    let publisher = Publisher::new(&nats).await;
    let mut alice = connected_sdk(&python, &one, &token_with("sio-a", &["news"], 600)).await;
    let mut bob = connected_sdk(&python, &two, &token_with("sio-b", &["news"], 600)).await;
    assert_eq!(call(&mut alice, "sub", json!(["news"])).await, json!({"ok": true, "topic": "news"}));
    assert_eq!(call(&mut bob, "sub", json!(["news"])).await, json!({"ok": true, "topic": "news"}));
    let refused = call(&mut bob, "sub", json!(["secret"])).await;
    assert_eq!((refused["ok"].clone(), refused["error"]["code"].clone()), (json!(false), json!("forbidden")));

    let (to_alice, _) = publisher.publish_with("push.user.sio-a", &[("Herald-Type", "mail")], r#"{"n":1}"#).await;
    let to_bob = publisher.publish("push.user.sio-b", r#"{"n":2}"#).await;
    let everyone = publisher.publish("push.all", r#""all""#).await;
    let news = publisher.publish("push.topic.news", r#""news""#).await;

    alice.wait_count("event", 3).await;
    bob.wait_count("event", 3).await;
    assert_eq!(
        events(&alice),
        vec![
            ("mail".to_string(), json!({"n": 1}), to_alice),
            ("message".to_string(), json!("all"), everyone),
            ("message".to_string(), json!("news"), news),
        ]
    );
    assert_eq!(
        events(&bob),
        vec![
            ("message".to_string(), json!({"n": 2}), to_bob),
            ("message".to_string(), json!("all"), everyone),
            ("message".to_string(), json!("news"), news),
        ]
    );
    let first = &alice.named("event")[0]["args"];
    assert_eq!((first[1]["to"].clone(), first[2].clone()), (json!("user"), json!(to_alice.to_string())));
}

/// A message whose kind is a name Socket.IO reserves comes as `message`, its kind in the metadata.
#[tokio::test]
async fn a_reserved_kind_comes_as_message_with_the_kind_in_its_metadata() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let sdk = connected_sdk(&python, &gateway, &token("sio-kinds")).await;
    let headers = [("Herald-Type", "disconnect")];
    let (seq, _) = publisher.publish_with("push.user.sio-kinds", &headers, r#"{"n":1}"#).await;
    let event = sdk.wait_count("event", 1).await[0].clone();
    let (name, args) = (&event["name"], &event["args"]);
    assert_eq!((name, &args[0]), (&json!("message"), &json!({"n": 1})));
    assert_eq!(args[1], json!({"seq": seq, "to": "user", "kind": "disconnect", "ts": args[1]["ts"]}));
}

#[tokio::test]
async fn rpc_answers_through_the_ack_and_a_bad_token_gets_connect_error() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let client = nats.client().await;
    let mut echo = client.subscribe("herald.fn.echo").await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(request) = echo.next().await {
            let user = request.headers.as_ref().and_then(|h| h.get("Herald-User")).map(|v| v.to_string());
            let body: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
            let reply = json!({"user": user, "got": body}).to_string();
            responder.publish(request.reply.unwrap(), reply.into()).await.unwrap();
        }
    });
    let mut sdk = connected_sdk(&python, &gateway, &token("sio-r")).await;
    let answer = call(&mut sdk, "rpc", json!(["echo", {"n": 1}])).await;
    assert_eq!(answer, json!({"ok": true, "data": {"user": "sio-r", "got": {"n": 1}}}));
    let answer = call(&mut sdk, "rpc", json!(["nobody-home", {}])).await;
    assert_eq!(answer["error"]["code"], "no_function");
    let answer = call(&mut sdk, "dance", json!([])).await;
    assert_eq!(answer["error"]["code"], "unknown_event");

    let mut refused = SdkClient::start(&python, "socketio_client.py");
    let url = format!("http://{}", gateway.addr);
    refused.send(json!({"op": "connect", "url": url, "token": "not-a-jwt", "transports": ["websocket"]})).await;
    let error = refused.wait_for("connect_error", |e| e["event"] == "connect_error").await;
    assert!(error["data"]["message"].as_str().unwrap().contains("malformed token"), "{error}");
    assert!(refused.named("connected").is_empty());
}

#[tokio::test]
async fn polling_clients_and_the_default_transports_with_the_upgrade_get_everything() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let url = format!("http://{}", gateway.addr);
    let mut sdk = connected_over(&python, &url, &token_with("sio-p", &["news"], 600), Value::Null).await;
    assert_eq!(call(&mut sdk, "sub", json!(["news"])).await, json!({"ok": true, "topic": "news"}));
    let mut polling = connected_over(&python, &url, &token_with("sio-p", &["news"], 600), json!(["polling"])).await;
    assert_eq!(call(&mut polling, "sub", json!(["news"])).await, json!({"ok": true, "topic": "news"}));
    let mut published = Vec::new();
    for n in 0..10 {
        let subject = ["push.user.sio-p", "push.all", "push.topic.news"][n % 3];
        published.push(publisher.publish(subject, &n.to_string()).await);
    }
    let seqs: Vec<u64> =
        sdk.wait_count("event", 10).await.iter().map(|e| e["args"][1]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, published);
    let seqs: Vec<u64> =
        polling.wait_count("event", 10).await.iter().map(|e| e["args"][1]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, published);
    polling.send(json!({"op": "transport"})).await;
    assert_eq!(polling.wait_for("the transport", |e| e["event"] == "transport").await["name"], "polling");
    assert_eq!(call(&mut polling, "rpc", json!(["nobody-home", {}])).await["error"]["code"], "no_function");
    // python-socketio upgrades to the WebSocket after the handshake on polling.
    sdk.send(json!({"op": "transport"})).await;
    let transport = sdk.wait_for("the transport", |e| e["event"] == "transport").await;
    assert_eq!(transport["name"], "websocket");
    let answer = call(&mut sdk, "rpc", json!(["nobody-home", {}])).await;
    assert_eq!(answer["error"]["code"], "no_function");
}

#[tokio::test]
async fn sub_takes_since_as_the_offset_string_events_carry() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut sdk = connected_sdk(&python, &gateway, &token_with("sio-s", &["news"], 600)).await;
    let first = publisher.publish("push.topic.news", r#""one""#).await;
    let second = publisher.publish("push.topic.news", r#""two""#).await;
    let answer = call(&mut sdk, "sub", json!(["news", first.to_string()])).await;
    assert_eq!(answer, json!({"ok": true, "topic": "news"}));
    sdk.wait_count("event", 1).await;
    assert_eq!(events(&sdk), vec![("message".to_string(), json!("two"), second)]);
}

#[tokio::test]
async fn a_polling_client_reconnects_by_itself_after_its_gateway_restarts() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let first = TestGateway::start(&nats).await;
    let addr = first.addr;
    let publisher = Publisher::new(&nats).await;
    let mut sdk = SdkClient::start(&python, "socketio_client.py");
    let url = format!("http://{addr}");
    let connect =
        json!({"op": "connect", "url": url, "token": token("sio-re"), "transports": ["polling"], "reconnection": true});
    sdk.send(connect).await;
    sdk.wait_count("connected", 1).await;

    first.shutdown().await;
    let disconnected = sdk.wait_count("disconnected", 1).await;
    let _second = TestGateway::start_with(&nats, |config| config.listen = addr).await;
    // python-socketio stays away after Engine.IO's close packet ("io server disconnect").
    sdk.wait_count("connected", 2).await;
    assert_eq!(disconnected[0]["reason"], "transport error");
    let seq = publisher.publish("push.user.sio-re", r#""back""#).await;
    sdk.wait_count("event", 1).await;
    assert_eq!(events(&sdk), vec![("message".to_string(), json!("back"), seq)]);
}

/// python-engineio drops a connection whose poll brings more than 16 packets (with them): a burst
/// reaches a polling client sixteen packets a poll.
#[tokio::test]
async fn a_burst_reaches_a_polling_python_client_whole() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let url = format!("http://{}", gateway.addr);
    let polling = connected_over(&python, &url, &token("sio-burst"), json!(["polling"])).await;
    let mut acks = Vec::new();
    for n in 0..60 {
        acks.push(publisher.send("push.user.sio-burst", &[], &n.to_string()).await);
    }
    let mut published = Vec::new();
    for ack in acks {
        published.push(ack.await.unwrap().sequence);
    }
    let seqs: Vec<u64> =
        polling.wait_count("event", 60).await.iter().map(|e| e["args"][1]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, published);
    assert!(polling.named("disconnected").is_empty(), "{:?}", polling.named("disconnected"));
}

/// A POST over the frame limit ends the polling session, as Engine.IO's server does: it must not
/// live on without the client's packets.
#[tokio::test]
async fn a_post_over_the_limit_ends_the_polling_session() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.max_frame_bytes = 4096).await;
    let http = reqwest::Client::new();
    let url = gateway.http_url("/socket.io/?EIO=4&transport=polling");
    let open = http.get(&url).send().await.unwrap().text().await.unwrap();
    let sid: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    let url = format!("{url}&sid={}", sid["sid"].as_str().unwrap());
    let connect = format!("40{}", json!({"token": token("sio-big")}));
    assert_eq!(http.post(&url).body(connect).send().await.unwrap().status(), 200);
    assert!(http.get(&url).send().await.unwrap().text().await.unwrap().starts_with("40{"));

    let big = format!("42[\"sub\",\"{}\"]", "x".repeat(5000));
    let refused = http.post(&url).body(big).send().await.unwrap();
    assert_eq!(refused.status(), 413);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"], "too_large");
    eventually("the session gone", Duration::from_secs(10), || async {
        let body = http.get(&url).send().await.unwrap().text().await.unwrap();
        body.contains("Session ID unknown").then_some(())
    })
    .await;
}

/// Engine.IO takes one GET at a time per session: a second while the first waits is answered 400
/// (`Bad request`), as Engine.IO's server does, and the session ends (the first GET returns).
#[tokio::test]
async fn a_second_poll_while_one_waits_ends_the_polling_session() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();
    let url = gateway.http_url("/socket.io/?EIO=4&transport=polling");
    let open = http.get(&url).send().await.unwrap().text().await.unwrap();
    let sid: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    let url = format!("{url}&sid={}", sid["sid"].as_str().unwrap());
    let connect = format!("40{}", json!({"token": token("sio-overlap")}));
    assert_eq!(http.post(&url).body(connect).send().await.unwrap().status(), 200);
    assert!(http.get(&url).send().await.unwrap().text().await.unwrap().starts_with("40{"));

    // Nothing to send: each GET waits (until the next ping), so the two overlap.
    let poll = || async { http.get(&url).send().await.unwrap() };
    let (first, second) = tokio::join!(poll(), poll());
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    let refused = if statuses[0] == 400 { first } else { second };
    statuses.sort();
    assert_eq!(statuses, [200, 400]);
    assert_eq!(refused.json::<Value>().await.unwrap(), json!({"code": 3, "message": "Bad request"}));
    eventually("the session gone", Duration::from_secs(10), || async {
        let body = http.get(&url).send().await.unwrap().text().await.unwrap();
        body.contains("Session ID unknown").then_some(())
    })
    .await;
}

/// The Engine.IO `sid` is the polling session's key: whoever knows it polls and posts as the
/// client. Nothing public gives it away: not `socket.id` (which apps log and send to backends),
/// not the private `pid`, not the connection's id in events and the API.
#[tokio::test]
async fn the_socket_id_and_the_pid_open_no_polling_session() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let http = reqwest::Client::new();
    let mut events = nats.client().await.subscribe("herald.events.connect").await.unwrap();
    let base = gateway.http_url("/socket.io/?EIO=4&transport=polling");
    let open = http.get(&base).send().await.unwrap().text().await.unwrap();
    let engine_sid = serde_json::from_str::<Value>(open.strip_prefix('0').unwrap()).unwrap()["sid"].clone();
    let url = format!("{base}&sid={}", engine_sid.as_str().unwrap());
    let connect = format!("40{}", json!({"token": token("sio-victim")}));
    assert_eq!(http.post(&url).body(connect).send().await.unwrap().status(), 200);
    let answer = http.get(&url).send().await.unwrap().text().await.unwrap();
    let answer: Value = serde_json::from_str(answer.strip_prefix("40").unwrap()).unwrap();
    let (socket_id, pid) = (answer["sid"].as_str().unwrap(), answer["pid"].as_str().unwrap());
    assert!(socket_id != pid && engine_sid != socket_id && engine_sid != pid, "{engine_sid} {answer}");
    let event = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap();
    let conn = serde_json::from_slice::<Value>(&event.payload).unwrap()["conn"].as_str().unwrap().to_string();
    assert_ne!(engine_sid, conn.as_str());

    for known in [socket_id, pid, conn.as_str()] {
        let stolen = format!("{base}&sid={known}");
        let post = http.post(&stolen).body(r#"421["rpc","prefs.set",{"muted":["mail"]}]"#).send().await.unwrap();
        assert_eq!(post.status(), 400, "a POST with {known}");
        let poll = http.get(&stolen).send().await.unwrap().json::<Value>().await.unwrap();
        assert_eq!(poll["message"], "Session ID unknown", "a poll with {known}");
    }
    // The client's own session still has its messages.
    let seq = publisher.publish("push.user.sio-victim", r#"{"private":1}"#).await;
    let poll = http.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(poll.contains(r#"{"private":1}"#) && poll.contains(&seq.to_string()), "{poll}");
}

#[tokio::test]
async fn bad_engine_io_requests_get_engine_io_errors() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();
    for (query, code) in
        [("EIO=4&transport=flash", 0), ("EIO=3&transport=websocket", 5), ("EIO=4&transport=polling&sid=nope", 1)]
    {
        let response = http.get(gateway.http_url(&format!("/socket.io/?{query}"))).send().await.unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(response.json::<Value>().await.unwrap()["code"], code, "{query}");
    }
}

#[tokio::test]
async fn a_connect_refused_over_long_polling_gets_its_connect_error_at_the_next_poll() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();
    let refused = [
        ("40/admin,", "44/admin,{", (400, "bad_request")),
        ("40{\"token\":\"not-a-jwt\"}", "44{", (401, "unauthorized")),
    ];
    for (connect, answer, (status, reason)) in refused {
        let url = gateway.http_url("/socket.io/?EIO=4&transport=polling");
        let open = http.get(&url).send().await.unwrap().text().await.unwrap();
        let sid: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
        let url = format!("{url}&sid={}", sid["sid"].as_str().unwrap());
        assert_eq!(http.post(&url).body(connect).send().await.unwrap().status(), 200);
        // The session has refused the CONNECT (and ended) by the time the client polls.
        eventually("the refusal counted", Duration::from_secs(10), || async {
            (gateway.refusals(status, reason).await == 1.0).then_some(())
        })
        .await;
        let poll = http.get(&url).send().await.unwrap();
        assert_eq!(poll.status(), 200, "{connect}");
        let refusal = poll.text().await.unwrap();
        assert!(refusal.starts_with(answer), "{connect}: {refusal}");
        // Then the session is gone.
        let gone = http.get(&url).send().await.unwrap();
        let body = gone.text().await.unwrap();
        assert!(body == "6" || body.contains("Session ID unknown"), "{body}");
    }
}

/// A raw Socket.IO connection.
struct Raw(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>);

impl Raw {
    async fn open(gateway: &TestGateway) -> Raw {
        let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", gateway.addr);
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
        let mut raw = Raw(stream);
        let open = raw.next().await;
        assert!(open.starts_with("0{"), "{open}");
        raw
    }

    async fn send(&mut self, text: &str) {
        self.0.send(Message::text(text)).await.unwrap();
    }

    /// The next text packet, pings answered.
    async fn next(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.0.next()).await.expect("a packet in time");
            match message {
                Some(Ok(Message::Text(text))) if text.as_str() == "2" => self.send("3").await,
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Close(close))) => return format!("close {close:?}"),
                Some(Ok(_)) => continue,
                other => panic!("the connection ended: {other:?}"),
            }
        }
    }

    /// The JSON of the next packet after its `prefix`.
    async fn expect(&mut self, prefix: &str) -> Value {
        let packet = self.next().await;
        let json = packet.strip_prefix(prefix).unwrap_or_else(|| panic!("expected {prefix}…, got {packet}"));
        serde_json::from_str(json).unwrap()
    }
}

#[tokio::test]
async fn connection_state_recovery_replays_exactly_from_the_offset() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;

    let mut raw = Raw::open(&gateway).await;
    raw.send(&format!("40{}", json!({"token": token("sio-x")}))).await;
    let connected = raw.expect("40").await;
    let pid = connected["pid"].as_str().unwrap().to_string();
    let sid = connected["sid"].clone();
    let first = publisher.publish("push.user.sio-x", "1").await;
    let event = raw.expect("42").await;
    assert_eq!(event, json!(["message", 1, event[2].clone(), first.to_string()]));
    drop(raw);

    let missed = [publisher.publish("push.user.sio-x", "2").await, publisher.publish("push.all", "3").await];
    let mut raw = Raw::open(&gateway).await;
    let auth = json!({"token": token("sio-x"), "pid": pid, "offset": first.to_string()});
    raw.send(&format!("40{auth}")).await;
    // The replayed events come first (clients hold them until the CONNECT answer), then the answer,
    // which says by its pid whether everything after the offset was there.
    for seq in missed {
        assert_eq!(raw.expect("42").await[3], json!(seq.to_string()));
    }
    let answer = raw.expect("40").await;
    assert_eq!(answer["pid"], pid, "the same pid: recovered");
    // As socket.io keeps `socket.id` across a recovery.
    assert_eq!(answer["sid"], sid, "the same socket id");
    let live = publisher.publish("push.user.sio-x", "4").await;
    assert_eq!(raw.expect("42").await[3], json!(live.to_string()));
    drop(raw);
    // The offset as a number does as well.
    let missed = publisher.publish("push.user.sio-x", "5").await;
    let mut raw = Raw::open(&gateway).await;
    raw.send(&format!("40{}", json!({"token": token("sio-x"), "pid": pid, "offset": live}))).await;
    assert_eq!(raw.expect("42").await[3], json!(missed.to_string()));
    assert_eq!(raw.expect("40").await["pid"], pid, "recovered");

    // A bad offset, another namespace or no token: CONNECT_ERROR with the reason, in the namespace
    // asked for (a client hears only its own).
    for (connect, answer) in [
        (format!("40{}", json!({"token": token("sio-x"), "pid": "p", "offset": "x"})), "44{"),
        ("40/admin,".to_string(), "44/admin,{"),
        ("40".to_string(), "44{"),
    ] {
        let mut raw = Raw::open(&gateway).await;
        raw.send(&connect).await;
        let refusal = raw.next().await;
        assert!(refusal.starts_with(answer), "{connect}: {refusal}");
        let message: Value = serde_json::from_str(&refusal[answer.len() - 1..]).unwrap();
        assert!(message["message"].is_string(), "{refusal}");
    }
    // Each refusal is counted as `/ws` counts the same error.
    assert_eq!((gateway.refusals(400, "bad_request").await, gateway.refusals(401, "unauthorized").await), (2.0, 1.0));
}

/// Connects `user` (recovering with `pid` and `offset` when given) and returns the CONNECT
/// answer's pid and the offsets of the events that came before it.
async fn recover(gateway: &TestGateway, user: &str, from: Option<(&str, u64)>) -> (Raw, String, Vec<u64>) {
    recover_as(gateway, &token(user), from).await
}

/// [`recover`] with `token`.
async fn recover_as(gateway: &TestGateway, token: &str, from: Option<(&str, u64)>) -> (Raw, String, Vec<u64>) {
    let mut raw = Raw::open(gateway).await;
    let auth = match from {
        Some((pid, offset)) => json!({"token": token, "pid": pid, "offset": offset.to_string()}),
        None => json!({"token": token}),
    };
    raw.send(&format!("40{auth}")).await;
    let mut replayed = Vec::new();
    loop {
        let packet = raw.next().await;
        if let Some(connect) = packet.strip_prefix("40") {
            let pid = serde_json::from_str::<Value>(connect).unwrap()["pid"].as_str().unwrap().to_string();
            return (raw, pid, replayed);
        }
        let event: Value = serde_json::from_str(packet.strip_prefix("42").expect("an event")).unwrap();
        replayed.push(event[3].as_str().unwrap().parse().unwrap());
    }
}

#[tokio::test]
async fn a_recovery_that_cannot_replay_everything_gets_a_new_pid_and_what_the_stream_still_has() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.stream.stream_max_msgs_per_subject = 2).await;
    let publisher = Publisher::new(&nats).await;
    let (raw, pid, _) = recover(&gateway, "sio-t", None).await;
    drop(raw);
    let base = publisher.publish("push.user.nobody", "x").await;
    let mut sent = Vec::new();
    for n in 0..3 {
        sent.push(publisher.publish("push.user.sio-t", &n.to_string()).await);
    }
    // The stream keeps two of the three: not recovered, and the two follow.
    let (raw, next_pid, replayed) = recover(&gateway, "sio-t", Some((&pid, base))).await;
    assert_eq!((replayed, next_pid.clone()), (sent[1..].to_vec(), format!("{pid}.1")));
    drop(raw);
    // From the new pid, nothing is missing: recovered, with that pid back.
    let (mut raw, again, replayed) = recover(&gateway, "sio-t", Some((&next_pid, sent[2]))).await;
    assert_eq!((replayed, again), (Vec::new(), next_pid));
    let live = publisher.publish("push.user.sio-t", "live").await;
    assert_eq!(raw.expect("42").await[3], json!(live.to_string()));
    assert_eq!(gateway.metric("herald_gateway_replays_incomplete_total").await, 1.0);
    // A pid this server could not have given is refused.
    let mut raw = Raw::open(&gateway).await;
    raw.send(&format!("40{}", json!({"token": token("sio-t"), "pid": "a b", "offset": "1"}))).await;
    assert!(raw.expect("44").await["message"].as_str().unwrap().contains("pid"));
}

/// A recovery with a pid whose state is not kept, here another user's, is not recovered and starts
/// a lineage of its own: it shared the pid's root, so that a second recovery from the pid it was
/// given gave the other user's public `socket.id`'s lineage to both.
#[tokio::test]
async fn a_recovery_with_another_users_pid_starts_a_lineage_of_its_own() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let (_ada, ada_pid, _) = recover(&gateway, "sio-ada", None).await;
    let (_bob, bob_pid, replayed) = recover(&gateway, "sio-bob", Some((&ada_pid, 0))).await;
    let root = |pid: &str| pid.split('.').next().unwrap().to_string();
    assert_eq!(replayed, Vec::<u64>::new());
    assert!(root(&bob_pid) != root(&ada_pid), "{bob_pid} shares the lineage of {ada_pid}");
}

/// The key of `user`'s one Socket.IO state in KV (`<user>.socketio-<digest of its pid's root>`).
async fn state_key(nats: &TestNats, user: &str) -> String {
    let states = nats.jetstream().await.get_key_value("herald-socketio").await.unwrap();
    let prefix = format!("{user}.socketio-");
    eventually("the state kept", Duration::from_secs(30), || async {
        let keys: Vec<String> = states.keys().await.ok()?.filter_map(|key| async { key.ok() }).collect().await;
        keys.into_iter().find(|key| key.starts_with(&prefix))
    })
    .await
}

/// The topics a Socket.IO state is subscribed to, as KV keeps them for its recovery, once `expected`.
async fn kept_topics(nats: &TestNats, key: &str, expected: Option<Value>) {
    let states = nats.jetstream().await.get_key_value("herald-socketio").await.unwrap();
    eventually("the state's topics kept", Duration::from_secs(30), || async {
        let kept = states.get(key).await.unwrap().map(|value| serde_json::from_slice::<Value>(&value).unwrap());
        (kept == expected).then_some(())
    })
    .await;
}

/// Subscribes (`sub`) or unsubscribes (`unsub`) `topic` with ack `id`, and waits for the answer.
async fn change_topic(raw: &mut Raw, event: &str, topic: &str, id: u32) {
    raw.send(&format!("42{id}{}", json!([event, topic]))).await;
    assert_eq!(raw.expect(&format!("43{id}")).await, json!([{"ok": true, "topic": topic}]));
}

/// A recovered state has its topics back, on another gateway too: what they got meanwhile is
/// replayed with the rest, and they go on live; a topic dropped before the disconnect stays dropped.
#[tokio::test]
async fn a_recovered_state_keeps_its_topics_on_another_gateway() {
    let nats = TestNats::start().await;
    let (one, two) = (TestGateway::start(&nats).await, TestGateway::start(&nats).await);
    let publisher = Publisher::new(&nats).await;
    let token = token_with("sio-r", &["news", "sport"], 600);
    let (mut raw, pid, _) = recover_as(&one, &token, None).await;
    change_topic(&mut raw, "sub", "news", 1).await;
    change_topic(&mut raw, "sub", "sport", 2).await;
    change_topic(&mut raw, "unsub", "sport", 3).await;
    kept_topics(&nats, &state_key(&nats, "sio-r").await, Some(json!({"topics": ["news"]}))).await;
    let seen = publisher.publish("push.topic.news", "1").await;
    assert_eq!(raw.expect("42").await[3], json!(seen.to_string()));
    drop(raw);

    let missed = publisher.publish("push.topic.news", "2").await;
    publisher.publish("push.topic.sport", "not subscribed").await;
    let personal = publisher.publish("push.user.sio-r", "3").await;
    let (mut raw, answer, replayed) = recover_as(&two, &token, Some((&pid, seen))).await;
    assert_eq!((replayed, answer), (vec![missed, personal], pid), "recovered, topic and all");
    publisher.publish("push.topic.sport", "still not subscribed").await;
    let live = publisher.publish("push.topic.news", "4").await;
    assert_eq!(raw.expect("42").await[3], json!(live.to_string()));
}

/// A connection writes its state again when it closes, so that the recovery window counts from the
/// disconnect: a state that expired while its connection lived (removed by hand here) is recovered.
#[tokio::test]
async fn a_closing_connection_keeps_its_state_for_the_recovery_window_from_then() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = token_with("sio-c", &["news"], 600);
    let (mut raw, pid, _) = recover_as(&gateway, &token, None).await;
    change_topic(&mut raw, "sub", "news", 1).await;
    let key = state_key(&nats, "sio-c").await;
    kept_topics(&nats, &key, Some(json!({"topics": ["news"]}))).await;
    let states = nats.jetstream().await.get_key_value("herald-socketio").await.unwrap();
    states.purge(&key).await.unwrap();
    let seen = publisher.publish("push.topic.news", "1").await;
    assert_eq!(raw.expect("42").await[3], json!(seen.to_string()));
    drop(raw);
    kept_topics(&nats, &key, Some(json!({"topics": ["news"]}))).await;

    let missed = publisher.publish("push.topic.news", "2").await;
    let (_raw, answer, replayed) = recover_as(&gateway, &token, Some((&pid, seen))).await;
    assert_eq!((replayed, answer), (vec![missed], pid), "recovered");
}

/// A connection open longer than the recovery window writes its state again while it lives: a
/// state that expired meanwhile (removed by hand here) is back without any change of topics, so a
/// client whose connection is cut after a long while (a network change, a gateway killed) recovers.
#[tokio::test]
async fn a_long_connection_keeps_its_state_written_while_it_lives() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.stream.socketio_recovery_window = Duration::from_secs(4);
        // A ping a second: the state is written again with every one.
        c.heartbeat = Duration::from_secs(1);
    })
    .await;
    let token = token_with("sio-k", &["news"], 600);
    let (mut raw, _, _) = recover_as(&gateway, &token, None).await;
    change_topic(&mut raw, "sub", "news", 1).await;
    let key = state_key(&nats, "sio-k").await;
    kept_topics(&nats, &key, Some(json!({"topics": ["news"]}))).await;
    let states = nats.jetstream().await.get_key_value("herald-socketio").await.unwrap();
    // Acknowledged: what is read from here on was written after.
    states.purge(&key).await.unwrap();
    kept_topics(&nats, &key, Some(json!({"topics": ["news"]}))).await;
    drop(raw);
}

/// A live connection writes its state again once a heartbeat at most: a recovery window shorter
/// than two heartbeats is raised to that, or a state would expire while its connection lives.
#[tokio::test]
async fn a_recovery_window_under_two_heartbeats_is_raised_to_two() {
    let nats = TestNats::start().await;
    let _gateway = TestGateway::start_with(&nats, |c| {
        c.stream.socketio_recovery_window = Duration::from_secs(10);
        c.heartbeat = Duration::from_secs(25);
    })
    .await;
    let mut states = nats.jetstream().await.get_stream("KV_herald-socketio").await.unwrap();
    assert_eq!(states.info().await.unwrap().config.max_age, Duration::from_secs(50));
}

/// A state not written again within the recovery window is gone: the client is told it was not
/// recovered (a new pid), and it starts without its topics, with what the stream has after its offset.
#[tokio::test]
async fn a_state_past_the_recovery_window_is_not_recovered_and_has_no_topics() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.stream.socketio_recovery_window = Duration::from_secs(1);
        c.heartbeat = Duration::from_millis(500);
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let token = token_with("sio-w", &["news"], 600);
    let (mut raw, pid, _) = recover_as(&gateway, &token, None).await;
    let key = state_key(&nats, "sio-w").await;
    change_topic(&mut raw, "sub", "news", 1).await;
    let seen = publisher.publish("push.user.sio-w", "1").await;
    assert_eq!(raw.expect("42").await[3], json!(seen.to_string()));
    drop(raw);
    kept_topics(&nats, &key, None).await;

    let personal = publisher.publish("push.user.sio-w", "2").await;
    let (mut raw, answer, replayed) = recover_as(&gateway, &token, Some((&pid, seen))).await;
    assert_eq!(replayed, vec![personal]);
    // Not recovered: a new state, of a root of its own.
    assert!(answer.split('.').next() != Some(&pid), "{answer} recovers {pid}");
    publisher.publish("push.topic.news", "not subscribed any more").await;
    let live = publisher.publish("push.user.sio-w", "3").await;
    assert_eq!(raw.expect("42").await[3], json!(live.to_string()));
}

/// A message lost to a connection (noted under its Socket.IO state's device) makes the
/// recovery after it answer with a new pid, on any later connection of that state.
#[tokio::test]
async fn a_loss_noted_for_a_connections_state_is_reported_by_its_recovery() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let (mut raw, pid, _) = recover(&gateway, "sio-l", None).await;
    let seen = publisher.publish("push.user.sio-l", "1").await;
    assert_eq!(raw.expect("42").await[3], json!(seen.to_string()));
    drop(raw);
    // The gateway notes a loss as it would for an unrepairable gap (tests/tests/repair.rs).
    let cursors = nats.jetstream().await.get_key_value("herald-cursors").await.unwrap();
    let key = format!("{}.lost", state_key(&nats, "sio-l").await);
    cursors.put(&key, seen.to_string().into()).await.unwrap();
    let (raw, next_pid, replayed) = recover(&gateway, "sio-l", Some((&pid, seen))).await;
    assert_eq!((replayed, next_pid), (Vec::new(), format!("{pid}.1")), "not recovered");
    // Once that answer is written, the note is gone.
    herald_tests::eventually("the note removed", Duration::from_secs(30), || async {
        matches!(cursors.get(&key).await, Ok(None)).then_some(())
    })
    .await;
    drop(raw);
}

#[tokio::test]
async fn the_default_namespace_written_out_other_namespaces_and_an_rpc_without_ack_are_answered() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut raw = Raw::open(&gateway).await;
    // `/` written out is the default namespace.
    raw.send(&format!("40/,{}", json!({"token": token("sio-n")}))).await;
    assert!(raw.expect("40").await["sid"].is_string());
    // Another namespace is refused in that namespace; the connection goes on.
    raw.send("40/admin,").await;
    assert!(raw.expect("44/admin,").await["message"].as_str().unwrap().contains("namespace"));
    // A failed rpc without an ack is told as an `error` event, as a refused `sub` is.
    raw.send(r#"42["rpc","a.>",{}]"#).await;
    let error = raw.expect("42").await;
    assert_eq!((error[0].as_str(), error[1]["code"].as_str()), (Some("error"), Some("bad_request")), "{error}");
    // An event and its ack in the default namespace written out.
    raw.send(r#"42/,7["rpc","a.>",{}]"#).await;
    assert_eq!(raw.expect("437").await[0]["error"]["code"], "bad_request");
    // Leaving the namespace it was refused changes nothing.
    raw.send("41/admin,").await;
    let seq = publisher.publish("push.user.sio-n", "1").await;
    assert_eq!(raw.expect("42").await[3], json!(seq.to_string()));
}

#[tokio::test]
async fn malformed_packets_close_the_socket_and_a_disconnect_ends_it() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    for (packet, expected) in [("4x", "Policy"), ("42not json", "Policy"), ("9", "Policy"), ("41", "Normal")] {
        let mut raw = Raw::open(&gateway).await;
        raw.send(&format!("40{}", json!({"token": token("sio-m")}))).await;
        raw.expect("40").await;
        // A second CONNECT to the same namespace is ignored; the packet after it decides.
        raw.send("40").await;
        raw.send(packet).await;
        let close = raw.next().await;
        assert!(close.starts_with("close") && close.contains(expected), "{packet}: {close}");
    }
}
