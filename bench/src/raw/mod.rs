//! The bare broadcaster (`herald-bench raw-server`): the least a WebSocket push server can do on
//! this machine, as a yardstick for Herald.
//!
//! One NATS subscription on `push.all` (and one on `push.user.*`, for the unicast scenario), no
//! auth, no stream, no JSON: each message's payload becomes one text frame, built once and shared
//! as [`Bytes`] by every socket it goes to; each socket's writer sends everything queued for it in
//! one vectored write. Upgrades go through hyper and fastwebsockets, as in the gateway. After
//! registering a socket the server sends a `ready` text frame, so clients know when they are live.

mod outbound;
mod registry;
mod socket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use registry::Registry;

/// How the raw broadcaster runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RawOptions {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Most bytes queued for one socket; a socket over it is closed (slow consumer).
    #[arg(long, default_value_t = 1 << 20)]
    pub queue_bytes: usize,
    /// Most frames sent in one vectored write.
    #[arg(long, default_value_t = 64)]
    pub batch_frames: usize,
    /// Listen backlog (the kernel caps it at net.core.somaxconn). `TcpListener::bind` would use
    /// 128, which drops SYNs in a connect storm (each a 1 s retransmit).
    #[arg(long, default_value_t = 4096)]
    pub backlog: u32,
}

/// Runs the broadcaster until its stdin closes (the tool that started it is gone) or it fails.
pub async fn serve(options: RawOptions) -> Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name("herald-bench raw-server")
        .subscription_capacity(1 << 16)
        .connect(options.nats_url.as_str())
        .await
        .context("connect to NATS")?;
    let registry = Arc::new(Registry::default());
    let all = client.subscribe("push.all").await?;
    let users = client.subscribe("push.user.*").await?;
    client.flush().await?;
    tokio::spawn(feed(all, registry.clone()));
    tokio::spawn(feed(users, registry.clone()));
    let listener = listen(options.listen, options.backlog).with_context(|| format!("listen on {}", options.listen))?;
    let options = Arc::new(options);
    tokio::select! {
        result = accept_loop(listener, registry, options) => result,
        _ = stdin_closed() => Ok(()),
    }
}

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>, options: Arc<RawOptions>) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (registry, options) = (registry.clone(), options.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| upgrade(request, registry.clone(), options.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
        });
    }
}

/// Answers an upgrade request and runs the socket once upgraded.
async fn upgrade(
    mut request: Request<Incoming>,
    registry: Arc<Registry>,
    options: Arc<RawOptions>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let user = request.uri().query().and_then(user_param);
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(upgrade) => upgrade,
        Err(_) => {
            let mut refused = Response::new(Empty::new());
            *refused.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(refused);
        }
    };
    tokio::spawn(async move {
        let Ok(socket) = upgrade.await else { return };
        let upgraded = socket.into_inner().into_inner();
        // The listener only gives TCP streams, so the downcast always succeeds.
        if let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() {
            socket::run(parts.io.into_inner(), registry, user, &options).await;
        }
    });
    Ok(response)
}

/// The `user` query parameter.
fn user_param(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("user=")).filter(|user| !user.is_empty()).map(str::to_string)
}

/// Moves every message of `subscription` to the sockets it is for.
async fn feed(mut subscription: async_nats::Subscriber, registry: Arc<Registry>) {
    while let Some(message) = subscription.next().await {
        let frame = text_frame(&message.payload);
        match message.subject.as_str().strip_prefix("push.user.") {
            Some(user) => registry.unicast(user, &frame),
            None => registry.broadcast(&frame),
        }
    }
}

/// A final, unmasked text frame holding `payload`.
pub(crate) fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.put_u8(0x81);
    match payload.len() {
        len @ 0..=125 => frame.put_u8(len as u8),
        len @ 126..=0xffff => {
            frame.put_u8(126);
            frame.put_u16(len as u16);
        }
        len => {
            frame.put_u8(127);
            frame.put_u64(len as u64);
        }
    }
    frame.put_slice(payload);
    frame.freeze()
}

/// Resolves when stdin reaches its end.
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ws::{Frame, OP_TEXT, Parsed, parse};

    #[test]
    fn frames_parse_back() {
        for len in [0, 100, 200, 70_000] {
            let payload = vec![b'p'; len];
            let frame = text_frame(&payload);
            assert_eq!(
                parse(&frame),
                Parsed::Frame(Frame { fin: true, opcode: OP_TEXT, payload: &payload }, frame.len())
            );
        }
    }

    #[test]
    fn reads_the_user_parameter() {
        assert_eq!(user_param("a=1&user=u7"), Some("u7".to_string()));
        assert_eq!(user_param("user="), None);
        assert_eq!(user_param("x=1"), None);
    }
}
