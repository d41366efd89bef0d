//! The bare broadcaster (`herald-bench raw-server`): the least a WebSocket push server can do on
//! this machine, as a yardstick for Herald.
//!
//! Core NATS in, no auth, no stream, no JSON. Every `push.all` message is encoded once as a text
//! frame into one shared ring ([`ring`]) that each socket's own task reads at its own position:
//! the fan-out pushes nothing per socket, and the sockets' work spreads over every worker thread.
//! `push.user.<id>` messages go to a per-socket mailbox ([`mailbox`], [`users`]). A socket's task
//! ([`socket`]) sends everything queued for it, ring and mailbox, in one vectored write
//! ([`batch`]). Upgrades go through hyper and fastwebsockets, as in the gateway. After registering
//! a socket the server sends a `ready` text frame, so clients know when they are live.

mod batch;
mod frame;
mod mailbox;
mod ring;
mod socket;
mod users;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;

use socket::WriteLimits;
use users::Users;

/// About the most bytes a socket sends in one write.
const BATCH_BYTES: usize = 256 * 1024;

/// How the raw broadcaster runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RawOptions {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Entries of the broadcast ring (rounded up to a power of two). A socket that falls this many
    /// entries behind the newest is closed (slow consumer).
    #[arg(long, default_value_t = 8192)]
    pub ring_entries: usize,
    /// Most `push.all` messages joined into one ring entry when they arrive together.
    #[arg(long, default_value_t = 64)]
    pub coalesce: usize,
    /// Most bytes queued in one socket's unicast mailbox; a socket over it is closed (slow
    /// consumer).
    #[arg(long, default_value_t = 1 << 20)]
    pub queue_bytes: usize,
    /// Most buffers (ring entries, each of one or more frames, and unicast frames) sent in one
    /// vectored write.
    #[arg(long, default_value_t = 64)]
    pub batch_frames: usize,
    /// Listen backlog (the kernel caps it at net.core.somaxconn). `TcpListener::bind` would use
    /// 128, which drops SYNs in a connect storm (each a 1 s retransmit).
    #[arg(long, default_value_t = 4096)]
    pub backlog: u32,
    /// Has NATS store every `push.>` message in a JetStream stream (file, one replica), as
    /// Herald's stream does, so that NATS does the same work for both; the server still reads the
    /// core subjects.
    #[arg(long)]
    pub store: bool,
}

/// The stream `--store` makes.
const STORE_STREAM: &str = "RAW_STORE";

/// What every socket shares: the broadcast ring, the users' mailboxes and the limits.
struct Hub {
    ring: broadcast::Sender<Bytes>,
    users: Arc<Users>,
    queue_bytes: usize,
    limits: WriteLimits,
}

impl Hub {
    /// Registers a socket (of `user`, if given) and serves it until it ends.
    async fn serve(&self, stream: TcpStream, user: Option<String>) {
        let ring = self.ring.subscribe();
        let mailbox = user.map(|user| self.users.register(user, self.queue_bytes));
        socket::run(stream, ring, mailbox, self.limits).await;
    }
}

/// Runs the broadcaster until its stdin closes (the tool that started it is gone) or it fails.
pub async fn serve(options: RawOptions) -> Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name("herald-bench raw-server")
        .subscription_capacity(1 << 16)
        .connect(options.nats_url.as_str())
        .await
        .context("connect to NATS")?;
    let hub = Arc::new(Hub {
        ring: ring::new(options.ring_entries),
        users: Arc::new(Users::default()),
        queue_bytes: options.queue_bytes,
        limits: WriteLimits { frames: options.batch_frames, bytes: BATCH_BYTES },
    });
    if options.store {
        let js = async_nats::jetstream::new(client.clone());
        let config = async_nats::jetstream::stream::Config {
            name: STORE_STREAM.into(),
            subjects: vec!["push.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            // Some minutes of the fastest fan-out (as Herald's stream, it discards nothing before),
            // so that a long run cannot fill the disk.
            max_bytes: 4 << 30,
            ..Default::default()
        };
        js.get_or_create_stream(config).await.context("create the store stream")?;
    }
    let all = client.subscribe("push.all").await?;
    let each_user = client.subscribe("push.user.*").await?;
    client.flush().await?;
    tokio::spawn(ring::feed(all, hub.ring.clone(), options.coalesce));
    tokio::spawn(users::feed(each_user, hub.users.clone()));
    let listener = listen(options.listen, options.backlog).with_context(|| format!("listen on {}", options.listen))?;
    tokio::select! {
        result = accept_loop(listener, hub) => result,
        _ = stdin_closed() => Ok(()),
    }
}

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn accept_loop(listener: TcpListener, hub: Arc<Hub>) -> Result<()> {
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
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| upgrade(request, hub.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
        });
    }
}

/// Answers an upgrade request and serves the socket once upgraded.
async fn upgrade(mut request: Request<Incoming>, hub: Arc<Hub>) -> Result<Response<Empty<Bytes>>, Infallible> {
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
            hub.serve(parts.io.into_inner(), user).await;
        }
    });
    Ok(response)
}

/// The `user` query parameter.
fn user_param(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("user=")).filter(|user| !user.is_empty()).map(str::to_string)
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

    #[test]
    fn reads_the_user_parameter() {
        assert_eq!(user_param("a=1&user=u7"), Some("u7".to_string()));
        assert_eq!(user_param("user="), None);
        assert_eq!(user_param("x=1"), None);
    }
}
