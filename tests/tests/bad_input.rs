//! Gateway core, bad input: refused before the upgrade with a status and JSON, or closed after it
//! with the contract's code; never a panic or a hang.

use std::time::Duration;

use async_nats::jetstream;
use herald_shared::frame::{ServerFrame, close_code};
use herald_shared::token::{Claims, issue_hs256, now_secs};
use herald_tests::gateway::{SECRET, token, token_with};
use herald_tests::publish::{publish_raw, publish_raw_block};
use herald_tests::ws::{Event, FRAME_TIMEOUT};
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn signed(sub: &str) -> String {
    issue_hs256(SECRET.as_bytes(), &Claims { sub: sub.to_string(), exp: now_secs() + 600, topics: vec![] })
}

/// A token whose header names critical extensions (`crit`), signed with the gateways' secret.
fn signed_with_crit(sub: &str) -> String {
    let header = jsonwebtoken::Header { crit: Some(vec!["exp".into()]), ..Default::default() };
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&header, &Claims { sub: sub.into(), exp: now_secs() + 600, topics: vec![] }, &key).unwrap()
}

/// A token of any claims, signed with the gateways' secret.
fn signed_json(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_json_reason_and_no_socket() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let forged = issue_hs256(b"not-the-secret", &Claims { sub: "42".into(), exp: now_secs() + 600, topics: vec![] });
    let cases = [
        ("no token", String::new(), "no token"),
        ("malformed", "token=abc.def".to_string(), "malformed"),
        ("expired", format!("token={}", token_with("42", &[], -600)), "expired"),
        ("bad signature", format!("token={forged}"), "signature"),
        ("sub a.b", format!("token={}", signed("a.b")), "sub"),
        ("sub *", format!("token={}", signed("*")), "sub"),
        ("sub >", format!("token={}", signed(">")), "sub"),
        ("sub empty", format!("token={}", signed("")), "sub"),
        ("sub of 129", format!("token={}", signed(&"x".repeat(129))), "sub"),
        ("crit", format!("token={}", signed_with_crit("42")), "extensions"),
        (
            "nbf ahead",
            format!(
                "token={}",
                signed_json(serde_json::json!({"sub": "42", "exp": now_secs() + 600, "nbf": now_secs() + 300}))
            ),
            "not valid yet",
        ),
    ];
    for (case, query, reason) in cases {
        let refused =
            WsClient::connect(&gateway.ws_url(&query)).await.err().unwrap_or_else(|| panic!("{case}: upgraded"));
        assert_eq!(refused.status, 401, "{case}");
        assert_eq!(refused.body["error"], "unauthorized", "{case}");
        let text = refused.body["reason"].as_str().unwrap_or_default();
        assert!(text.contains(reason), "{case}: reason {text:?} lacks {reason:?}");
    }
    // A sub of exactly 128 allowed characters is fine, and so is an identity provider's `aud`.
    let _client = gateway.connect_with(&format!("token={}", signed(&"x".repeat(128)))).await;
    let theirs = signed_json(serde_json::json!({"sub": "42", "exp": now_secs() + 600, "aud": "their-app"}));
    let _other = gateway.connect_with(&format!("token={theirs}")).await;
    // JavaScript signers write `Date.now() / 1000 + 600`: a NumericDate with a fraction.
    let fractional = signed_json(serde_json::json!({"sub": "js", "exp": now_secs() as f64 + 600.25}));
    let _js = gateway.connect_with(&format!("token={fractional}")).await;
    // An empty `token=` is no token: the header's is taken.
    let bearer = format!("Bearer {}", signed("header"));
    let url = gateway.ws_url("token=");
    let mut header = WsClient::connect_with_headers(&url, &[("Authorization", &bearer)]).await.expect("upgraded");
    header.expect_welcome().await;
    assert_eq!(gateway.metric("herald_gateway_connections").await, 4.0);
}

/// A token that expires at the end of 64-bit time is a token that does not expire soon: the
/// connection is served, and when it ends nothing of it is left behind.
#[tokio::test]
async fn a_token_expiring_at_the_end_of_time_is_served_and_leaves_nothing_behind() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let token = issue_hs256(SECRET.as_bytes(), &Claims { sub: "forever".into(), exp: u64::MAX, topics: vec![] });
    let mut client = gateway.connect_with(&format!("token={token}")).await;
    let seq = publisher.publish("push.user.forever", "1").await;
    assert_eq!(client.expect_msg().await.seq, seq);
    drop(client);
    herald_tests::eventually("the connection gone", Duration::from_secs(10), || async {
        (gateway.metric("herald_gateway_connections").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_parameters_get_400_or_403_and_plain_get_gets_426() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let good = token_with("42", &["news", "t*"], 600);
    // More topics than one connection may have (`max_topics`, 64).
    let many = (0..65).map(|n| format!("t{n}")).collect::<Vec<_>>().join(",");
    for (query, status, error) in [
        (format!("token={good}&topics={many}"), 400, "bad_request"),
        (format!("token={good}&device=a.b"), 400, "bad_request"),
        (format!("token={good}&since=minus"), 400, "bad_request"),
        (format!("token={good}&topics=secret"), 403, "forbidden"),
        (format!("token={good}&topics=news.%3E"), 400, "bad_request"),
    ] {
        let refused = WsClient::connect(&gateway.ws_url(&query)).await.err().expect("refused");
        assert_eq!((refused.status, refused.body["error"].as_str()), (status, Some(error)), "{query}");
    }
    let plain = reqwest::get(gateway.http_url("/ws")).await.unwrap();
    assert_eq!(plain.status().as_u16(), 426);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"], "upgrade_required");
    let missing = reqwest::get(gateway.http_url("/nope")).await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    // A path that exists, asked with another method: 405 naming the methods it takes.
    let http = reqwest::Client::new();
    for (method, path, allowed) in [
        (reqwest::Method::POST, "/ws", "GET"),
        (reqwest::Method::POST, "/sse", "GET, OPTIONS"),
        (reqwest::Method::DELETE, "/socket.io/", "GET, POST, OPTIONS"),
        (reqwest::Method::POST, "/metrics", "GET, HEAD"),
    ] {
        let answer = http.request(method, gateway.http_url(path)).send().await.unwrap();
        assert_eq!((answer.status().as_u16(), answer.headers()["allow"].to_str().unwrap()), (405, allowed), "{path}");
        assert_eq!(answer.json::<serde_json::Value>().await.unwrap()["error"], "method_not_allowed");
    }
}

/// Connections that never become a socket are not kept (slowloris): a request head that never
/// ends, a connection that sends nothing, one kept alive idle after a request; on the public
/// listener and the HTTP API's.
#[tokio::test]
async fn connections_that_never_finish_a_request_head_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.request_head_timeout = Duration::from_secs(1);
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec!["k".into()];
    })
    .await;
    let cases: [(&str, &[u8]); 3] = [
        ("a head cut short", b"GET /ws HTTP/1.1\r\nHost: x\r\n"),
        ("nothing", b""),
        ("idle after a request", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for addr in [gateway.addr, gateway.api_addr.unwrap()] {
        for (case, sent) in cases {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(sent).await.unwrap();
            // Whatever was answered, then the end: the gateway closed the connection.
            let mut answered = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answered)).await;
            assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "{addr} {case}: still open");
        }
    }
}

/// A body announced and never sent in full (a slow POST) is answered 408 once
/// `request_body_timeout` passes, not waited for: on the HTTP API and on a Socket.IO polling
/// session (whose session it ends, as a cut-off body does).
#[tokio::test]
async fn request_bodies_that_never_arrive_in_full_get_408() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.request_body_timeout = Duration::from_secs(1);
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec!["k".into()];
    })
    .await;
    let answer = slow_post(gateway.api_addr.unwrap(), "/v1/publish", "Authorization: Bearer k\r\n", 100).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"timeout""#), "{answer}");
    // One announced over the limit is refused as such at once, not waited for.
    let answer = slow_post(gateway.api_addr.unwrap(), "/v1/publish", "Authorization: Bearer k\r\n", 100 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""error":"too_large""#), "{answer}");

    let base = gateway.http_url("/socket.io/?EIO=4&transport=polling");
    let open = reqwest::get(&base).await.unwrap().text().await.unwrap();
    let sid = serde_json::from_str::<serde_json::Value>(open.strip_prefix('0').unwrap()).unwrap()["sid"].clone();
    let session = format!("{base}&sid={}", sid.as_str().unwrap());
    let http = reqwest::Client::new();
    let connect = format!("40{}", serde_json::json!({"token": token_with("slow-poster", &[], 600)}));
    assert_eq!(http.post(&session).body(connect).send().await.unwrap().status(), 200);
    let connected = http.get(&session).send().await.unwrap().text().await.unwrap();
    assert!(connected.starts_with("40{"), "{connected}");
    let answer = slow_post(gateway.addr, session.strip_prefix(&gateway.http_url("")).unwrap(), "", 100).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let mut poll = http.get(&session).send().await.unwrap().text().await.unwrap();
    if poll == "6" {
        // A poll that came as the session was ending takes its end (a noop); the next finds none.
        poll = http.get(&session).send().await.unwrap().text().await.unwrap();
    }
    assert_eq!(serde_json::from_str::<serde_json::Value>(&poll).unwrap()["message"], "Session ID unknown", "{poll}");
}

/// A body over the limit is answered 413 while the gateway reads the rest of it and drops it: a
/// client that sends its whole body before it reads the answer (most do, without `Expect:
/// 100-continue`) gets the answer, not a connection reset under its last bytes. With a length, and
/// in chunks (refused once over the limit).
#[tokio::test]
async fn a_client_that_sends_a_whole_oversized_body_before_reading_gets_its_413() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec!["k".into()];
    })
    .await;
    for chunked in [false, true] {
        let answer = post_whole(gateway.api_addr.unwrap(), "/v1/publish", 4 << 20, chunked).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "chunked {chunked}: {answer}");
        assert!(answer.contains(r#""error":"too_large""#), "chunked {chunked}: {answer}");
    }
}

/// What a publisher puts in its headers never changes what clients are told of the stream: its own
/// `Nats-Sequence` or `Nats-Time-Stamp` (the stream's, added after them, count), a kind or id with a
/// control character (left out: no protocol's headers can carry a NUL), `herald-type` in lower case
/// (a kind, live and replayed), a header line that is not text or has no `:` (the others are read,
/// live and replayed).
#[tokio::test]
async fn a_publishers_headers_cannot_change_a_seq_or_hide_a_message() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let mut live = gateway.connect("hedy").await;
    let before = publisher.publish("push.user.hedy", "0").await;
    assert_eq!(live.expect_msg().await.seq, before);
    let spoofed: &[&[u8]] =
        &[b"Nats-Sequence: 900000000", b"Nats-Time-Stamp: 1999-01-01T00:00:00Z", b"Herald-Type: mail"];
    let sent = [
        (publish_raw(&nats, "push.user.hedy", spoofed, b"1").await, "mail"),
        (publish_raw(&nats, "push.user.hedy", &[b"Herald-Type: k\0nul", b"Nats-Msg-Id: i\0d"], b"2").await, ""),
        (publish_raw(&nats, "push.user.hedy", &[b"herald-type: lower"], b"3").await, "lower"),
        (publisher.publish("push.user.hedy", "4").await, ""),
    ];
    let told = |msg: herald_shared::frame::Msg| {
        assert!(!msg.ts.starts_with("1999"), "the publisher's time: {msg:?}");
        assert_eq!(msg.id, "", "{msg:?}");
        (msg.seq, msg.kind)
    };
    for (seq, kind) in sent {
        assert_eq!(told(live.expect_msg().await), (seq, kind.to_string()), "live");
    }
    let mut replayed = gateway.connect_with(&format!("token={}&since={before}", token("hedy"))).await;
    for (seq, kind) in sent {
        assert_eq!(told(replayed.expect_msg().await), (seq, kind.to_string()), "replayed");
    }

    // Live, a line that is not text or has no `:` hides neither the message nor its kind.
    let mut other = gateway.connect("hedy-2").await;
    let odd: &[&[u8]] = &[b"X-Custom: caf\xe9", b"no colon", b"Herald-Type: mail"];
    let odd = publish_raw(&nats, "push.user.hedy-2", odd, b"5").await;
    // A status in the first line is the publisher's (NATS before 2.14 stores it, and answers direct gets with it).
    let status: &[&[u8]] = &[b"NATS/1.0 503 No Responders", b"Herald-Type: mail"];
    let status = publish_raw_block(&nats, "push.user.hedy-2", status, b"6").await;
    let next = publisher.publish("push.user.hedy-2", "7").await;
    let sent = [(odd, "mail".to_string()), (status, "mail".to_string()), (next, String::new())];
    for sent in &sent {
        assert_eq!(&told(other.expect_msg().await), sent, "live");
    }
    // Replayed and counted as unread too (async-nats, which read replays before, cannot read them).
    let mut resumed = gateway.connect_with(&format!("token={}&since={}", token("hedy-2"), odd - 1)).await;
    for sent in &sent {
        assert_eq!(&told(resumed.expect_msg().await), sent, "replayed");
    }
    let mut new_device = gateway.connect_with(&format!("token={}&device=new", token("hedy-2"))).await;
    assert!(matches!(new_device.welcome, Some(ServerFrame::Welcome { unread: 3, .. })), "{:?}", new_device.welcome);
    for sent in &sent {
        assert_eq!(&told(new_device.expect_msg().await), sent, "unread");
    }
}

/// Sends a request with a body of `size` bytes in full, then reads the answer to the end.
async fn post_whole(addr: std::net::SocketAddr, path: &str, size: usize, chunked: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let framing = if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {size}") };
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n{framing}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let piece = vec![b'x'; 64 << 10];
    for _ in 0..size / piece.len() {
        let sent = match chunked {
            true => {
                let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), &piece, b"\r\n"].concat();
                stream.write_all(&chunk).await
            }
            false => stream.write_all(&piece).await,
        };
        sent.expect("the gateway took the whole body");
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await.expect("the gateway took the whole body");
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    read.expect("an answer within 30 s").expect("the answer, not a reset connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends a POST announcing `declared` bytes of body and only 10 of them; the answer, read to the
/// end (bounded: a gateway that waits on forever fails the test).
async fn slow_post(addr: std::net::SocketAddr, path: &str, headers: &str, declared: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {declared}\r\n\r\n0123456789");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "{path}: no answer within 30 s");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.max_frame_bytes = 1024).await;
    let mut client = gateway.connect("big").await;
    // Exactly the limit is accepted (and answered: it is not a valid frame type).
    let at_limit = format!(r#"{{"type":"x","pad":"{}"}}"#, "a".repeat(1024 - 21));
    assert_eq!(at_limit.len(), 1024);
    client.send_text(&at_limit).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Error { code, .. } if code == "unknown_type"));
    client.send_text(&"a".repeat(1025)).await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::TOO_BIG));
    // Counted by the code the gateway chose; a close the client starts counts as `client`.
    let closed = |code: &str| format!(r#"herald_gateway_connections_closed_total{{code="{code}"}}"#);
    gateway.wait_metric(&closed("1009"), 1.0).await;
    let mut leaving = gateway.connect("leaving").await;
    let bye = CloseFrame { code: CloseCode::from(4321), reason: "bye".into() };
    leaving.send(Message::Close(Some(bye))).await.unwrap();
    gateway.wait_metric(&closed("client"), 1.0).await;
    assert_eq!(gateway.metric(&closed("1000")).await, 0.0);
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.max_frame_bytes = 1024).await;
    let mut client = gateway.connect("fragments").await;
    let part = |opcode, fin| Message::Frame(Frame::message(vec![b' '; 600], opcode, fin));
    client.send(part(OpCode::Data(Data::Text), false)).await.unwrap();
    client.send(part(OpCode::Data(Data::Continue), true)).await.unwrap();
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::TOO_BIG));
}

#[tokio::test]
async fn malformed_frames_get_an_error_frame_or_1008() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut client = gateway.connect("sloppy").await;

    // A JSON object with an unknown type: error frame, connection stays open.
    client.send_text(r#"{"type":"teleport"}"#).await;
    let ServerFrame::Error { code, message, .. } = client.next_frame().await else { panic!("expected error") };
    assert_eq!(code, "unknown_type");
    assert!(message.contains("teleport"));
    // A known type with bad fields: error frame bad_request.
    client.send_text(r#"{"type":"ack","seq":"yesterday"}"#).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Error { code, .. } if code == "bad_request"));
    client.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Pong);
    // Not JSON at all: closed with 1008.
    client.send_text("{not json").await;
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::POLICY));

    // A binary frame: closed with 1008.
    let mut client = gateway.connect("binary").await;
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(client.expect_close().await.map(|c| c.0), Some(close_code::POLICY));
}

#[tokio::test]
async fn an_unresponsive_peer_is_closed() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.heartbeat = Duration::from_secs(1);
        c.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    // This client reads nothing, so it never answers the server's pings.
    let mut silent = gateway.connect("silent").await;
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    // Reading now shows the pings it ignored, then the close.
    assert_eq!(silent.expect_close().await.map(|c| c.0), Some(1001));

    // A client that answers pings stays connected across several heartbeats.
    let mut lively = gateway.connect("lively").await;
    let js: jetstream::Context = nats.jetstream().await;
    for n in 0..3u64 {
        // Each wait covers more than a heartbeat; reading answers the pings meanwhile.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while tokio::time::Instant::now() < deadline {
            let seq = js.publish("push.user.lively", n.to_string().into()).await.unwrap().await.unwrap().sequence;
            assert_eq!(lively.expect_msg().await.seq, seq);
        }
    }
    assert_eq!(gateway.metric("herald_gateway_connections").await, 1.0);
}

#[tokio::test]
async fn a_client_that_never_answers_is_closed_a_heartbeat_plus_the_timeout_after_connecting() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.heartbeat = Duration::from_secs(5);
        c.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    // Two deadlines race: the silence one, 6 s after the connect, and the token's expiry, 9 to 10 s
    // after it (expiry is in whole seconds). A check that waited for the second heartbeat (10 s)
    // would find the token expired first and close with 4001 instead.
    let mut silent = WsClient::connect(&gateway.ws_url(&format!("token={}", token_with("mute", &[], 10))))
        .await
        .expect("connection accepted");
    // Read nothing until the gateway gave up, so that no pong is sent.
    gateway.wait_metric("herald_gateway_connections", 1.0).await;
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
    assert!(matches!(silent.next_frame().await, ServerFrame::Welcome { .. }));
    assert_eq!(silent.expect_close().await.map(|c| c.0), Some(close_code::NO_HEARTBEAT));
}

/// A client that reads slowly but steadily is not taken for one that stopped: the kernel keeps
/// little unsent for it (`socket_unsent_limit`), so its socket takes bytes as the client reads, in
/// steps the stall timeout sees, however large its send buffer (4 MiB asked here, which the kernel doubles). Without that limit the
/// socket signals room only once megabytes are free, longer than the stall timeout (1 s here) at
/// this client's pace.
#[tokio::test]
async fn a_reader_that_reads_slowly_but_steadily_is_never_closed() {
    const MESSAGES: usize = 1200;
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.write_stall_timeout = Duration::from_secs(1);
        c.socket_send_buffer = 4 << 20;
    })
    .await;
    // A small receive window: what the client has not read waits on the gateway's side.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    let tcp = socket.connect(gateway.addr).await.unwrap();
    let url = gateway.ws_url(&format!("token={}", token_with("steady", &[], 600)));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.expect("upgrade");
    let welcome = futures::StreamExt::next(&mut ws).await;
    assert!(matches!(&welcome, Some(Ok(Message::Text(text))) if text.contains("welcome")), "{welcome:?}");
    let publisher = Publisher::new(&nats).await;
    let body = format!("\"{}\"", "x".repeat(10_000));
    let publishing = tokio::spawn(async move {
        let mut sent = Vec::new();
        for _ in 0..MESSAGES {
            sent.push(publisher.publish("push.all", &body).await);
        }
        sent
    });
    let mut received = Vec::new();
    // About 1 MB a second, ten messages at a time.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while received.len() < MESSAGES {
        pace.tick().await;
        let mut read = 0;
        while read < 10 && received.len() < MESSAGES {
            use futures::StreamExt;
            let message = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a frame in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(frame["type"], "msg", "after {} messages: {frame}", received.len());
                    received.push(frame["seq"].as_u64().unwrap());
                    read += 1;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("after {} messages: {other:?}", received.len()),
            }
        }
    }
    assert_eq!(received, publishing.await.unwrap());
}

/// A client reading a long backlog slowly, and sending nothing (acks are optional), answers each
/// ping only once it has read what was queued before it, seconds after the heartbeat plus the
/// timeout: while it takes bytes it is alive, and it is not closed with 1001.
#[tokio::test]
async fn a_slow_reader_that_answers_pings_late_is_not_closed_as_silent() {
    const MESSAGES: usize = 150;
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.heartbeat = Duration::from_secs(1);
        c.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    let url = gateway.ws_url(&format!("token={}", token_with("slowpoke", &[], 600)));
    let mut client = WsClient::connect_with_receive_buffer(&url, 16 * 1024).await;
    let publisher = Publisher::new(&nats).await;
    let body = format!("\"{}\"", "x".repeat(10_000));
    // Sent at once, then acknowledged: the client reads nothing meanwhile, and a publisher that
    // took more than the heartbeat plus the timeout would have it closed as silent, rightly.
    let mut acks = Vec::new();
    for _ in 0..MESSAGES {
        acks.push(publisher.send("push.user.slowpoke", &[], &body).await);
    }
    let mut sent = Vec::new();
    for ack in acks {
        sent.push(ack.await.expect("publish acknowledged").sequence);
    }
    // About 200 kB a second: the 1.5 MB take 7 s, the pings wait seconds behind them.
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let mut received = Vec::new();
    while received.len() < MESSAGES {
        pace.tick().await;
        let event = tokio::time::timeout(FRAME_TIMEOUT, client.recv()).await;
        let event = event.unwrap_or_else(|_| panic!("no frame in time after {} messages", received.len()));
        match event {
            Event::Frame(ServerFrame::Msg(msg)) => received.push(msg.seq),
            Event::Frame(ServerFrame::Welcome { .. } | ServerFrame::Replayed { .. }) => {}
            other => panic!("after {} messages: {other:?}", received.len()),
        }
    }
    assert_eq!(received, sent);
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_closed_with_4008_and_the_gateway_does_not_buffer_for_it() {
    let nats = TestNats::start().await;
    let queue_limit = 64 * 1024;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.outbound_queue_bytes = queue_limit;
        c.write_stall_timeout = Duration::from_secs(1);
    })
    .await;
    let mut slow = gateway.connect("slow").await;
    let mut fast = gateway.connect("fast").await;
    let publisher = Publisher::new(&nats).await;

    // More than the queue plus the socket buffers, however large the kernel makes them.
    let body = format!("\"{}\"", "x".repeat(256 * 1024));
    let published = gateway.publish_until_slow_consumer_close(&publisher, "push.user.slow", &body, 600).await.len();

    // The reader wakes up: what was already on the wire, then 4008.
    let mut received = 0;
    loop {
        match slow.next_event().await {
            Event::Frame(ServerFrame::Msg(_)) => received += 1,
            Event::Frame(other) => panic!("unexpected {other:?}"),
            Event::Close(close) => {
                assert_eq!(close.map(|c| c.0), Some(close_code::SLOW_CONSUMER));
                break;
            }
        }
    }
    assert!(received < published, "the gateway held {received} of {published} messages for a stalled reader");
    // Other sockets are unaffected.
    let seq = publisher.publish("push.user.fast", "still here").await;
    assert_eq!(fast.expect_msg().await.seq, seq);
}

/// `refresh` gives a connection a new token: it answers `refreshed` with the new expiry and the
/// connection outlives the first token (no 4001, no reconnect). A token that is refused (another
/// user's, a bad one) gets an `error` and changes nothing: the connection goes on.
#[tokio::test]
async fn a_refreshed_token_keeps_a_socket_past_the_first_expiry_and_a_bad_one_changes_nothing() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let publisher = Publisher::new(&nats).await;
    let expires = now_secs() + 3;
    let query = format!("token={}&topics=news", token_with("phoenix-2", &["news"], 3));
    let mut client = gateway.connect_with(&query).await;
    let refused = [
        (token_with("someone-else", &["news"], 600), "another user", "unauthorized"),
        ("nope".into(), "not a JWT", "unauthorized"),
        // Access the new token takes away ends with the connection, as at a reconnect.
        (token_with("phoenix-2", &[], 600), "a topic no longer allowed", "forbidden"),
    ];
    for (token, why, expected) in refused {
        client.send_json(serde_json::json!({"type": "refresh", "token": token})).await;
        let ServerFrame::Error { code, .. } = client.next_frame().await else { panic!("{why}: no error") };
        assert_eq!(code, expected, "{why}");
    }
    client.send_json(serde_json::json!({"type": "refresh"})).await;
    let ServerFrame::Error { code, .. } = client.next_frame().await else { panic!("no error for a bad refresh") };
    assert_eq!(code, "bad_request");
    let renewed = token_with("phoenix-2", &["news"], 600);
    client.send_json(serde_json::json!({"type": "refresh", "token": renewed})).await;
    let ServerFrame::Refreshed { exp, ttl } = client.next_frame().await else { panic!("no refreshed") };
    assert!(exp > expires + 500 && (590..=600).contains(&ttl), "{exp} {ttl}");
    herald_tests::eventually("the first token expired", Duration::from_secs(10), || async {
        (now_secs() > expires + 1).then_some(())
    })
    .await;
    let seq = publisher.publish("push.user.phoenix-2", "still here").await;
    assert_eq!(client.expect_msgs(1).await, [seq]);
}

/// A refreshed token's `topics` claim is what `sub` is checked against from then on: a topic the
/// first token allowed and the new one leaves out is refused, one the new token adds is joined.
#[tokio::test]
async fn a_refreshed_token_decides_which_topics_a_sub_may_join() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let query = format!("token={}&topics=news", token_with("phoenix-3", &["news", "secret"], 600));
    let mut client = gateway.connect_with(&query).await;
    let refreshed =
        |topics: &[&str]| serde_json::json!({"type": "refresh", "token": token_with("phoenix-3", topics, 600)});

    client.send_json(refreshed(&["news"])).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Refreshed { .. }), "a narrower token is taken");
    client.send_json(serde_json::json!({"type": "sub", "topic": "secret"})).await;
    let ServerFrame::Error { code, topic, .. } = client.next_frame().await else { panic!("secret: no error") };
    assert_eq!((code.as_str(), topic.as_deref()), ("forbidden", Some("secret")));

    client.send_json(refreshed(&["news", "extra"])).await;
    assert!(matches!(client.next_frame().await, ServerFrame::Refreshed { .. }), "a wider token is taken");
    client.send_json(serde_json::json!({"type": "sub", "topic": "extra"})).await;
    assert_eq!(client.next_frame().await, ServerFrame::Subscribed { topic: "extra".into() });
}

/// A client that sends and never reads does not grow the gateway's queue without bound: once the
/// answers waiting for its socket pass a mark, the gateway reads no more of its frames, and the
/// client's sends come to wait on TCP (before it sent more than the cap here, ~30 MB of pings).
#[tokio::test]
async fn a_client_that_sends_without_reading_is_no_longer_read() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.write_stall_timeout = Duration::from_secs(300)).await;
    let url = gateway.ws_url(&format!("token={}", signed("flooder")));
    let mut client = WsClient::connect_with_receive_buffer(&url, 4096).await;
    let ping = Message::text(r#"{"type":"ping"}"#);
    let mut sent = 0;
    let stopped = loop {
        assert!(sent < 1_500_000, "the gateway read {sent} pings whose answers its client never read");
        match tokio::time::timeout(Duration::from_secs(5), client.send(ping.clone())).await {
            Ok(sent_one) => sent_one.expect("send"),
            Err(_) => break sent,
        }
        sent += 1;
    };
    assert!(stopped > 0);
}

/// A replay reads the stream in rounds of about 512 KiB, whatever the size of the messages: a
/// socket that does not read holds the gateway to what one round brought (large messages once
/// had rounds of 256 of them held in memory per socket, and replies enough to get the gateway's
/// NATS connection cut as a slow consumer).
#[tokio::test]
async fn a_replay_to_a_socket_that_does_not_read_holds_one_round_of_large_messages() {
    const MESSAGES: usize = 60;
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.write_stall_timeout = Duration::from_secs(2)).await;
    let publisher = Publisher::new(&nats).await;
    let base = publisher.publish("push.user.nobody", "x").await;
    let body = format!("\"{}\"", "x".repeat(100_000));
    let mut acks = Vec::new();
    for _ in 0..MESSAGES {
        acks.push(publisher.send("push.user.hoarder", &[], &body).await);
    }
    for ack in acks {
        ack.await.expect("publish acknowledged");
    }
    // What the stream sends the gateway's replays: direct-get replies to its inbox.
    let spy = nats.client().await;
    let mut replies = spy.subscribe("_INBOX_gateway.>").await.unwrap();
    spy.flush().await.unwrap();

    let url = gateway.ws_url(&format!("token={}&since={base}", token_with("hoarder", &[], 600)));
    let _stalled = WsClient::connect_with_receive_buffer(&url, 4 * 1024).await;
    gateway.wait_metric(r#"herald_gateway_connections_closed_total{code="4008"}"#, 1.0).await;
    spy.flush().await.unwrap();
    let mut read = 0;
    // Everything the server sent before the flush's answer is in the subscription.
    while let Some(Some(reply)) = futures::FutureExt::now_or_never(futures::StreamExt::next(&mut replies)) {
        let subject = reply.headers.as_ref().and_then(|h| h.get("Nats-Subject")).map(|s| s.to_string());
        read += usize::from(subject.as_deref() == Some("push.user.hoarder"));
    }
    assert!(read > 0, "the replay read nothing");
    // About 512 KiB of 100 kB messages are read ahead (3 in the first round, which shares it with
    // `push.all`'s cursor); the socket's buffers take a few more at most.
    assert!(read < MESSAGES / 2, "the replay read {read} of {MESSAGES} messages for a socket that took none");
}
