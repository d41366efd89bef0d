//! RFC 6455 over a real socket, with a client that writes its bytes by hand: the opening handshake
//! (checked before the origin and the token, as docs/protocol.md orders them), and the close code a
//! broken frame gets on the wire.

use std::time::Duration;

use herald_tests::gateway::token;
use herald_tests::{TestGateway, TestNats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(15);

/// The key of RFC 6455 §1.3, and the accept value the RFC gives for it.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// An HTTP response: status, headers (names in lower case) and body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `head` (an HTTP request without its final empty line) and reads the response head, and the
/// body when one is announced. The socket is returned for what follows a 101.
async fn send(gateway: &TestGateway, head: &str) -> (Response, TcpStream) {
    let mut socket = TcpStream::connect(gateway.addr).await.unwrap();
    socket.write_all(format!("{head}\r\n\r\n").as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut byte = [0u8];
        let read = tokio::time::timeout(TIMEOUT, socket.read(&mut byte)).await.expect("a response").unwrap();
        assert_eq!(read, 1, "the connection closed before a response: {}", String::from_utf8_lossy(&received));
        received.push(byte[0]);
    };
    let text = String::from_utf8(received[..head_end].to_vec()).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; length];
    tokio::time::timeout(TIMEOUT, socket.read_exact(&mut body)).await.expect("a body").unwrap();
    (Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() }, socket)
}

/// A handshake to `/ws?<query>` with the usual headers, less those named in `without`, plus `extra`.
fn handshake(query: &str, without: &[&str], extra: &[&str]) -> String {
    let mut lines = vec!["GET /ws?".to_string() + query + " HTTP/1.1"];
    for header in ["Host: herald.test", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"]
        .into_iter()
        .map(str::to_string)
        .chain([format!("Sec-WebSocket-Key: {KEY}")])
    {
        if !without.iter().any(|name| header.starts_with(name)) {
            lines.push(header);
        }
    }
    lines.extend(extra.iter().map(|line| line.to_string()));
    lines.join("\r\n")
}

#[tokio::test]
async fn the_opening_handshake_follows_rfc_6455() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let good = format!("token={}", token("alice"));

    // §4.2.2: 101 with the accept value of the key (the RFC's own example, §1.3).
    let (response, _socket) = send(&gateway, &handshake(&good, &[], &[])).await;
    assert_eq!(response.status, 101);
    assert_eq!(response.header("sec-websocket-accept"), Some(ACCEPT));
    assert_eq!(response.header("upgrade").map(str::to_ascii_lowercase).as_deref(), Some("websocket"));
    assert_eq!(response.header("connection").map(str::to_ascii_lowercase).as_deref(), Some("upgrade"));
    assert_eq!(response.header("sec-websocket-extensions"), None, "no extension is negotiated");

    // The handshake is checked first: these have no token and a refused origin, and still get the
    // handshake's answer.
    let cases = [
        ("§4.2.1 item 3", handshake("", &["Upgrade"], &["Origin: https://evil.example"]), 426, "upgrade_required"),
        ("§4.2.1 item 4", handshake("", &["Connection"], &["Origin: https://evil.example"]), 426, "upgrade_required"),
        ("§4.4", handshake("", &["Sec-WebSocket-Version"], &["Sec-WebSocket-Version: 8"]), 426, "upgrade_required"),
        ("§4.4", handshake("", &["Sec-WebSocket-Version"], &[]), 426, "upgrade_required"),
        ("§4.2.1 item 5", handshake("", &["Sec-WebSocket-Key"], &["Origin: https://evil.example"]), 400, "bad_request"),
        ("§4.2.1 item 5", handshake("", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: c2hvcnQ="]), 400, "bad_request"),
        ("§4.2.1 item 2", handshake("", &["Host"], &[]), 400, ""),
        ("§4.2.1 item 1", handshake("", &[], &[]).replace("HTTP/1.1", "HTTP/1.0"), 400, "bad_request"),
    ];
    for (rfc, request, status, error) in cases {
        let (response, _) = send(&gateway, &request).await;
        assert_eq!(response.status, status, "{rfc}: {request}");
        if !error.is_empty() {
            let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
            assert_eq!(body["error"], error, "{rfc}: {request}");
        }
        if status == 426 {
            // §4.4: the versions this server speaks; RFC 9110 §15.5.22: what to upgrade to.
            assert_eq!(response.header("sec-websocket-version"), Some("13"), "{rfc}");
            assert_eq!(response.header("upgrade"), Some("websocket"), "{rfc}");
        }
    }
    // A good handshake: then the origin, then the token.
    let (response, _) = send(&gateway, &handshake(&good, &[], &["Origin: https://evil.example"])).await;
    assert_eq!(response.status, 403);
    let (response, _) = send(&gateway, &handshake("", &[], &[])).await;
    assert_eq!(response.status, 401);
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [1, 2, 3, 4];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads server frames until a close or a pong; returns its opcode and payload.
async fn read_until_close_or_pong(socket: &mut TcpStream) -> (u8, Vec<u8>) {
    loop {
        let mut head = [0u8; 2];
        tokio::time::timeout(TIMEOUT, socket.read_exact(&mut head)).await.expect("a frame").unwrap();
        let len = match head[1] & 0x7F {
            126 => usize::from(socket.read_u16().await.unwrap()),
            127 => socket.read_u64().await.unwrap() as usize,
            len => usize::from(len),
        };
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await.unwrap();
        let opcode = head[0] & 0x0F;
        if opcode == 0x8 || opcode == 0xA {
            return (opcode, payload);
        }
    }
}

#[tokio::test]
async fn a_broken_frame_gets_the_rfc_close_code_on_the_wire() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut unmasked = frame(0x81, b"hi");
    unmasked[1] &= 0x7F;
    unmasked.drain(2..6);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("§5.1 an unmasked frame", unmasked, 1002),
        ("§5.2 a reserved bit", frame(0xC1, b"hi"), 1002),
        ("§5.2 a reserved opcode", frame(0x83, b""), 1002),
        ("§5.4 a continuation without a message", frame(0x80, b"hi"), 1002),
        ("§5.4 a fragmented ping", frame(0x09, b""), 1002),
        ("§5.5.1 a close of one byte", frame(0x88, &[3]), 1002),
        ("§7.4.2 close code 1005 may not be sent", frame(0x88, &1005u16.to_be_bytes()), 1002),
        ("§8.1 text that is not UTF-8", frame(0x81, &[0xce, 0xff]), 1007),
        ("§5.5.1 a close reason that is not UTF-8", frame(0x88, &[0x03, 0xe8, 0xff]), 1007),
        ("Herald's contract: a binary message", frame(0x82, b"bin"), 1008),
        ("§7.4.1 close code 3000 is echoed", frame(0x88, &3000u16.to_be_bytes()), 3000),
        ("§5.5.1 a close without a code gets 1000", frame(0x88, b""), 1000),
    ];
    for (what, sent, code) in cases {
        let (response, mut socket) = send(&gateway, &handshake(&format!("token={}", token("bob")), &[], &[])).await;
        assert_eq!(response.status, 101);
        // A ping first: its pong shows the session reads frames (it does once the welcome is sent).
        socket.write_all(&frame(0x89, b"are you there")).await.unwrap();
        assert_eq!(read_until_close_or_pong(&mut socket).await, (0xA, b"are you there".to_vec()), "{what}");
        socket.write_all(&sent).await.unwrap();
        let (opcode, payload) = read_until_close_or_pong(&mut socket).await;
        assert_eq!(opcode, 0x8, "{what}");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code, "{what}");
    }
}
