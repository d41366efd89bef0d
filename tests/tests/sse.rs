//! Server-Sent Events at `GET /sse` (docs/protocols.md): real NATS, a real gateway, the stream read
//! over HTTP as it comes. The browser's own EventSource is tested in tests/browser/test_sse.py.

use std::time::Duration;

use herald_tests::gateway::{token, token_with};
use herald_tests::sse::SseClient;
use herald_tests::{Publisher, TestGateway, TestNats};

fn url(gateway: &TestGateway, query: &str) -> String {
    format!("http://{}/sse?{query}", gateway.addr)
}

/// Opens a stream and reads its welcome.
async fn open(gateway: &TestGateway, query: &str, headers: &[(&str, &str)]) -> SseClient {
    let mut client = SseClient::open(&url(gateway, query), headers).await.expect("the stream opens");
    let welcome = client.next_event().await;
    assert_eq!((welcome.event.as_str(), welcome.retry, welcome.id.as_deref()), ("welcome", Some(1000), None));
    client
}

#[tokio::test]
async fn events_carry_seq_kind_and_payload_and_last_event_id_resumes_exactly() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let query = format!("token={}&device=feed&topics=news", token_with("lena", &["news"], 3600));
    let mut stream = open(&gateway, &query, &[]).await;

    let pretty = "{\n  \"text\": \"two\\nlines\"\r\n}";
    let (personal, _) = publisher.publish_with("push.user.lena", &[("Herald-Type", "mail")], pretty).await;
    let topic = publisher.publish("push.topic.news", r#"{"n":2}"#).await;
    let all = publisher.publish("push.all", r#"{"n":3}"#).await;
    let event = stream.next_event().await;
    assert_eq!((event.id, event.event.as_str()), (Some(personal.to_string()), "mail"));
    assert_eq!(event.data, "{\n  \"text\": \"two\\nlines\"\n}", "one data line per payload line");
    for (seq, data) in [(topic, r#"{"n":2}"#), (all, r#"{"n":3}"#)] {
        let event = stream.next_event().await;
        assert_eq!((event.id, event.event.as_str(), event.data.as_str()), (Some(seq.to_string()), "message", data));
    }
    drop(stream);

    let missed = [publisher.publish("push.user.lena", "4").await, publisher.publish("push.topic.news", "5").await];
    // The browser says it saw up to the topic message (the device's cursor is further on: what
    // the client's TCP acknowledged): the stream resumes exactly there.
    // The URL stays what the page first gave (here a `since` and the epoch of a stream long gone):
    // `Last-Event-ID` wins, without that epoch.
    let last = topic.to_string();
    let first_url = format!("{query}&since=1&epoch=abc");
    let mut stream = open(&gateway, &first_url, &[("Last-Event-ID", &last)]).await;
    for (seq, data) in [(all, r#"{"n":3}"#), (missed[0], "4"), (missed[1], "5")] {
        let event = stream.next_event().await;
        assert_eq!((event.id, event.data.as_str()), (Some(seq.to_string()), data));
    }
    let replayed = stream.next_event().await;
    assert_eq!(replayed.event, "replayed");
    let replayed: serde_json::Value = serde_json::from_str(&replayed.data).unwrap();
    assert_eq!((replayed["from"].as_u64(), replayed["count"].as_u64()), (Some(topic + 1), Some(3)));
    let live = publisher.publish("push.user.lena", "6").await;
    assert_eq!(stream.next_event().await.id, Some(live.to_string()));
}

#[tokio::test]
async fn errors_before_the_stream_are_an_http_status_and_json() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let refused = |query: String, headers: Vec<(&'static str, &'static str)>| {
        let url = url(&gateway, &query);
        async move { SseClient::open(&url, &headers).await.err().expect("refused") }
    };
    let (status, body) = refused(String::new(), vec![]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    let (status, body) = refused(format!("token={}&topics=secret", token("max")), vec![]).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = refused(format!("token={}", token("max")), vec![("Last-Event-ID", "yesterday")]).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("Last-Event-ID must be a sequence number")));
    // A bearer header works as the query does.
    let bearer = format!("Bearer {}", token("max"));
    let mut client = SseClient::open(&url(&gateway, ""), &[("Authorization", &bearer)]).await.unwrap();
    assert_eq!(client.next_event().await.event, "welcome");
}

#[tokio::test]
async fn comments_keep_an_idle_stream_and_a_restart_ends_it_with_a_close_event() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |config| config.heartbeat = Duration::from_millis(200)).await;
    let mut stream = open(&gateway, &format!("token={}", token("nina")), &[]).await;
    // Many heartbeat periods and timeouts pass: the client never speaks, and the stream stays.
    for _ in 0..10 {
        let comment = stream.next().await.expect("the stream goes on");
        assert_eq!((comment.comment, comment.data.as_str()), (true, ": ping"));
    }
    let seq = publisher.publish("push.user.nina", "1").await;
    assert_eq!(stream.next_event().await.id, Some(seq.to_string()));

    gateway.shutdown().await;
    let close = stream.next_event().await;
    assert_eq!(
        (close.event.as_str(), close.data.as_str()),
        ("close", r#"{"code":1012,"reason":"gateway restarting"}"#)
    );
    assert_eq!(stream.next().await, None, "the stream ends");
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_on_its_own_connection_ends_its_session_at_once() {
    let nats = TestNats::start().await;
    // No heartbeat comes while the test runs: nothing is written that could fail.
    let gateway = TestGateway::start_with(&nats, |config| config.heartbeat = Duration::from_secs(3600)).await;
    let staying = open(&gateway, &format!("token={}", token("olga")), &[]).await;
    let leaving = open(&gateway, &format!("token={}", token("pia")), &[]).await;
    gateway.wait_metric("herald_gateway_connections", 2.0).await;
    drop(leaving);
    gateway.wait_metric("herald_gateway_connections", 1.0).await;
    drop(staying);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_on_a_reused_connection_ends_its_session_at_the_next_heartbeat() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |config| config.heartbeat = Duration::from_millis(200)).await;
    let mut after_a_request = HandClient::kept_alive(&gateway).await;
    after_a_request.stream(&format!("token={}", token("pia"))).await;
    gateway.wait_metric("herald_gateway_connections", 1.0).await;
    drop(after_a_request);
    // Nothing tells the session that the client left but its next write (a heartbeat comment).
    gateway.wait_metric("herald_gateway_connections", 0.0).await;
}

#[tokio::test]
async fn a_stream_asked_on_a_connection_that_served_a_request_comes_chunked_and_exact() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    // A fresh connection's stream is written on the connection itself: it ends with the connection.
    let direct = open(&gateway, &format!("token={}", token("rosa")), &[]).await;
    assert_eq!(direct.header("connection").as_deref(), Some("close"));
    assert_eq!(direct.header("transfer-encoding"), None);

    let mut kept = HandClient::kept_alive(&gateway).await;
    let head = kept.stream(&format!("token={}&device=kept", token("rosa"))).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    kept.read_until("event: welcome").await;
    let seq = publisher.publish("push.user.rosa", r#"{"n":1}"#).await;
    kept.read_until(&format!("id: {seq}\nevent: message\ndata: {{\"n\":1}}\n\n")).await;
}

#[tokio::test]
async fn a_stream_whose_request_head_comes_in_parts_still_has_the_connection_to_itself() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let mut client = HandClient::connect(&gateway).await;
    // A head longer than one TCP segment, as with a long token or cookies: it comes in two parts,
    // the second one a moment later (the pause makes the parts arrive apart; nothing waits on it).
    let cookie = format!("cookie: session={}\r\n", "c".repeat(3000));
    client.send(&format!("GET /sse?token={} HTTP/1.1\r\nhost: gateway\r\n", token("uma"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.send(&format!("{cookie}\r\n")).await;
    let head = client.stream_head().await;
    assert!(head.contains("connection: close") && !head.contains("transfer-encoding"), "{head}");
    client.read_until("event: welcome").await;
    let seq = publisher.publish("push.user.uma", r#"{"n":1}"#).await;
    client.read_until(&format!("id: {seq}\nevent: message\ndata: {{\"n\":1}}\n\n")).await;
}

/// A stream on a kept-alive connection counts in its device's cursor what the client's TCP
/// acknowledged, not what went into the HTTP layer: a client that stops reading is given up on
/// (a slow consumer) and then leaves, and what was still in the gateway's pipe, its HTTP buffer or
/// its socket's send queue comes on the device's next stream, opened without `Last-Event-ID` (a
/// page loaded again). None of it came when the cursor counted what was written.
#[tokio::test]
async fn a_stream_on_a_reused_connection_counts_in_its_cursor_what_reached_the_client() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.write_stall_timeout = Duration::from_secs(1);
        c.socket_send_buffer = 16 * 1024;
    })
    .await;
    let publisher = Publisher::new(&nats).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut first = HandClient::kept_alive_on(socket.connect(gateway.addr).await.unwrap()).await;
    let query = format!("token={}&device=tab", token("vera"));
    first.stream(&query).await;
    // A first message reaches the client and its cursor (so that the next stream resumes from
    // the cursor); then the client reads nothing more, from the end of that message's chunk.
    let seq = publisher.publish("push.user.vera", "first").await;
    first.read_until(&format!("id: {seq}\n")).await;
    first.read_until("\n\n\r\n").await;
    assert_eq!(nats.device_cursor_at_least("vera.tab", seq).await, seq);
    // Fewer than the stream keeps per subject (1000), which could otherwise trim what is missed.
    let body = "x".repeat(4000);
    let sent = gateway.publish_until_slow_consumer_close(&publisher, "push.user.vera", &body, 400).await;
    // What reached the client is in its socket's buffer, untouched since the stream stalled; it
    // leaves without reading it (the connection is reset).
    let got = first.received_ids().await;
    assert!(!got.is_empty() && got.len() < sent.len(), "{} of {} in the client's buffers", got.len(), sent.len());
    drop(first);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    let mut again = open(&gateway, &query, &[]).await;
    let mut received: std::collections::BTreeSet<u64> = got.into_iter().collect();
    while !received.contains(sent.last().unwrap()) {
        let event = again.next_event().await;
        if let Some(id) = event.id {
            received.insert(id.parse().unwrap());
        }
    }
    let missed: Vec<u64> = sent.into_iter().filter(|seq| !received.contains(seq)).collect();
    assert_eq!(missed, Vec::<u64>::new(), "never delivered");
}

/// The cursor of a stream on a kept-alive connection reaches KV while the stream lasts, once the
/// client's TCP acknowledged what it was sent.
#[tokio::test]
async fn a_quiet_stream_on_a_reused_connection_writes_its_cursor_while_it_lasts() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start_with(&nats, |c| c.heartbeat = Duration::from_secs(300)).await;
    let mut client = HandClient::kept_alive(&gateway).await;
    client.stream(&format!("token={}&device=tab", token("wim"))).await;
    client.read_until("event: welcome").await;
    let seq = publisher.publish("push.user.wim", "hello").await;
    client.read_until(&format!("id: {seq}\n")).await;
    assert_eq!(nats.device_cursor_at_least("wim.tab", seq).await, seq);
}

/// A client that writes its requests by hand.
struct HandClient {
    socket: tokio::net::TcpStream,
    read: String,
}

impl HandClient {
    async fn connect(gateway: &TestGateway) -> HandClient {
        let socket = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        socket.set_nodelay(true).unwrap();
        HandClient { socket, read: String::new() }
    }

    /// Connects and has `/healthz` answered on the connection before asking it for a stream, as
    /// a browser may when it reuses a kept-alive connection.
    async fn kept_alive(gateway: &TestGateway) -> HandClient {
        HandClient::kept_alive_on(tokio::net::TcpStream::connect(gateway.addr).await.unwrap()).await
    }

    /// [`HandClient::kept_alive`] on a socket already connected.
    async fn kept_alive_on(socket: tokio::net::TcpStream) -> HandClient {
        socket.set_nodelay(true).unwrap();
        let mut client = HandClient { socket, read: String::new() };
        client.send("GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n").await;
        let head = client.read_until("\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length = head.lines().find_map(|line| line.strip_prefix("content-length: ")).expect("a length");
        client.read_bytes(length.trim().parse().unwrap()).await;
        client
    }

    /// Asks for a stream; its response head.
    async fn stream(&mut self, query: &str) -> String {
        assert_eq!(self.read, "", "nothing left of the previous response");
        self.send(&format!("GET /sse?{query} HTTP/1.1\r\nhost: gateway\r\n\r\n")).await;
        self.stream_head().await
    }

    /// The response head of a stream asked for.
    async fn stream_head(&mut self) -> String {
        let head = self.read_until("\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        head
    }

    /// The ids of the whole events of a chunked stream, read so far or waiting in the socket's
    /// buffer, which is left as it is (peeked).
    async fn received_ids(&self) -> Vec<u64> {
        let mut buffer = vec![0; 4 << 20];
        let peek = tokio::time::timeout(herald_tests::ws::FRAME_TIMEOUT, self.socket.peek(&mut buffer));
        let peeked = peek.await.expect("bytes in the socket's buffer").unwrap();
        let mut raw = self.read.as_bytes().to_vec();
        raw.extend_from_slice(&buffer[..peeked]);
        // The chunks' framing: a hexadecimal size line, the chunk, a line end.
        let mut body = Vec::new();
        let mut rest = &raw[..];
        while let Some(end) = rest.windows(2).position(|two| two == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap(), 16).unwrap();
            let chunk = &rest[end + 2..];
            body.extend_from_slice(&chunk[..size.min(chunk.len())]);
            if chunk.len() < size + 2 {
                break;
            }
            rest = &chunk[size + 2..];
        }
        let body = String::from_utf8_lossy(&body);
        let whole = &body[..body.rfind("\n\n").map_or(0, |end| end + 2)];
        whole.lines().filter_map(|line| line.strip_prefix("id: ")).map(|id| id.parse().unwrap()).collect()
    }

    /// Reads `count` bytes (a body).
    async fn read_bytes(&mut self, count: usize) {
        while self.read.len() < count {
            self.read_more("a body's end").await;
        }
        self.read.drain(..count);
    }

    async fn send(&mut self, request: &str) {
        use tokio::io::AsyncWriteExt;
        self.socket.write_all(request.as_bytes()).await.unwrap();
    }

    /// Reads until `text` has come; what came up to it.
    async fn read_until(&mut self, text: &str) -> String {
        loop {
            if let Some(at) = self.read.find(text) {
                let upto = self.read[..at + text.len()].to_string();
                self.read.drain(..at + text.len());
                return upto;
            }
            self.read_more(text).await;
        }
    }

    /// Reads what comes next into `read`; `awaited` says what for, if nothing comes.
    async fn read_more(&mut self, awaited: &str) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0; 4096];
        let read = tokio::time::timeout(herald_tests::ws::FRAME_TIMEOUT, self.socket.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {awaited:?} in time: {}", self.read))
            .unwrap();
        assert!(read > 0, "the connection ended before {awaited:?}: {}", self.read);
        self.read.push_str(std::str::from_utf8(&buf[..read]).unwrap());
    }
}

/// Two tabs streaming for one user without naming a device both stay and both get the user's
/// messages (under `multi`, streams naming no device share it instead of replacing each other).
#[tokio::test]
async fn two_streams_naming_no_device_both_stay() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let query = format!("token={}", token_with("tabby", &[], 3600));
    let mut one = open(&gateway, &query, &[]).await;
    let mut two = open(&gateway, &query, &[]).await;
    // Twice: a replacement (4009) that came after the first message would show before the second.
    for text in ["to both", "still both"] {
        let seq = publisher.publish("push.user.tabby", text).await;
        for stream in [&mut one, &mut two] {
            let mut event = stream.next_event().await;
            if event.event == "replayed" {
                event = stream.next_event().await;
            }
            assert_eq!((event.id, event.data.as_str()), (Some(seq.to_string()), text), "{}", event.event);
        }
    }
}

/// A new device's stream gets its unread messages, not the broadcasts stored before it opened:
/// once it has them, its cursor is the welcome's `seq`, and the next stream without
/// `Last-Event-ID` (a page loaded again) does not get those broadcasts either. (The cursor stayed
/// at the last unread message, and the broadcasts after it came on the next stream.)
#[tokio::test]
async fn a_new_devices_cursor_passes_the_broadcasts_from_before_its_first_stream() {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = TestGateway::start(&nats).await;
    let unread = publisher.publish("push.user.nell", "1").await;
    for n in 0..2 {
        publisher.publish("push.all", &n.to_string()).await;
    }
    let query = format!("token={}&device=tab", token("nell"));
    let mut stream = open(&gateway, &query, &[]).await;
    assert_eq!(stream.next_event().await.id, Some(unread.to_string()));
    let replayed: serde_json::Value = serde_json::from_str(&stream.next_event().await.data).unwrap();
    let end = replayed["to"].as_u64().unwrap().max(unread);
    let stream_end =
        nats.jetstream().await.get_stream("HERALD").await.unwrap().info().await.unwrap().state.last_sequence;
    assert!(stream_end > end, "the broadcasts come after the unread message");
    assert_eq!(nats.device_cursor_at_least("nell.tab", stream_end).await, stream_end);
    drop(stream);
    gateway.wait_metric("herald_gateway_connections", 0.0).await;

    let mut again = open(&gateway, &query, &[]).await;
    let news = publisher.publish("push.all", "news").await;
    loop {
        let event = again.next_event().await;
        match event.event.as_str() {
            "replayed" => continue,
            _ => break assert_eq!(event.id, Some(news.to_string())),
        }
    }
}
