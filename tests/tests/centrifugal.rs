//! The Centrifugal protocol v2 (JSON) at `/connection/websocket`, driven by centrifuge-python (the
//! official SDK, from PyPI) and, for malformed input, by raw frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_tests::gateway::{token, token_with};
use herald_tests::sdk::{SdkClient, python};
use herald_tests::{Publisher, TestGateway, TestNats, eventually};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn centrifugal_url(gateway: &TestGateway) -> String {
    format!("ws://{}/connection/websocket", gateway.addr)
}

/// An SDK client connected as the token's user, its server-side subscriptions confirmed.
async fn connected_sdk(python: &std::path::Path, gateway: &TestGateway, token: &str) -> SdkClient {
    connected_in(python, gateway, token, false).await
}

/// The same, in the Protobuf encoding when `protobuf`.
async fn connected_in(python: &std::path::Path, gateway: &TestGateway, token: &str, protobuf: bool) -> SdkClient {
    let mut sdk = SdkClient::start(python, "centrifugal_client.py");
    let url = centrifugal_url(gateway);
    sdk.send(json!({"op": "connect", "url": url, "token": token, "protobuf": protobuf})).await;
    sdk.wait_for("connected", |e| e["event"] == "connected").await;
    sdk.wait_count("subscribed", 2).await;
    sdk
}

/// Push function `echo`: answers `{"user": <caller>, "got": <request>}`.
async fn echo_function(nats: &TestNats) -> tokio::task::JoinHandle<()> {
    let client = nats.client().await;
    let mut echo = client.subscribe("herald.fn.echo").await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(request) = echo.next().await {
            let user = request.headers.as_ref().and_then(|h| h.get("Herald-User")).map(|v| v.to_string());
            let body: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
            let reply = json!({"user": user, "got": body}).to_string();
            client.publish(request.reply.unwrap(), reply.into()).await.unwrap();
        }
    })
}

async fn subscribe(sdk: &mut SdkClient, channel: &str) -> Value {
    sdk.send(json!({"op": "subscribe", "channel": channel})).await;
    sdk.wait_for(&format!("subscribed to {channel}"), |e| e["event"] == "subscribed" && e["channel"] == channel).await
}

/// The publications received so far: (channel, offset, data).
fn pubs(sdk: &SdkClient) -> Vec<(String, u64, Value)> {
    sdk.named("pub")
        .into_iter()
        .map(|e| (e["channel"].as_str().unwrap().to_string(), e["offset"].as_u64().unwrap(), e["data"].clone()))
        .collect()
}

async fn wait_pubs(sdk: &SdkClient, count: usize) -> Vec<(String, u64, Value)> {
    sdk.wait_count("pub", count).await;
    pubs(sdk)
}

#[tokio::test]
async fn the_sdk_gets_its_personal_channel_all_and_topics_with_offsets_and_tags() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut sdk = connected_sdk(&python, &gateway, &token_with("cf1", &["news"], 600)).await;
    let mut server_subs: Vec<_> = sdk.named("subscribed").iter().map(|e| e["channel"].to_string()).collect();
    server_subs.sort();
    assert_eq!(server_subs, vec!["\"#cf1\"", "\"all\""]);

    let headers = [("Herald-Type", "mail"), ("Nats-Msg-Id", "m-1")];
    let (personal, _) = publisher.publish_with("push.user.cf1", &headers, r#"{"text":"hi"}"#).await;
    publisher.publish("push.user.someone-else", r#""not yours""#).await;
    let everyone = publisher.publish("push.all", r#""to all""#).await;
    subscribe(&mut sdk, "news").await;
    let news = publisher.publish("push.topic.news", r#""headline""#).await;

    let got = wait_pubs(&sdk, 3).await;
    assert_eq!(
        got,
        vec![
            ("#cf1".to_string(), personal, json!({"text": "hi"})),
            ("all".to_string(), everyone, json!("to all")),
            ("news".to_string(), news, json!("headline")),
        ]
    );
    assert_eq!(sdk.named("pub")[0]["tags"], json!({"kind": "mail", "id": "m-1"}));
}

#[tokio::test]
async fn a_payload_written_on_several_lines_reaches_json_clients_whole_and_keeps_them_connected() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let sdk = connected_sdk(&python, &gateway, &token("cf-lines")).await;
    // As `jq .` or a pretty-printing serializer writes it.
    let pretty = publisher.publish("push.all", "{\r\n  \"text\": \"two\\nlines\",\n  \"n\": [1,\n 2]\n}\n").await;
    let next = publisher.publish("push.user.cf-lines", r#""after""#).await;
    assert_eq!(
        wait_pubs(&sdk, 2).await,
        vec![
            ("all".to_string(), pretty, json!({"text": "two\nlines", "n": [1, 2]})),
            ("#cf-lines".to_string(), next, json!("after")),
        ]
    );
    assert!(sdk.named("disconnected").is_empty(), "{:?}", sdk.named("disconnected"));
}

#[tokio::test]
async fn forbidden_channels_get_the_permission_error_and_rpc_and_presence_answer() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let _echo = echo_function(&nats).await;
    let mut sdk = connected_sdk(&python, &gateway, &token_with("cf2", &["news"], 600)).await;

    for channel in ["secret", "#someone-else"] {
        sdk.send(json!({"op": "subscribe", "channel": channel})).await;
        // A permanent error ends the subscription: the SDK reports it as unsubscribed with the code.
        let refused =
            sdk.wait_for("a refused subscription", |e| e["event"] == "unsubscribed" && e["channel"] == channel).await;
        assert_eq!(refused["code"], 103, "{refused}");
    }

    sdk.send(json!({"op": "rpc", "method": "echo", "data": {"n": 1}})).await;
    let answer = sdk.wait_for("rpc answer", |e| e["event"] == "rpc").await;
    assert_eq!(answer["data"], json!({"user": "cf2", "got": {"n": 1}}));
    sdk.send(json!({"op": "rpc", "method": "nobody-home", "data": {}})).await;
    let refused = sdk.wait_for("rpc error", |e| e["event"] == "reply_error").await;
    assert_eq!(refused["code"], 104);

    sdk.send(json!({"op": "presence_stats", "channel": "#cf2"})).await;
    let stats = sdk.wait_for("presence stats", |e| e["event"] == "presence_stats").await;
    assert_eq!((stats["num_clients"].as_u64(), stats["num_users"].as_u64()), (Some(1), Some(1)));
}

#[tokio::test]
async fn after_a_gateway_restart_the_sdk_recovers_exactly_the_missed_publications() {
    recovers_after_a_restart(false).await;
}

#[tokio::test]
async fn in_the_protobuf_encoding_the_sdk_also_gets_its_channels_rpc_and_recovery() {
    recovers_after_a_restart(true).await;
}

async fn recovers_after_a_restart(protobuf: bool) {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let addr = gateway.addr;
    let publisher = Publisher::new(&nats).await;
    let _echo = echo_function(&nats).await;
    let mut sdk = connected_in(&python, &gateway, &token_with("cf3", &["news"], 600), protobuf).await;
    sdk.send(json!({"op": "rpc", "method": "echo", "data": {"n": 1}})).await;
    let answer = sdk.wait_for("rpc answer", |e| e["event"] == "rpc").await;
    assert_eq!(answer["data"], json!({"user": "cf3", "got": {"n": 1}}));
    subscribe(&mut sdk, "news").await;
    let seen = [
        publisher.publish("push.user.cf3", "1").await,
        publisher.publish("push.all", "2").await,
        publisher.publish("push.topic.news", "3").await,
    ];
    assert_eq!(wait_pubs(&sdk, 3).await.iter().map(|p| p.1).collect::<Vec<_>>(), seen);

    gateway.shutdown().await;
    sdk.wait_for("the 3001 shutdown disconnect", |e| e["event"] == "connecting" && e["code"] == 3001).await;
    let mut missed = Vec::new();
    for (subject, body) in [
        ("push.user.cf3", "4"),
        ("push.topic.news", "5"),
        ("push.all", "6"),
        ("push.user.cf3", "7"),
        ("push.topic.news", "8"),
    ] {
        missed.push(publisher.publish(subject, body).await);
    }
    let _gateway = TestGateway::start_with(&nats, |config| config.listen = addr).await;

    sdk.wait_count("connected", 2).await;
    let recovered = sdk.wait_count("subscribed", 6).await;
    for event in &recovered[3..] {
        assert_eq!(
            (event["was_recovering"].as_bool(), event["recovered"].as_bool()),
            (Some(true), Some(true)),
            "{event}"
        );
    }
    let got = wait_pubs(&sdk, 8).await;
    let by_channel = |channel: &str| -> Vec<u64> { got[3..].iter().filter(|p| p.0 == channel).map(|p| p.1).collect() };
    assert_eq!(by_channel("#cf3"), vec![missed[0], missed[3]]);
    assert_eq!(by_channel("news"), vec![missed[1], missed[4]]);
    assert_eq!(by_channel("all"), vec![missed[2]]);
    let live = publisher.publish("push.topic.news", "9").await;
    assert_eq!(wait_pubs(&sdk, 9).await[8].1, live);
    assert_eq!(sdk.named("pub").len(), 9, "nothing twice: {:?}", pubs(&sdk));
}

#[tokio::test]
async fn recovered_json_publications_carry_the_payloads_as_published() {
    recovered_payloads_are_as_published(false).await;
}

#[tokio::test]
async fn recovered_protobuf_publications_carry_the_payloads_as_published() {
    recovered_payloads_are_as_published(true).await;
}

/// Payloads a JSON value would change: a number past 64 bits, a JSON string (Protobuf carries its
/// quotes), members in no sorted order.
async fn recovered_payloads_are_as_published(protobuf: bool) {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let addr = gateway.addr;
    let publisher = Publisher::new(&nats).await;
    let sdk = connected_in(&python, &gateway, &token("cf-exact"), protobuf).await;
    publisher.publish("push.user.cf-exact", "0").await;
    wait_pubs(&sdk, 1).await;

    gateway.shutdown().await;
    sdk.wait_for("the 3001 shutdown disconnect", |e| e["event"] == "connecting" && e["code"] == 3001).await;
    let payloads = ["12345678901234567890123", r#""quoted""#, r#"{"b":1,"a":2}"#];
    for payload in payloads {
        publisher.publish("push.user.cf-exact", payload).await;
    }
    let _gateway = TestGateway::start_with(&nats, |config| config.listen = addr).await;
    sdk.wait_count("pub", 4).await;
    let texts: Vec<Value> = sdk.named("pub")[1..].iter().map(|p| p["text"].clone()).collect();
    assert_eq!(texts, payloads.map(Value::from));
}

#[tokio::test]
async fn a_refreshed_token_keeps_the_connection_past_the_first_expiry() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let first = token_with("cf4", &[], 3);
    let expires = herald_shared::token::now_secs() + 3;
    let mut sdk = connected_sdk(&python, &gateway, &first).await;
    sdk.send(json!({"op": "set_token", "token": token("cf4")})).await;
    sdk.wait_for("the SDK asked for a new token", |e| e["event"] == "token_requested").await;
    eventually("the first token expired", Duration::from_secs(10), || async {
        (herald_shared::token::now_secs() > expires + 1).then_some(())
    })
    .await;
    let seq = publisher.publish("push.user.cf4", "still here").await;
    assert_eq!(wait_pubs(&sdk, 1).await[0].1, seq);
    assert_eq!(sdk.named("connected").len(), 1, "one connection throughout: {:?}", sdk.events());
    assert_eq!(sdk.named("connecting").len(), 1, "only the first connect: {:?}", sdk.events());
}

/// As Centrifugo's connection refresh, a refreshed token leaves the channels joined as they are
/// (a channel it no longer allows ends with the connection): the SDK keeps its connection and its
/// subscription past the first token's expiry.
#[tokio::test]
async fn a_refreshed_token_that_leaves_out_a_joined_channel_keeps_the_connection_and_the_channel() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let expires = herald_shared::token::now_secs() + 3;
    let mut sdk = connected_sdk(&python, &gateway, &token_with("cf5", &["news"], 3)).await;
    subscribe(&mut sdk, "news").await;
    sdk.send(json!({"op": "set_token", "token": token_with("cf5", &[], 600)})).await;
    sdk.wait_for("the SDK asked for a new token", |e| e["event"] == "token_requested").await;
    eventually("the first token expired", Duration::from_secs(10), || async {
        (herald_shared::token::now_secs() > expires + 1).then_some(())
    })
    .await;
    let news = publisher.publish("push.topic.news", r#""still joined""#).await;
    assert_eq!(wait_pubs(&sdk, 1).await, vec![("news".to_string(), news, json!("still joined"))]);
    assert_eq!(sdk.named("connected").len(), 1, "one connection throughout: {:?}", sdk.events());
    assert_eq!(sdk.named("connecting").len(), 1, "only the first connect: {:?}", sdk.events());
}

#[tokio::test]
async fn a_bad_token_is_a_terminal_invalid_token_disconnect() {
    let Some(python) = python() else { return };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut sdk = SdkClient::start(&python, "centrifugal_client.py");
    sdk.send(json!({"op": "connect", "url": centrifugal_url(&gateway), "token": "not-a-jwt"})).await;
    let disconnected = sdk.wait_for("disconnected", |e| e["event"] == "disconnected").await;
    assert_eq!(disconnected["code"], 3500, "{disconnected}");
}

/// A raw WebSocket on the Centrifugal endpoint.
struct Raw(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>);

impl Raw {
    async fn open(gateway: &TestGateway) -> Raw {
        let (stream, response) = tokio_tungstenite::connect_async(centrifugal_url(gateway)).await.expect("upgrade");
        assert!(response.headers().get("sec-websocket-protocol").is_none());
        Raw(stream)
    }

    async fn send(&mut self, text: &str) {
        self.0.send(Message::text(text)).await.unwrap();
    }

    /// The next text frame's JSON objects, or the close code.
    async fn next(&mut self) -> Result<Vec<Value>, Option<u16>> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.0.next()).await.expect("a frame in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(text.lines().map(|line| serde_json::from_str(line).unwrap()).collect());
                }
                Some(Ok(Message::Close(close))) => return Err(close.map(|c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                _ => return Err(None),
            }
        }
    }

    async fn reply(&mut self) -> Value {
        self.next().await.expect("a reply").remove(0)
    }
}

#[tokio::test]
async fn raw_frames_get_centrifugal_errors_and_disconnect_codes() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;

    // Anything but connect first, or no JSON: 3501 (bad request, do not reconnect).
    let mut raw = Raw::open(&gateway).await;
    raw.send(r#"{"id":1,"subscribe":{"channel":"news"}}"#).await;
    assert_eq!(raw.next().await, Err(Some(3501)));
    let mut raw = Raw::open(&gateway).await;
    raw.send("{not json").await;
    assert_eq!(raw.next().await, Err(Some(3501)));
    // A first message over the size limit: 1009, as later ones get.
    let small = TestGateway::start_with(&nats, |c| c.max_frame_bytes = 1024).await;
    let mut raw = Raw::open(&small).await;
    raw.send(&format!(r#"{{"id":1,"connect":{{"token":"{}"}}}}"#, "x".repeat(2048))).await;
    assert_eq!(raw.next().await, Err(Some(1009)));
    // An expired token: error 109, so the SDK fetches a new one.
    let mut raw = Raw::open(&gateway).await;
    raw.send(&json!({"id": 1, "connect": {"token": token_with("cf5", &[], -10)}}).to_string()).await;
    assert_eq!(raw.reply().await, json!({"id": 1, "error": {"code": 109, "message": "token expired"}}));
    // Each refusal is counted as `/ws` counts the same error.
    assert_eq!((gateway.refusals(400, "bad_request").await, gateway.refusals(401, "unauthorized").await), (2.0, 1.0));

    // Recovery with another stream's epoch is not claimed.
    let mut raw = Raw::open(&gateway).await;
    let subs = json!({"#cf5": {"recover": true, "offset": 1, "epoch": "another-stream"}});
    raw.send(&json!({"id": 1, "connect": {"token": token("cf5"), "subs": subs}}).to_string()).await;
    let connect = raw.reply().await;
    assert_eq!(connect["id"], 1);
    let personal = &connect["connect"]["subs"]["#cf5"];
    assert_eq!((personal["was_recovering"].as_bool(), personal["recovered"].as_bool()), (Some(true), Some(false)));
    assert_eq!(connect["connect"]["pong"], true);

    // Unknown methods and refused ones are answered; the connection stays.
    raw.send(r#"{"id":2,"dance":{}}"#).await;
    assert_eq!(raw.reply().await["error"]["code"], 104);
    raw.send(
        "{}\n{\"id\":3,\"publish\":{\"channel\":\"all\",\"data\":{}}}\n{\"id\":4,\"history\":{\"channel\":\"all\"}}",
    )
    .await;
    let replies = raw.next().await.unwrap();
    let replies: Vec<_> = replies
        .iter()
        .chain(&raw.next().await.unwrap())
        .map(|r| (r["id"].clone(), r["error"]["code"].clone(), r["error"]["temporary"].clone()))
        .collect();
    // What this server does not serve is not temporary: no retry helps.
    assert_eq!(replies, vec![(json!(3), json!(103), Value::Null), (json!(4), json!(108), Value::Null)]);
    raw.send(r#"{"id":5,"subscribe":{"channel":"all"}}"#).await;
    assert_eq!(raw.reply().await["error"]["code"], 105);
    // A command without an id breaks the protocol.
    raw.send(r#"{"rpc":{"method":"x"}}"#).await;
    assert_eq!(raw.next().await, Err(Some(3501)));

    // Commands in the frame of the connect run after it, in order; a second connect is a bad request.
    let mut raw = Raw::open(&gateway).await;
    let connect = json!({"id": 1, "connect": {"token": token_with("cf6", &["news"], 600)}});
    raw.send(&format!("{connect}\n{}", r#"{"id":2,"subscribe":{"channel":"news"}}"#)).await;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        replies.extend(raw.next().await.unwrap());
    }
    let ids: Vec<_> = replies.iter().map(|r| (r["id"].clone(), r["error"].is_null())).collect();
    assert_eq!(ids, vec![(json!(1), true), (json!(2), true)], "{replies:?}");
    assert_eq!(replies[1]["subscribe"]["epoch"], replies[0]["connect"]["subs"]["#cf6"]["epoch"]);
    raw.send(&json!({"id": 3, "connect": {"token": token("cf6")}}).to_string()).await;
    assert_eq!(raw.next().await, Err(Some(3501)));
}

/// The epoch of a connect reply's `#<user>` channel, or `None` when the connection was refused (the
/// stream is being replaced).
async fn epoch_of(gateway: &TestGateway, user: &str) -> Option<String> {
    let mut raw = Raw::open(gateway).await;
    raw.send(&json!({"id": 1, "connect": {"token": token(user)}}).to_string()).await;
    let reply = raw.next().await.ok()?.remove(0);
    Some(reply["connect"]["subs"][format!("#{user}")]["epoch"].as_str()?.to_string())
}

#[tokio::test]
async fn a_replaced_stream_has_another_epoch_and_old_offsets_are_not_recovered() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let before = epoch_of(&gateway, "cf6").await.expect("an epoch");
    let offset = publisher.publish("push.user.cf6", "old").await;

    nats.jetstream().await.delete_stream("HERALD").await.unwrap();
    // The gateway creates the stream again by itself.
    let after = eventually("a new epoch", Duration::from_secs(30), || async {
        epoch_of(&gateway, "cf6").await.filter(|epoch| *epoch != before)
    })
    .await;
    assert_ne!(after, before);

    let mut raw = Raw::open(&gateway).await;
    let subs = json!({"#cf6": {"recover": true, "offset": offset, "epoch": before}});
    raw.send(&json!({"id": 1, "connect": {"token": token("cf6"), "subs": subs}}).to_string()).await;
    let personal = raw.reply().await["connect"]["subs"]["#cf6"].clone();
    assert_eq!((personal["was_recovering"].as_bool(), personal["recovered"].as_bool()), (Some(true), Some(false)));
    assert_eq!(personal["epoch"], after);
}

/// An unsubscribe sent before its subscribe is answered (centrifuge-python does so) is answered
/// after it, and the channel is left: nothing of it comes any more, and the gateway keeps no route.
#[tokio::test]
async fn an_unsubscribe_while_subscribing_leaves_the_channel() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut raw = Raw::open(&gateway).await;
    raw.send(&json!({"id": 1, "connect": {"token": token_with("cf8", &["news"], 600)}}).to_string()).await;
    raw.reply().await;
    let subscriptions = gateway.metric("herald_gateway_subscriptions").await;

    let commands = [
        json!({"id": 2, "subscribe": {"channel": "news"}}),
        json!({"id": 3, "unsubscribe": {"channel": "news"}}),
        json!({"id": 4, "unsubscribe": {"channel": "news"}}),
    ];
    raw.send(&commands.map(|command| command.to_string()).join("\n")).await;
    let mut replies = Vec::new();
    while replies.len() < 3 {
        replies.extend(raw.next().await.expect("the replies"));
    }
    let at = |id: u64| replies.iter().position(|reply| reply["id"] == id).expect("a reply to each");
    assert!(at(2) < at(3), "the subscribe answered before the unsubscribe that undoes it: {replies:?}");
    assert!(replies[at(2)]["subscribe"].is_object(), "{replies:?}");
    assert_eq!(replies[at(3)], json!({"id": 3, "unsubscribe": {}}));
    assert_eq!(replies[at(4)], json!({"id": 4, "unsubscribe": {}}));
    eventually("the topic left", Duration::from_secs(10), || async {
        (gateway.metric("herald_gateway_subscriptions").await == subscriptions).then_some(())
    })
    .await;
    publisher.publish("push.topic.news", "not for the client").await;
    let mark = publisher.publish("push.user.cf8", "mark").await;
    let next = raw.next().await.unwrap();
    assert_eq!(
        (next[0]["push"]["channel"].as_str(), next[0]["push"]["pub"]["offset"].as_u64()),
        (Some("#cf8"), Some(mark))
    );
}

/// A client that loads its state by itself (the SDKs' `get_state`) asks with flag 2 for error 112
/// when a recovery cannot give everything; nothing of the channel reaches it until it subscribes
/// again. A tags filter, which Herald does not apply, is refused rather than ignored.
#[tokio::test]
async fn an_unrecoverable_position_is_error_112_when_asked_and_a_tags_filter_is_refused() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut raw = Raw::open(&gateway).await;
    raw.send(&json!({"id": 1, "connect": {"token": token_with("cf7", &["news"], 600)}}).to_string()).await;
    let epoch = raw.reply().await["connect"]["subs"]["#cf7"]["epoch"].clone();
    let subscriptions = gateway.metric("herald_gateway_subscriptions").await;

    let stale = json!({"channel": "news", "recover": true, "offset": 1, "epoch": "another-stream", "flag": 3});
    raw.send(&json!({"id": 2, "subscribe": stale}).to_string()).await;
    assert_eq!(raw.reply().await, json!({"id": 2, "error": {"code": 112, "message": "unrecoverable position"}}));
    // Subscribed to nothing: the session leaves the topic (a client that gives up leaves nothing behind).
    eventually("the topic left", Duration::from_secs(10), || async {
        (gateway.metric("herald_gateway_subscriptions").await == subscriptions).then_some(())
    })
    .await;
    publisher.publish("push.topic.news", "not for the client yet").await;
    let mark = publisher.publish("push.user.cf7", "mark").await;
    let next = raw.next().await.unwrap();
    assert_eq!(
        (next[0]["push"]["channel"].as_str(), next[0]["push"]["pub"]["offset"].as_u64()),
        (Some("#cf7"), Some(mark))
    );

    // Subscribed again from the position its state has: exactly what came after.
    let resume = json!({"channel": "news", "recover": true, "offset": mark, "epoch": epoch, "flag": 3});
    raw.send(&json!({"id": 3, "subscribe": resume}).to_string()).await;
    let later = publisher.publish("push.topic.news", "after").await;
    let reply = raw.reply().await;
    assert_eq!((reply["id"].as_u64(), reply["subscribe"]["recovered"].as_bool()), (Some(3), Some(true)), "{reply}");
    let mut offsets: Vec<u64> = reply["subscribe"]["publications"]
        .as_array()
        .map(|pubs| pubs.iter().map(|p| p["offset"].as_u64().unwrap()).collect())
        .unwrap_or_default();
    while offsets.is_empty() {
        offsets.extend(raw.next().await.unwrap().iter().filter_map(|p| p["push"]["pub"]["offset"].as_u64()));
    }
    assert_eq!(offsets, vec![later]);

    let filtered = json!({"channel": "sport", "tf": {"cmp": "eq", "key": "kind", "val": "goal"}});
    raw.send(&json!({"id": 4, "subscribe": filtered}).to_string()).await;
    assert_eq!(raw.reply().await["error"]["code"], 107);
}
