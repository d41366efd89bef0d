//! The systems measured side by side, each started fresh as separate processes for every scenario:
//!
//! - `herald`: the gateway binary in front of nats-server with JetStream (the gateway creates the
//!   `HERALD` stream);
//! - `nats-ws`: nats-server's own WebSocket listener; clients speak the NATS protocol;
//! - `raw`: the bare broadcaster of this crate ([`crate::raw`]) fed by core NATS.
//!
//! Every target takes publishes on the same subjects (`push.all`, `push.user.<id>`) on its
//! nats-server, so the publisher and the clients are the same code for all three.

mod nats;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use herald_shared::token::{Claims, issue_hs256, now_secs};
use serde::Serialize;
use tokio::process::Command;

use crate::client::{ClientSpec, Protocol};
use crate::process::{Spawned, free_port};
pub use nats::{NatsFeatures, NatsServer};

/// The HS256 secret the benchmark's gateways accept and its clients' tokens are signed with.
const SECRET: &str = "herald-bench-secret";

/// A system under measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The Herald gateway with NATS JetStream.
    Herald,
    /// nats-server's WebSocket listener, clients speaking NATS.
    NatsWs,
    /// The bare broadcaster: the practical limit of this machine.
    Raw,
    /// The Herald gateway, clients speaking STOMP 1.2 at /stomp (user queue and /topic/all).
    HeraldStomp,
    /// The Herald gateway with clients speaking the Centrifugal protocol (JSON).
    HeraldCentrifugal,
    /// The Herald gateway with clients speaking Socket.IO (WebSocket transport).
    HeraldSocketio,
    /// The Herald gateway, clients speaking STOMP over SockJS's WebSocket transport (as `herald-stomp`).
    HeraldSockjs,
    /// The Herald gateway with clients reading Server-Sent Events at /sse.
    HeraldSse,
}

/// An hour-long token for `user`.
fn bench_token(user: &str) -> String {
    let claims = Claims { sub: user.to_string(), exp: now_secs() + 3600, topics: Vec::new() };
    issue_hs256(SECRET.as_bytes(), &claims)
}

/// Device ids handed out to Herald connections, unique within this process.
static NEXT_DEVICE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl TargetKind {
    /// The name used in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Herald => "herald",
            TargetKind::NatsWs => "nats-ws",
            TargetKind::Raw => "raw",
            TargetKind::HeraldStomp => "herald-stomp",
            TargetKind::HeraldCentrifugal => "herald-centrifugal",
            TargetKind::HeraldSocketio => "herald-socketio",
            TargetKind::HeraldSockjs => "herald-sockjs",
            TargetKind::HeraldSse => "herald-sse",
        }
    }

    /// Whether the target is the Herald gateway (whatever protocol its clients speak).
    pub fn is_gateway(self) -> bool {
        matches!(
            self,
            TargetKind::Herald
                | TargetKind::HeraldStomp
                | TargetKind::HeraldCentrifugal
                | TargetKind::HeraldSocketio
                | TargetKind::HeraldSockjs
                | TargetKind::HeraldSse
        )
    }

    /// What holds the client sockets, for tables (`gateway`, `nats-server`, `raw-server`).
    pub fn server_name(self) -> &'static str {
        match self {
            TargetKind::Herald
            | TargetKind::HeraldStomp
            | TargetKind::HeraldCentrifugal
            | TargetKind::HeraldSocketio
            | TargetKind::HeraldSockjs
            | TargetKind::HeraldSse => "gateway",
            TargetKind::NatsWs => "nats-server",
            TargetKind::Raw => "raw-server",
        }
    }
}

/// Where the programs are and how to run them.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The nats-server binary.
    pub nats_server: PathBuf,
    /// The herald-gateway binary.
    pub gateway: PathBuf,
    /// This tool's binary (for `raw-server`).
    pub bench: PathBuf,
    /// Directory for the processes' logs.
    pub logs: PathBuf,
    /// `HERALD_LOG` for the gateway.
    pub gateway_log: String,
    /// Extra `KEY=VALUE` environment for the gateway (e.g. `HERALD_OUTBOUND_QUEUE_BYTES`).
    pub gateway_env: Vec<(String, String)>,
    /// Extra arguments of the raw server (e.g. `--ring-entries=16384`).
    pub raw_args: Vec<String>,
    /// The stream's messages kept per subject, when not the gateway's default (the replay scenario
    /// stores more than the default 1000 for one user).
    pub stream_max_msgs_per_subject: Option<u64>,
}

impl Tools {
    /// The log file of `process` for the run `label`.
    pub fn log_path(&self, label: &str, process: &str) -> PathBuf {
        self.logs.join(format!("{label}-{process}.log"))
    }
}

/// A running target.
pub struct Target {
    /// Which system this is.
    pub kind: TargetKind,
    nats: NatsServer,
    /// The gateway or the raw broadcaster (nats-ws has none besides NATS).
    server: Option<Spawned>,
    /// Where clients connect.
    ws_addr: SocketAddr,
}

impl Target {
    /// Starts `kind` and waits until it serves; `label` names its log files.
    pub async fn start(kind: TargetKind, tools: &Tools, label: &str) -> Result<Target> {
        // Raw's `--store` needs JetStream; without a stream it costs nothing.
        let jetstream = kind.is_gateway() || kind == TargetKind::Raw;
        let features = NatsFeatures { jetstream, websocket: kind == TargetKind::NatsWs };
        let nats = NatsServer::start(tools, features, label).await.context("start nats-server")?;
        let (server, ws_addr) = match kind {
            TargetKind::Herald
            | TargetKind::HeraldStomp
            | TargetKind::HeraldCentrifugal
            | TargetKind::HeraldSocketio
            | TargetKind::HeraldSockjs
            | TargetKind::HeraldSse => {
                let (gateway, addr) = start_gateway(tools, &nats, label).await.context("start the gateway")?;
                (Some(gateway), addr)
            }
            TargetKind::NatsWs => (None, local(nats.ws_port.expect("websocket enabled"))),
            TargetKind::Raw => {
                let (raw, addr) = start_raw(tools, &nats, label).await.context("start the raw broadcaster")?;
                (Some(raw), addr)
            }
        };
        Ok(Target { kind, nats, server, ws_addr })
    }

    /// The process that holds the client sockets: gateway, nats-server or raw broadcaster.
    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().map_or_else(|| self.nats.pid(), Spawned::pid)
    }

    /// The nats-server's process id.
    pub fn nats_pid(&self) -> u32 {
        self.nats.pid()
    }

    /// Whether NATS is a separate process from the socket server (Herald, raw).
    pub fn has_separate_nats(&self) -> bool {
        self.server.is_some()
    }

    /// Fails if a process of the target has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(server) = &mut self.server {
            server.check_running()?;
        }
        Ok(())
    }

    /// How `user` connects, from `source`; with `since`, a Herald client resumes (and waits for its
    /// `replayed` frame); the other targets have no resume and ignore it.
    pub fn client(&self, user: &str, since: Option<u64>, source: Option<IpAddr>) -> ClientSpec {
        let (path, protocol) = match self.kind {
            TargetKind::Herald => {
                // Each connection is a device of its own: a device seen before would resume from
                // its cursor and replay what earlier rounds received.
                let device = NEXT_DEVICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut path = format!("/ws?token={}&device=b{}-{device}", bench_token(user), std::process::id());
                if let Some(since) = since {
                    path.push_str(&format!("&since={since}"));
                }
                (path, Protocol::Herald { resume: since.is_some() })
            }
            TargetKind::NatsWs => {
                ("/".to_string(), Protocol::Nats { subjects: vec!["push.all".into(), format!("push.user.{user}")] })
            }
            TargetKind::Raw => (format!("/ws?user={user}"), Protocol::Raw),
            TargetKind::HeraldStomp | TargetKind::HeraldSockjs => {
                // No resume: STOMP has no `replayed` frame to tell when a replay ended.
                let device = NEXT_DEVICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sockjs = self.kind == TargetKind::HeraldSockjs;
                let path = if sockjs { format!("/stomp/000/b{device}/websocket") } else { "/stomp".to_string() };
                let device = format!("b{}-{device}", std::process::id());
                (path, Protocol::Stomp { token: bench_token(user), device, sockjs })
            }
            // Clients of these protocols start live: `since` does not apply.
            TargetKind::HeraldCentrifugal => {
                ("/connection/websocket".to_string(), Protocol::Centrifugal { token: bench_token(user) })
            }
            TargetKind::HeraldSocketio => {
                ("/socket.io/?EIO=4&transport=websocket".to_string(), Protocol::SocketIo { token: bench_token(user) })
            }
            TargetKind::HeraldSse => {
                // No resume (`since` is ignored), as for the other protocols besides JSON; a device
                // of its own, as for `herald`, so that no cursor of an earlier round replays anything.
                let device = NEXT_DEVICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (format!("/sse?token={}&device=b{}-{device}", bench_token(user), std::process::id()), Protocol::Sse)
            }
        };
        ClientSpec { addr: self.ws_addr, source, path, protocol }
    }

    /// A new NATS connection for publishing.
    pub async fn publisher(&self) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .name("herald-bench publisher")
            .connect(self.nats.url())
            .await
            .context("connect the publisher to NATS")
    }

    /// The last sequence the `HERALD` stream stored (Herald only; `None` for the others).
    pub async fn stored_last_seq(&self, client: &async_nats::Client) -> Result<Option<u64>> {
        Ok(self.stream_state(client).await?.map(|state| state.last_sequence))
    }

    /// How many messages the `HERALD` stream holds (Herald only; `None` for the others).
    pub async fn stored_messages(&self, client: &async_nats::Client) -> Result<Option<u64>> {
        Ok(self.stream_state(client).await?.map(|state| state.messages))
    }

    async fn stream_state(&self, client: &async_nats::Client) -> Result<Option<async_nats::jetstream::stream::State>> {
        if !self.kind.is_gateway() {
            return Ok(None);
        }
        let js = async_nats::jetstream::new(client.clone());
        let stream = js.get_stream(herald_shared::subject::STREAM).await.context("stream HERALD")?;
        Ok(Some(stream.get_info().await.context("stream HERALD info")?.state))
    }

    /// Waits until the stream stored sequence `seq` (at most `timeout`); returns the last sequence
    /// seen. A no-op returning `None` for targets without a stream.
    pub async fn wait_stored(&self, client: &async_nats::Client, seq: u64, timeout: Duration) -> Result<Option<u64>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = self.stored_last_seq(client).await?;
            if last.is_none_or(|last| last >= seq) || tokio::time::Instant::now() > deadline {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every process of the target.
    pub async fn stop(self) {
        if let Some(server) = self.server {
            server.stop().await;
        }
        self.nats.stop().await;
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn start_gateway(tools: &Tools, nats: &NatsServer, label: &str) -> Result<(Spawned, SocketAddr)> {
    check_exists(&tools.gateway, "build it with `cargo build --release -p herald-gateway`, or pass --gateway-bin")?;
    let addr = local(free_port()?);
    let mut command = Command::new(&tools.gateway);
    command
        .args(["--listen", &addr.to_string(), "--nats-url", &nats.url()])
        .env("HERALD_JWT_SECRET", SECRET)
        .env("HERALD_LOG", &tools.gateway_log)
        .envs(tools.gateway_env.iter().map(|(key, value)| (key, value)));
    if let Some(max) = tools.stream_max_msgs_per_subject {
        command.env("HERALD_STREAM_MAX_MSGS_PER_SUBJECT", max.to_string());
    }
    let mut gateway = Spawned::spawn("herald-gateway", command, &tools.log_path(label, "gateway"))?;
    gateway.wait_http_ok(addr, "/readyz").await?;
    Ok((gateway, addr))
}

async fn start_raw(tools: &Tools, nats: &NatsServer, label: &str) -> Result<(Spawned, SocketAddr)> {
    let addr = local(free_port()?);
    let mut command = Command::new(&tools.bench);
    command.args(["raw-server", "--listen", &addr.to_string(), "--nats-url", &nats.url()]).args(&tools.raw_args);
    let mut raw = Spawned::spawn("raw-server", command, &tools.log_path(label, "raw"))?;
    raw.wait_listening(addr).await?;
    Ok((raw, addr))
}

fn check_exists(path: &Path, hint: &str) -> Result<()> {
    if !path.is_file() {
        anyhow::bail!("{} not found: {hint}", path.display());
    }
    Ok(())
}
