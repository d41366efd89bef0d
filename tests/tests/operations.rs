//! Production operations at the gateway: the HTTP API for backends without NATS, the Origin
//! allow-list, connection limits and trusted proxies.

use herald_shared::frame::close_code;
use herald_tests::gateway::token;
use herald_tests::{TestGateway, TestNats, WsClient};
use serde_json::{Value, json};

const KEY: &str = "test-api-key";

async fn api_gateway(nats: &TestNats) -> TestGateway {
    TestGateway::start_with(nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec!["other-key".into(), KEY.into()];
        c.api_nats_user = Some(herald_tests::nats::Role::Publisher.user().into());
        c.api_nats_password = Some(herald_tests::nats::Role::Publisher.password());
        c.api_max_body_bytes = 4096;
    })
    .await
}

async fn post(gateway: &TestGateway, path: &str, key: Option<&str>, body: String) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(gateway.api_url(path)).body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("the API answers");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_http_api_publishes_with_api_keys_and_refuses_bad_requests_clearly() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let mut client = gateway.connect("42").await;

    let message = json!({"to": {"user": "42"}, "data": {"text": "hi"}, "kind": "mail", "id": "order-7"});
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(false)));
    let seq = body["seq"].as_u64().unwrap();
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.kind.as_str(), msg.id.as_str()), (seq, "mail", "order-7"));
    assert_eq!(msg.data, json!({"text": "hi"}));
    // The same id again: stored once, reported as a duplicate, not delivered again.
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
    assert_eq!((status, body["seq"].as_u64(), body["duplicate"].as_bool()), (200, Some(seq), Some(true)));

    // The same id for another message is a conflict, not a duplicate: that message was not stored.
    let reused = json!({"to": {"user": "43"}, "data": "other", "id": "order-7"});
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), reused.to_string()).await;
    assert_eq!(
        (status, body["error"].as_str(), body["id"].as_str()),
        (409, Some("conflict"), Some("order-7")),
        "{body}"
    );
    // A kind is any text without control characters, as a NATS publisher may set it and a user mute it.
    let spaced = json!({"to": {"user": "42"}, "data": 1, "kind": "Order shipped"});
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), spaced.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.expect_msg().await.kind, "Order shipped");
    let batch = json!([message, reused]);
    let (_, body) = post(&gateway, "/v1/publish", Some(KEY), batch.to_string()).await;
    let results = &body["results"];
    assert_eq!((results[0]["duplicate"].as_bool(), results[1]["error"].as_str()), (Some(true), Some("conflict")));

    // A batch: results in order.
    let batch = json!([
        {"to": {"user": "42"}, "data": "one"},
        {"to": {"all": true}, "data": "two"},
        {"to": {"topic": "news"}, "data": "three"},
    ]);
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), batch.to_string()).await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = body["results"].as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.len(), 3);
    assert_eq!(client.expect_msgs(2).await, seqs[..2].to_vec());

    for (case, key, body, status, error) in [
        ("no key", None, message.to_string(), 401, "unauthorized"),
        ("unknown key", Some("guess"), message.to_string(), 401, "unauthorized"),
        ("wildcard user", Some(KEY), json!({"to": {"user": "*"}}).to_string(), 400, "bad_request"),
        ("dotted user", Some(KEY), json!({"to": {"user": "a.b"}}).to_string(), 400, "bad_request"),
        ("unknown target", Some(KEY), json!({"to": {"group": "x"}}).to_string(), 400, "bad_request"),
        ("two targets", Some(KEY), json!({"to": {"user": "42", "topic": "news"}}).to_string(), 400, "bad_request"),
        ("not JSON", Some(KEY), "{oops".to_string(), 400, "bad_request"),
        (
            "kind with a line break",
            Some(KEY),
            json!({"to": {"all": true}, "kind": "a\nb"}).to_string(),
            400,
            "bad_request",
        ),
        (
            "kind ending in a space",
            Some(KEY),
            json!({"to": {"all": true}, "kind": "mail "}).to_string(),
            400,
            "bad_request",
        ),
        (
            "kind of 129",
            Some(KEY),
            json!({"to": {"all": true}, "kind": "k".repeat(129)}).to_string(),
            400,
            "bad_request",
        ),
        ("empty batch", Some(KEY), "[]".to_string(), 400, "bad_request"),
        ("oversized", Some(KEY), json!({"to": {"all": true}, "data": "x".repeat(5000)}).to_string(), 413, "too_large"),
    ] {
        let (got, body) = post(&gateway, "/v1/publish", key, body).await;
        assert_eq!((got, body["error"].as_str()), (status, Some(error)), "{case}: {body}");
    }
    let (status, body) = post(&gateway, "/v1/nothing", Some(KEY), "{}".into()).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    // A 413 says that its connection closes (its body was left unread), so a client's next
    // request goes on a new one.
    let http = reqwest::Client::new();
    let send = |body: String| http.post(gateway.api_url("/v1/publish")).bearer_auth(KEY).body(body).send();
    let too_large = send(json!({"to": {"all": true}, "data": "x".repeat(50_000)}).to_string()).await.unwrap();
    assert_eq!(too_large.status().as_u16(), 413);
    assert_eq!(too_large.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    assert_eq!(send(message.to_string()).await.unwrap().status().as_u16(), 200);
}

/// Data is stored as the caller wrote it and listed as sockets get it: re-encoded, a number past 64
/// bits would become a float. What NATS cannot take is a 413, not a 503 to retry; a known path asked
/// with another method a 405; an id in a path may be percent-encoded.
#[tokio::test]
async fn the_http_api_keeps_data_as_written_and_answers_in_http_terms() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
        c.api_nats_user = Some(herald_tests::nats::Role::Publisher.user().into());
        c.api_nats_password = Some(herald_tests::nats::Role::Publisher.password());
        c.api_max_body_bytes = 4 << 20;
    })
    .await;
    let data = r#"{"a":12345678901234567890123,"f":1E5}"#;
    let (status, body) =
        post(&gateway, "/v1/publish", Some(KEY), format!(r#"{{"to":{{"user":"a@b"}},"data":{data}}}"#)).await;
    assert_eq!(status, 200, "{body}");
    let stream = nats.jetstream().await.get_stream("HERALD").await.unwrap();
    let stored = stream.get_raw_message(body["seq"].as_u64().unwrap()).await.unwrap();
    assert_eq!(std::str::from_utf8(&stored.payload).unwrap(), data);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(gateway.api_url(path)).bearer_auth(KEY).send();
    let listed = get("/v1/inbox/a%40b/messages").await.unwrap().text().await.unwrap();
    assert!(listed.contains(&format!(r#""data":{data}}}"#)), "{listed}");
    let summary: Value = get("/v1/inbox/a%40b").await.unwrap().json().await.unwrap();
    assert_eq!((summary["user"].as_str(), summary["unread"].as_u64()), (Some("a@b"), Some(1)));

    let over = json!({"to": {"all": true}, "data": "x".repeat(1 << 20)}).to_string();
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), over).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")), "{body}");
    let (status, body) =
        post(&gateway, "/v1/publish", Some(KEY), json!({"to": {"user": "a", "topic": "b"}}).to_string()).await;
    assert_eq!(status, 400);
    assert!(body["reason"].as_str().unwrap().starts_with("to: exactly one of"), "{body}");
    for (path, allow) in
        [("/v1/publish", "POST"), ("/v1/inbox/a/read", "POST"), ("/v1/stream", "GET"), ("/v1/users/a", "GET")]
    {
        let wrong = if allow == "POST" { http.get(gateway.api_url(path)) } else { http.delete(gateway.api_url(path)) };
        let answer = wrong.bearer_auth(KEY).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 405, "{path}");
        assert_eq!(answer.headers().get("allow").map(|v| v.to_str().unwrap()), Some(allow), "{path}");
    }
}

/// An API whose NATS user may not publish pushes (no `api_nats_user`: the gateway's own, which
/// nats.conf forbids `push.>`) says so, instead of a 503 that asks for a retry that cannot succeed.
#[tokio::test]
async fn an_api_whose_nats_user_may_not_publish_says_so() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
    })
    .await;
    let message = json!({"to": {"user": "42"}, "data": 1, "id": "m1"});
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
    assert_eq!(
        (status, body["error"].as_str(), body["id"].as_str()),
        (500, Some("misconfigured"), Some("m1")),
        "{body}"
    );
    assert!(body["reason"].as_str().unwrap().contains("api_nats_user"), "{body}");

    // A wrong password: the same, naming the credentials.
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
        c.api_nats_user = Some(herald_tests::nats::Role::Publisher.user().into());
        c.api_nats_password = Some("not-the-password".into());
    })
    .await;
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
    assert_eq!((status, body["error"].as_str()), (500, Some("misconfigured")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("api_nats_password"), "{body}");

    // A user that may publish pushes but not read their acknowledgements (the functions'): the same.
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
        c.api_nats_user = Some(herald_tests::nats::Role::Functions.user().into());
        c.api_nats_password = Some(herald_tests::nats::Role::Functions.password());
    })
    .await;
    let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
    assert_eq!((status, body["error"].as_str()), (500, Some("misconfigured")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("_INBOX.>"), "{body}");
}

#[tokio::test]
async fn presence_and_disconnect_span_every_gateway() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let other = TestGateway::start(&nats).await;
    let mut on_api_gateway = gateway.connect("zoe").await;
    let mut on_other = other.connect_with(&format!("token={}&device=phone", token("zoe"))).await;
    let _bystander = other.connect("yan").await;

    let presence = |user: &'static str| {
        let url = gateway.api_url(&format!("/v1/presence/{user}"));
        async move {
            let response = reqwest::Client::new().get(url).bearer_auth(KEY).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = presence("zoe").await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["online"].as_bool(), body["connections"].as_u64(), body["gateways"].as_u64()),
        (Some(true), Some(2), Some(2))
    );
    let (_, body) = presence("nobody").await;
    assert_eq!((body["online"].as_bool(), body["connections"].as_u64()), (Some(false), Some(0)));
    let (status, _) = presence("a.b").await;
    assert_eq!(status, 400);

    let (status, body) = post(&gateway, "/v1/disconnect", Some(KEY), json!({"user": "zoe"}).to_string()).await;
    assert_eq!((status, body["disconnected"].as_u64()), (200, Some(2)));
    assert_eq!(on_api_gateway.expect_close().await.map(|c| c.0), Some(close_code::DISCONNECTED));
    assert_eq!(on_other.expect_close().await.map(|c| c.0), Some(close_code::DISCONNECTED));
    other.wait_metric("herald_gateway_connections", 1.0).await;
    let (_, body) = presence("zoe").await;
    assert_eq!(body["connections"].as_u64(), Some(0));
}

/// The HTTP API in HTTP's own terms: the `Bearer` scheme in any case, a 401 that names the scheme,
/// HEAD as GET without the body, 405 with `Allow` on every path asked with another method; and a
/// body in the documented form only (serde would read an object from an array of its fields).
#[tokio::test]
async fn the_http_api_answers_in_http_terms_and_takes_only_the_documented_bodies() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let http = reqwest::Client::new();
    let stream = gateway.api_url("/v1/stream");
    let lower = http.get(&stream).header("authorization", format!("bearer {KEY}")).send().await.unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    let refused = http.get(&stream).send().await.unwrap();
    let scheme = refused.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    assert_eq!((refused.status().as_u16(), scheme.as_deref()), (401, Some("Bearer")));
    let head = http.head(&stream).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(head.bytes().await.unwrap().len(), 0);
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/dead-letters/notify/redrive", "POST"),
        (reqwest::Method::GET, "/v1/dead-letters/notify/purge", "POST"),
        (reqwest::Method::POST, "/v1/dead-letters", "GET"),
        (reqwest::Method::POST, "/v1/dead-letters/notify", "GET"),
    ] {
        let response = http.request(method.clone(), gateway.api_url(path)).bearer_auth(KEY).send().await.unwrap();
        let allowed = response.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
        assert_eq!((response.status().as_u16(), allowed.as_deref()), (405, Some(allow)), "{method} {path}");
    }
    for (path, body, reason) in [
        ("/v1/publish", r#"[[{"user":"42"},"hi","mail","pos-1"]]"#, "message 0: a message is a JSON object"),
        ("/v1/publish", r#"[{"to":{"all":true}},["x"]]"#, "message 1: a message is a JSON object"),
        ("/v1/inbox/42/read", "[5]", "the body must be a JSON object"),
        ("/v1/disconnect", r#"["42"]"#, "the body must be a JSON object"),
        // A field given twice is refused, as `/v1/publish` and the sockets' frames refuse it (the
        // last one counted, silently).
        ("/v1/disconnect", r#"{"user":"du","user":"other"}"#, "duplicate field `user` at line 1 column 19"),
        ("/v1/inbox/42/read", r#"{"seq":1,"seq":2}"#, "duplicate field `seq` at line 1 column 14"),
        ("/v1/dead-letters/notify/redrive", r#"{"seq":1,"seq":2}"#, "duplicate field `seq` at line 1 column 14"),
    ] {
        let (status, answer) = post(&gateway, path, Some(KEY), body.into()).await;
        let answered = (status, answer["error"].as_str(), answer["reason"].as_str());
        assert_eq!(answered, (400, Some("bad_request"), Some(reason)), "{path} {body}");
    }
    // The public listener names the path that needs the upgrade.
    let plain = http.get(gateway.http_url("/stomp")).send().await.unwrap();
    assert_eq!(plain.status().as_u16(), 426);
    assert!(plain.text().await.unwrap().contains("GET /stomp needs a WebSocket upgrade"));
}

/// Load balancers and scripts probe with HEAD: the plain pages answer it as GET, without a body;
/// the upgrade paths take GET only (405).
#[tokio::test]
async fn head_asks_the_plain_pages_without_their_bodies() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let http = reqwest::Client::new();
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/", 200), ("/ws", 405)] {
        let response = http.head(gateway.http_url(path)).send().await.expect("the gateway answers");
        let got = response.status().as_u16();
        let length = response.headers().get("content-length").map(|v| v.to_str().unwrap().to_string());
        let body = response.bytes().await.expect("an empty body");
        assert_eq!((got, body.len()), (status, 0), "HEAD {path}");
        if status == 200 {
            assert!(length.as_deref().is_some_and(|l| l != "0"), "HEAD {path} gives GET's length: {length:?}");
        }
    }
}

#[tokio::test]
async fn only_allowed_origins_may_open_sockets() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let url = gateway.ws_url(&format!("token={}", token("ava")));
    let refused = WsClient::connect_with_headers(&url, &[("Origin", "https://evil.example.net")]).await.err().unwrap();
    assert_eq!((refused.status, refused.body["error"].as_str()), (403, Some("forbidden_origin")));
    // No browser sends two; one outside the list refuses the request, whichever comes first.
    let two = [("Origin", "https://app.example.com"), ("Origin", "https://evil.example.net")];
    let refused = WsClient::connect_with_headers(&url, &two).await.err().unwrap();
    assert_eq!((refused.status, refused.body["error"].as_str()), (403, Some("forbidden_origin")));
    let mut allowed = WsClient::connect_with_headers(&url, &[("Origin", "https://app.example.com")]).await.unwrap();
    allowed.expect_welcome().await;
    // Not a browser (no Origin): allowed.
    let mut server_side = WsClient::connect(&url).await.unwrap();
    server_side.expect_welcome().await;
}

/// The plain-HTTP transports a page reads with CORS (SSE, Socket.IO polling, their preflights)
/// allow the origins the gateway allows, and nothing to the others, which are refused with 403.
/// (tests/browser/test_cross_origin.py has Chromium read them from another origin.)
#[tokio::test]
async fn cross_origin_reads_are_allowed_to_allowed_origins_only() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let http = reqwest::Client::new();
    let sse = gateway.http_url(&format!("/sse?token={}", token("cora")));
    let polling = gateway.http_url("/socket.io/?EIO=4&transport=polling");
    let allowed_origin = |response: &reqwest::Response| {
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), header("access-control-allow-origin"), header("access-control-allow-methods"))
    };
    for (origin, expected, methods) in
        [("https://app.example.com", 204, true), ("https://evil.example.net", 403, false)]
    {
        for (url, allowed) in [(&sse, "GET, OPTIONS"), (&polling, "GET, POST, OPTIONS")] {
            let preflight = http
                .request(reqwest::Method::OPTIONS, url.as_str())
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .send()
                .await
                .unwrap();
            let named = (expected == 204).then(|| origin.to_string());
            let methods = methods.then(|| allowed.to_string());
            assert_eq!(allowed_origin(&preflight), (expected, named, methods), "OPTIONS {url} from {origin}");
        }
    }
    let opened = http.get(&polling).header("origin", "https://app.example.com").send().await.unwrap();
    assert_eq!(allowed_origin(&opened), (200, Some("https://app.example.com".into()), None));
    let refused = http.get(&polling).header("origin", "https://evil.example.net").send().await.unwrap();
    assert_eq!(allowed_origin(&refused), (403, None, None));
    let refused = http.get(&sse).header("origin", "https://evil.example.net").send().await.unwrap();
    assert_eq!(allowed_origin(&refused), (403, None, None));
    let stream = http.get(&sse).header("origin", "https://app.example.com").send().await.unwrap();
    assert_eq!(allowed_origin(&stream), (200, Some("https://app.example.com".into()), None));
}

#[tokio::test]
async fn connection_limits_per_gateway_and_per_address_with_trusted_proxies() {
    let nats = TestNats::start().await;
    let limited = TestGateway::start_with(&nats, |c| c.max_connections = 2).await;
    let _one = limited.connect("u1").await;
    let _two = limited.connect("u2").await;
    let refused = WsClient::connect(&limited.ws_url(&format!("token={}", token("u3")))).await.err().unwrap();
    assert_eq!((refused.status, refused.body["error"].as_str()), (503, Some("too_many_connections")));
    drop(_one);
    limited.wait_metric("herald_gateway_connections", 1.0).await;
    let _three = limited.connect("u3").await;

    // One socket per address; the test runs behind a "proxy" at 127.0.0.1 that it trusts.
    let proxied = TestGateway::start_with(&nats, |c| {
        c.max_connections_per_address = 1;
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    let url = |user: &str| proxied.ws_url(&format!("token={}", token(user)));
    let mut first = WsClient::connect_with_headers(&url("p1"), &[("X-Forwarded-For", "203.0.113.1")]).await.unwrap();
    first.expect_welcome().await;
    let mut second = WsClient::connect_with_headers(&url("p2"), &[("X-Forwarded-For", "203.0.113.2")]).await.unwrap();
    second.expect_welcome().await;
    let refused =
        WsClient::connect_with_headers(&url("p3"), &[("X-Forwarded-For", "203.0.113.1")]).await.err().unwrap();
    assert_eq!(refused.status, 429);

    // Without trusting the proxy, the header counts for nothing: every socket is 127.0.0.1's.
    let direct = TestGateway::start_with(&nats, |c| c.max_connections_per_address = 1).await;
    let url = |user: &str| direct.ws_url(&format!("token={}", token(user)));
    let mut only = WsClient::connect_with_headers(&url("d1"), &[("X-Forwarded-For", "203.0.113.1")]).await.unwrap();
    only.expect_welcome().await;
    let refused =
        WsClient::connect_with_headers(&url("d2"), &[("X-Forwarded-For", "203.0.113.2")]).await.err().unwrap();
    assert_eq!((refused.status, refused.body["error"].as_str()), (429, Some("too_many_connections")));
}

#[tokio::test]
async fn metrics_count_connections_users_subscriptions_messages_replays_and_rpc_outcomes() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = herald_tests::Publisher::new(&nats).await;
    let mut phone = gateway.connect("ann").await;
    let mut laptop = gateway.connect_with(&format!("token={}&device=laptop", token("ann"))).await;
    let mut other = gateway.connect("bob").await;
    gateway.wait_metric("herald_gateway_connections", 3.0).await;
    assert_eq!(gateway.metric("herald_gateway_users").await, 2.0);
    // ann, bob and push.all.
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 3.0);
    assert_eq!(gateway.metric("herald_gateway_nats_connected").await, 1.0);

    let body = r#"{"n":1}"#;
    let seq = publisher.publish("push.user.ann", body).await;
    assert_eq!(phone.expect_msg().await.seq, seq);
    assert_eq!(laptop.expect_msg().await.seq, seq);
    let all = publisher.publish("push.all", body).await;
    for client in [&mut phone, &mut laptop, &mut other] {
        assert_eq!(client.expect_msg().await.seq, all);
    }
    assert_eq!(gateway.metric("herald_gateway_messages_in_total").await, 2.0);
    assert_eq!(gateway.metric("herald_gateway_messages_out_total").await, 5.0);
    let bytes_out = gateway.metric("herald_gateway_bytes_out_total").await;
    assert!(bytes_out > 5.0 * body.len() as f64, "bytes out counts whole frames: {bytes_out}");

    // A new device of ann resuming from 0 replays her message and the broadcast.
    let mut resumed = gateway.connect_with(&format!("token={}&device=tablet&since=0", token("ann"))).await;
    assert_eq!(resumed.expect_msgs(2).await, vec![seq, all]);
    assert!(resumed.expect_replayed().await.3);
    assert_eq!(gateway.metric("herald_gateway_replays_total").await, 1.0);
    assert_eq!(gateway.metric("herald_gateway_replayed_messages_total").await, 2.0);
    assert_eq!(gateway.metric("herald_gateway_replays_incomplete_total").await, 0.0);

    // rpc outcomes by function; names nobody serves share one label.
    other.send_json(json!({"type": "rpc", "id": "r1", "fn": "nobody.home", "data": {}})).await;
    assert!(matches!(other.next_frame().await, herald_shared::frame::ServerFrame::RpcResult(r) if !r.ok));
    let label = r#"herald_gateway_rpc_calls_total{function="(none)",outcome="no_function"}"#;
    assert_eq!(gateway.metric(label).await, 1.0);

    // The Grafana dashboard only charts metrics the gateway exports.
    let exposition = reqwest::get(gateway.http_url("/metrics")).await.unwrap().text().await.unwrap();
    let exported: std::collections::BTreeSet<&str> = exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let dashboard = std::fs::read_to_string(herald_tests::workspace_root().join("deploy/grafana/herald.json")).unwrap();
    let charted: std::collections::BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("herald_gateway_"))
        .collect();
    assert!(charted.len() >= 10, "{charted:?}");
    for name in charted {
        assert!(exported.contains(name), "the dashboard charts {name}, not exported: {exported:?}");
    }

    drop((phone, laptop));
    gateway.wait_metric("herald_gateway_connections", 2.0).await;
    assert_eq!(gateway.metric("herald_gateway_users").await, 2.0);
    drop(resumed);
    gateway.wait_metric("herald_gateway_users", 1.0).await;
    assert_eq!(gateway.metric("herald_gateway_subscriptions").await, 2.0);
}

#[tokio::test]
async fn refused_connections_are_counted_by_status_and_reason() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.session_policy = herald_gateway::SessionPolicy::Reject;
        c.allowed_origins = vec!["https://app.example.com".into()];
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.max_connections = 2;
        c.max_connections_per_address = 1;
    })
    .await;
    // Every documented refusal is a series from the start, at 0 (an alert on it sees a value)...
    let metrics = reqwest::get(gateway.http_url("/metrics")).await.unwrap().text().await.unwrap();
    let refusals = [r#"status="401",reason="unauthorized""#, r#"status="503",reason="unavailable""#]
        .map(|series| format!("herald_gateway_connections_refused_total{{{series}}} 0"));
    // And every close code the gateway chooses, and the clients' closes.
    let closed =
        ["1001", "4008", "client"].map(|code| format!(r#"herald_gateway_connections_closed_total{{code="{code}"}} 0"#));
    for line in refusals.iter().chain(&closed) {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    let url = |query: String| gateway.ws_url(&query);
    let from = |address: &'static str| [("X-Forwarded-For", address)];
    let refused = |result: Result<WsClient, herald_tests::ws::Refused>| {
        let refused = result.err().expect("refused");
        (refused.status, refused.body["error"].as_str().unwrap_or_default().to_string())
    };

    assert_eq!(refused(WsClient::connect(&url(String::new())).await), (401, "unauthorized".into()));
    let evil = [("Origin", "https://evil.example.net")];
    assert_eq!(
        refused(WsClient::connect_with_headers(&url(format!("token={}", token("ava"))), &evil).await),
        (403, "forbidden_origin".into())
    );
    assert_eq!(
        refused(WsClient::connect(&url(format!("token={}&topics=secret", token("ava")))).await),
        (403, "forbidden".into())
    );
    assert_eq!(
        refused(WsClient::connect(&url(format!("token={}&since=yesterday", token("ava")))).await),
        (400, "bad_request".into())
    );
    // Handshake errors: no upgrade at all (426), a key that is not 16 bytes (400).
    let http = gateway.http_url(&format!("/ws?token={}", token("ava")));
    let plain = reqwest::get(&http).await.unwrap();
    assert_eq!(plain.status().as_u16(), 426);
    let bad_key = reqwest::Client::new()
        .get(&http)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "c2hvcnQ=")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status().as_u16(), 400);

    let mut rex =
        WsClient::connect_with_headers(&url(format!("token={}", token("rex"))), &from("203.0.113.1")).await.unwrap();
    rex.expect_welcome().await;
    // rex again, from another address: the reject policy (409).
    let again = WsClient::connect_with_headers(&url(format!("token={}", token("rex"))), &from("203.0.113.2")).await;
    assert_eq!(refused(again), (409, "conflict".into()));
    // Another user from rex's address: over the per-address limit (429).
    let crowded = WsClient::connect_with_headers(&url(format!("token={}", token("sam"))), &from("203.0.113.1")).await;
    assert_eq!(refused(crowded), (429, "too_many_connections".into()));
    // The gateway full (503).
    let mut sam =
        WsClient::connect_with_headers(&url(format!("token={}", token("sam"))), &from("203.0.113.2")).await.unwrap();
    sam.expect_welcome().await;
    let full = WsClient::connect_with_headers(&url(format!("token={}", token("tom"))), &from("203.0.113.3")).await;
    assert_eq!(refused(full), (503, "too_many_connections".into()));
    // The endpoints of the other protocols count theirs alike.
    let polling = reqwest::Client::new()
        .get(gateway.http_url("/socket.io/?EIO=4&transport=polling"))
        .header("X-Forwarded-For", "203.0.113.3")
        .send()
        .await
        .unwrap();
    assert_eq!(polling.status().as_u16(), 503);
    let centrifugal = format!("ws://{}/connection/websocket", gateway.addr);
    assert_eq!(
        refused(WsClient::connect_with_headers(&centrifugal, &from("203.0.113.3")).await),
        (503, "too_many_connections".into())
    );

    let expected = [
        ("401", "unauthorized", 1.0),
        ("403", "forbidden_origin", 1.0),
        ("403", "forbidden", 1.0),
        ("400", "bad_request", 2.0),
        ("426", "upgrade_required", 1.0),
        ("409", "conflict", 1.0),
        ("429", "too_many_connections", 1.0),
        ("503", "too_many_connections", 3.0),
    ];
    for (status, reason, count) in expected {
        let name = format!(r#"herald_gateway_connections_refused_total{{status="{status}",reason="{reason}"}}"#);
        assert_eq!(gateway.metric(&name).await, count, "{name}");
    }
    assert_eq!(gateway.metric("herald_gateway_connections").await, 2.0);
}

/// When JetStream's storage is full, NATS refuses to store: the API says so with 507, not with a
/// 503 whose retry would not help.
#[tokio::test]
async fn a_publish_jetstream_has_no_room_for_is_507() {
    let nats = TestNats::start_with_config("jetstream {\n  max_memory_store: 64MB\n  max_file_store: 256KB\n}").await;
    let gateway = api_gateway(&nats).await;
    let mut stored = 0;
    for n in 0..1000 {
        let message = json!({"to": {"user": "42"}, "data": "x".repeat(1024), "id": format!("m{n}")});
        let (status, body) = post(&gateway, "/v1/publish", Some(KEY), message.to_string()).await;
        if status == 200 {
            stored += 1;
            continue;
        }
        let id = format!("m{n}");
        assert_eq!(
            (status, body["error"].as_str(), body["id"].as_str()),
            (507, Some("insufficient_storage"), Some(id.as_str())),
            "after {stored} stored: {body}"
        );
        assert!(body["reason"].as_str().unwrap().contains("max_file_store"), "{body}");
        return;
    }
    panic!("1,000 messages of 1 KiB stored in 256 KiB");
}
