//! A NATS server that leaves one subject's requests unanswered, as a stream without a leader does:
//! a TCP proxy in front of a [`TestNats`] that, once told to, drops what clients publish to that
//! subject and passes everything else through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::{TestNats, eventually};

pub struct NatsFilter {
    port: u16,
    filter: Arc<Filter>,
}

struct Filter {
    subject: String,
    dropping: AtomicBool,
    dropped: AtomicUsize,
}

impl NatsFilter {
    /// Listens on a free loopback port and connects each client to `nats`.
    pub async fn start(nats: &TestNats, subject: &str) -> NatsFilter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the filter");
        let port = listener.local_addr().unwrap().port();
        let upstream = nats.url().trim_start_matches("nats://").to_string();
        let filter = Arc::new(Filter { subject: subject.to_string(), dropping: false.into(), dropped: 0.into() });
        let serving = filter.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward_filtered(client_read, server_write, serving.clone()));
                tokio::spawn(copy(server_read, client_write));
            }
        });
        NatsFilter { port, filter }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// From now on, what clients publish to the subject goes nowhere.
    pub fn drop_publishes(&self) {
        self.filter.dropping.store(true, Ordering::SeqCst);
    }

    /// From now on, what clients publish to the subject goes through again.
    pub fn pass_publishes(&self) {
        self.filter.dropping.store(false, Ordering::SeqCst);
    }

    /// Waits until `count` publishes to the subject were dropped.
    pub async fn wait_dropped(&self, count: usize) {
        eventually("publishes dropped", Duration::from_secs(30), || async {
            (self.filter.dropped.load(Ordering::SeqCst) >= count).then_some(())
        })
        .await;
    }
}

async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
}

/// Passes the client's protocol on, operation by operation, leaving out `PUB`s and `HPUB`s to the
/// filtered subject while dropping.
async fn forward_filtered(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, filter: Arc<Filter>) {
    let mut buffer = Vec::new();
    let mut passed = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(len) = operation_len(&buffer) {
            let operation: Vec<u8> = buffer.drain(..len).collect();
            if filter.drops(&operation) {
                filter.dropped.fetch_add(1, Ordering::SeqCst);
            } else {
                passed.extend_from_slice(&operation);
            }
        }
        if !passed.is_empty() && to.write_all(&std::mem::take(&mut passed)).await.is_err() {
            return;
        }
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

impl Filter {
    fn drops(&self, operation: &[u8]) -> bool {
        let line = String::from_utf8_lossy(&operation[..operation.len().min(512)]);
        let mut words = line.split_ascii_whitespace();
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        (verb == "PUB" || verb == "HPUB")
            && words.next() == Some(self.subject.as_str())
            && self.dropping.load(Ordering::SeqCst)
    }
}

/// The length of the first whole operation in `buffer` (its line, and for `PUB`/`HPUB` the payload
/// and its CRLF), if it has arrived.
fn operation_len(buffer: &[u8]) -> Option<usize> {
    let line_end = buffer.windows(2).position(|pair| pair == b"\r\n")? + 2;
    let line = String::from_utf8_lossy(&buffer[..line_end]);
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let verb = words.first().map(|verb| verb.to_ascii_uppercase()).unwrap_or_default();
    let len = match verb.as_str() {
        // The last word is the payload's size (for HPUB, headers included).
        "PUB" | "HPUB" => {
            let size = words.last().and_then(|size| size.parse::<usize>().ok());
            line_end + size.unwrap_or_else(|| panic!("a {verb} without a size: {line:?}")) + 2
        }
        _ => line_end,
    };
    (buffer.len() >= len).then_some(len)
}
