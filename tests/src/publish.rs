//! Publishing as a backend does: JetStream publishes, with the stored sequence returned.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};

/// A JetStream publisher.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    /// Publishes as the `publisher` user, as a backend would.
    pub async fn new(nats: &crate::TestNats) -> Publisher {
        let client = nats.client_as(crate::nats::Role::Publisher).await.expect("connect as publisher");
        Publisher { js: jetstream::new(client) }
    }

    /// Publishes `body` to `subject` and returns its stream sequence.
    pub async fn publish(&self, subject: &str, body: &str) -> u64 {
        self.publish_with(subject, &[], body).await.0
    }

    /// Publishes with headers; returns the sequence and whether the stream saw it as a duplicate.
    pub async fn publish_with(&self, subject: &str, headers: &[(&str, &str)], body: &str) -> (u64, bool) {
        let ack = self.send(subject, headers, body).await.await.expect("publish acknowledged");
        (ack.sequence, ack.duplicate)
    }

    /// Sends without waiting for the acknowledgement (for fast, pipelined publishing).
    pub async fn send(&self, subject: &str, headers: &[(&str, &str)], body: &str) -> PublishAckFuture {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.js.publish_with_headers(subject.to_string(), map, body.to_string().into()).await.expect("publish sent")
    }

    /// The underlying JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

/// Publishes `body` to `subject` with header lines written byte for byte (any bytes a NATS client
/// may send, some no SDK would), as the `publisher` user over a connection of its own; returns the
/// stream sequence from JetStream's acknowledgement.
pub async fn publish_raw(nats: &crate::TestNats, subject: &str, header_lines: &[&[u8]], body: &[u8]) -> u64 {
    let lines: Vec<&[u8]> = std::iter::once(&b"NATS/1.0"[..]).chain(header_lines.iter().copied()).collect();
    publish_raw_block(nats, subject, &lines, body).await
}

/// [`publish_raw`] with the header block's first line too (`NATS/1.0`, perhaps with a status).
pub async fn publish_raw_block(nats: &crate::TestNats, subject: &str, lines: &[&[u8]], body: &[u8]) -> u64 {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let address = nats.url().trim_start_matches("nats://").to_string();
    let (read, mut write) = tokio::net::TcpStream::connect(address).await.expect("NATS").into_split();
    let mut read = BufReader::new(read);
    let role = crate::nats::Role::Publisher;
    let connect = serde_json::json!({
        "user": role.user(), "pass": role.password(), "headers": true, "verbose": false, "pedantic": false,
    });
    let mut headers = Vec::new();
    for line in lines {
        headers.extend_from_slice(line);
        headers.extend_from_slice(b"\r\n");
    }
    headers.extend_from_slice(b"\r\n");
    let total = headers.len() + body.len();
    let head =
        format!("CONNECT {connect}\r\nSUB _INBOX.raw 1\r\nHPUB {subject} _INBOX.raw {} {total}\r\n", headers.len());
    let mut out = head.into_bytes();
    out.extend_from_slice(&headers);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    write.write_all(&out).await.expect("published");
    let mut line = String::new();
    loop {
        line.clear();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(30), read.read_line(&mut line)).await;
        answer.expect("NATS acknowledged the publish within 30 s").expect("an answer from NATS");
        assert!(!line.starts_with("-ERR") && !line.is_empty(), "NATS refused the publish: {line:?}");
        if line.starts_with("PING") {
            write.write_all(b"PONG\r\n").await.unwrap();
        }
        if let Some(size) = line.strip_prefix("MSG _INBOX.raw 1 ") {
            let mut ack = vec![0; size.trim().parse::<usize>().unwrap() + 2];
            read.read_exact(&mut ack).await.unwrap();
            let ack: serde_json::Value = serde_json::from_slice(&ack[..ack.len() - 2]).unwrap();
            return ack["seq"].as_u64().unwrap_or_else(|| panic!("not stored: {ack}"));
        }
    }
}
