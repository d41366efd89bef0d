//! Herald's gateway: WebSocket clients in front, NATS JetStream behind.
//!
//! A message's path through this crate: [`dispatch`] reads the stream's republish in order
//! ([`merge`]), [`delivery`] turns each message into one frame, the [`outbox`] of every session it is
//! for queues it, and each socket's [`writer`] sends it. [`session`] owns a connection's life,
//! [`reader`] its inbound frames, [`auth`] what happens before the upgrade, [`server`] the HTTP side.

mod auth;
pub mod config;
mod delivery;
mod dispatch;
mod health;
mod id;
mod merge;
mod metrics;
mod outbox;
mod reader;
mod server;
mod session;
mod stream_state;
mod wire;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use herald_shared::token::{Claims, Verifier, issue_hs256, now_secs};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, SessionPolicy};

use dispatch::Dispatcher;
use health::Health;
use metrics::Metrics;

/// What every part of a running gateway shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) verifier: Verifier,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// Cancelled when the gateway starts draining.
    pub(crate) shutdown: CancellationToken,
    /// Every session task, to wait for them at shutdown.
    pub(crate) sessions: TaskTracker,
}

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] herald_shared::token::KeyError),
    #[error("cannot read {path}: {error}")]
    KeyFile { path: String, error: std::io::Error },
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
    #[error("bad NATS settings: {0}")]
    Nats(String),
}

/// A running gateway.
pub struct Gateway {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    stopped: JoinHandle<()>,
}

impl Gateway {
    /// Starts a gateway: listens at once, connects to NATS in the background (ready when connected
    /// and the stream exists).
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let verifier = verifier(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|error| StartError::Listen { addr: config.listen, error })?;
        let local_addr = listener.local_addr().map_err(|error| StartError::Listen { addr: config.listen, error })?;
        let addresses = config.nats.addresses().map_err(|e| StartError::Nats(e.to_string()))?;
        let connected = Arc::new(tokio::sync::Notify::new());
        let on_event = {
            let connected = connected.clone();
            Arc::new(move |event: &async_nats::Event| {
                if matches!(event, async_nats::Event::Connected) {
                    connected.notify_one();
                }
            })
        };
        let client = config
            .nats
            .options_with_events(&format!("herald-gateway {}", config.node_id), on_event)
            .await
            .map_err(|e| StartError::Nats(e.to_string()))?
            .connect(addresses)
            .await
            .map_err(|e| StartError::Nats(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let js = jetstream::new(client.clone());
        let health = Arc::new(Health::new(client.clone(), connected));
        tokio::spawn(health::monitor(
            health.clone(),
            js.clone(),
            config.stream.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let shared = Arc::new(Shared {
            dispatcher: Dispatcher::start(client.clone(), metrics.clone()),
            config,
            client,
            js,
            verifier,
            metrics,
            health,
            shutdown: shutdown.clone(),
            sessions: TaskTracker::new(),
        });
        info!(addr = %local_addr, node = %shared.config.node_id, "gateway listening");
        let stopped = tokio::spawn(run(shared, listener));
        Ok(Gateway { local_addr, shutdown, stopped })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts a graceful shutdown: no new connections, every socket closed with 1012, NATS drained.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the gateway has stopped.
    pub async fn stopped(self) {
        let _ = self.stopped.await;
    }
}

async fn run(shared: Arc<Shared>, listener: TcpListener) {
    server::accept_loop(shared.clone(), listener).await;
    info!("draining: closing every socket with 1012");
    shared.sessions.close();
    if tokio::time::timeout(shared.config.shutdown_grace, shared.sessions.wait()).await.is_err() {
        warn!("shutdown grace elapsed with sockets still open");
    }
    if tokio::time::timeout(Duration::from_secs(5), shared.client.drain()).await.is_err() {
        warn!("NATS drain timed out");
    }
    info!("gateway stopped");
}

fn verifier(config: &Config) -> Result<Verifier, StartError> {
    let public_pem = match &config.jwt_public_key {
        Some(path) => {
            Some(std::fs::read(path).map_err(|error| StartError::KeyFile { path: path.display().to_string(), error })?)
        }
        None => None,
    };
    let secret = config.effective_secret();
    Ok(Verifier::new(secret.as_deref().map(str::as_bytes), public_pem.as_deref())?)
}

/// An HS256 token for `user`, allowed every topic, signed with the configured (or dev) secret.
pub fn dev_token(config: &Config, user: &str, ttl: Duration) -> Option<String> {
    let secret = config.effective_secret()?;
    let claims = Claims { sub: user.to_string(), exp: now_secs() + ttl.as_secs(), topics: vec!["*".to_string()] };
    Some(issue_hs256(secret.as_bytes(), &claims))
}
