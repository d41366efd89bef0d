//! Health checks over plain HTTP/1.1: a gateway's `/readyz`, a NATS node's `/healthz`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one health check may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Whether `GET path` on `addr` answers 200 within a few seconds.
pub async fn is_ok(addr: SocketAddr, path: &str) -> bool {
    matches!(tokio::time::timeout(TIMEOUT, status(addr, path)).await, Ok(Some(200)))
}

/// The status code of `GET path` on `addr`, if it answered.
async fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    String::from_utf8_lossy(&response).split_whitespace().nth(1)?.parse().ok()
}
