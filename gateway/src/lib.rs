//! Herald's gateway: WebSocket clients in front, NATS JetStream behind.
//!
//! A message's path through this crate: the [`delivery`] feed reads the stream's republish in
//! order and the router puts each message where its sessions read it (a user's mailbox, or the
//! broadcast log of `push.all` or a topic); each connection's task in [`session`] merges what it
//! reads in stream order, turns it into its protocol's bytes through a [`codec`] and writes them.
//! The session's exactness rules are a state machine with no I/O. [`cluster`] holds what gateways
//! share through NATS, [`http`] the HTTP side, [`websocket`] the frame layer.

mod close;
mod cluster;
mod codec;
pub mod config;
mod delivery;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod id;
mod session;
mod websocket;

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

pub use config::{Config, NewDeviceReplay, ReplayMethod, SessionPolicy};

use cluster::cursor::Cursors;
use cluster::events;
use cluster::inbox::Inbox;
use cluster::policy::Policies;
use cluster::prefs::Prefs;
use cluster::recovery::RecoveryStates;
use cluster::registry::Registry;
use delivery::feed::Feed;
use delivery::log::LogLimits;
use delivery::replies::Replies;
use delivery::router::Router;
use http::api::PublishRefusals;
use http::health::{self, Health};
use http::metrics::Metrics;
use http::refusals::Refusals;
use http::{api, limits, server};
use session::bounds;
use session::replay::Replayer;

/// What every part of a running gateway shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The control connection: requests, replays, KV, rpc, events.
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    /// The stream's bounds, read on the delivery connection for many sessions at once.
    pub(crate) bounds: Arc<bounds::BoundsReader>,
    /// Reads the stream back for sessions.
    pub(crate) replayer: Replayer,
    /// JetStream as the HTTP API's publisher, when it has credentials of its own.
    pub(crate) api_js: Option<jetstream::Context>,
    pub(crate) router: Router,
    /// The delivery connection (for flushes: "is this subscription live on the server yet").
    pub(crate) feed: Feed,
    pub(crate) verifier: Verifier,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    pub(crate) cursors: Arc<Cursors>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) policies: Arc<Policies>,
    pub(crate) prefs: Arc<Prefs>,
    /// Read positions and unread counts.
    pub(crate) inbox: Arc<Inbox>,
    /// Socket.IO connection states, for recovery.
    pub(crate) socketio_states: RecoveryStates,
    /// What NATS said when it refused the API's pushes.
    pub(crate) publish_refusals: Arc<PublishRefusals>,
    pub(crate) limits: Arc<limits::Limits>,
    pub(crate) refusals: Refusals,
    /// Cancelled when the gateway starts draining.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the gateway stops at once, dropping sockets without a close frame.
    pub(crate) killed: CancellationToken,
    /// Cancelled halfway through the shutdown grace: loss checks still waiting for the stream then
    /// assume the loss, so that their notes are written before the gateway stops.
    pub(crate) checks_cut: CancellationToken,
    /// Stops the delivery connection (see [`Feed::start`]).
    pub(crate) feed_stop: CancellationToken,
    /// Every session task, to wait for them at shutdown.
    pub(crate) sessions: TaskTracker,
    /// Engine.IO long-polling sessions on this gateway.
    pub(crate) polling: http::engineio::PollingSessions,
    /// SockJS sessions over plain HTTP requests on this gateway.
    pub(crate) sockjs: http::sockjs::SockJsSessions,
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
    #[error("api_listen is set but api_keys is empty")]
    NoApiKeys,
    #[error("{0}")]
    Setting(String),
}

/// A running gateway.
pub struct Gateway {
    local_addr: SocketAddr,
    api_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    killed: CancellationToken,
    stopped: JoinHandle<()>,
}

impl Gateway {
    /// Starts a gateway: listens at once, connects to NATS in the background (ready when connected
    /// and the stream exists).
    pub async fn start(mut config: Config) -> Result<Gateway, StartError> {
        config.check().map_err(StartError::Setting)?;
        let verifier = verifier(&config)?;
        if config.dev {
            info!(
                configured_secret = config.jwt_secret.is_some(),
                "dev mode: GET /dev/token signs a token for any user with this gateway's secret; never in production"
            );
        }
        let (window, heartbeat) = (config.stream.socketio_recovery_window, config.heartbeat);
        if window < heartbeat * 2 {
            // A live connection writes its Socket.IO state again once a heartbeat at most: in a
            // shorter window it would expire while the connection lives.
            warn!(?window, ?heartbeat, "socketio_recovery_window is raised to twice the heartbeat");
            config.stream.socketio_recovery_window = heartbeat * 2;
        }
        let listener = listen(config.listen, config.listen_backlog)
            .map_err(|error| StartError::Listen { addr: config.listen, error })?;
        let local_addr = listener.local_addr().map_err(|error| StartError::Listen { addr: config.listen, error })?;
        if config.api_listen.is_some() && config.api_keys.is_empty() {
            return Err(StartError::NoApiKeys);
        }
        let api_listener = api::bind(config.api_listen)
            .await
            .map_err(|error| StartError::Listen { addr: config.api_listen.unwrap_or(config.listen), error })?;
        let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
        let control_events = Arc::new(health::ControlEvents::default());
        let publish_refusals = Arc::new(PublishRefusals::default());
        let control = {
            let events = control_events.clone();
            let refusals = publish_refusals.clone();
            connect(&config, "control", Some(CONTROL_SUBSCRIPTION_CAPACITY), move |event| {
                events.note(event);
                refusals.note(event);
            })
            .await?
        };
        let api_js = match (&config.api_listen, &config.api_nats_user, &config.api_nats_password) {
            (Some(_), Some(user), Some(password)) => {
                let mut api_config = config.clone();
                api_config.nats.nats_user = Some(user.clone());
                api_config.nats.nats_password = Some(password.clone());
                api_config.nats.nats_inbox_prefix = "_INBOX".into();
                let refusals = publish_refusals.clone();
                let note = move |event: &async_nats::Event| refusals.note_api(event);
                Some(jetstream::new(connect(&api_config, "api", Some(CONTROL_SUBSCRIPTION_CAPACITY), note).await?))
            }
            (Some(_), _, _) => {
                warn!(
                    "api_listen without api_nats_user and api_nats_password: the API publishes as the gateway's NATS user, which nats.conf does not allow to publish pushes"
                );
                None
            }
            _ => None,
        };
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let killed = CancellationToken::new();
        let questions = events::Questions::subscribe(&control)
            .await
            .map_err(|error| StartError::Nats(format!("cannot subscribe to the gateways' questions: {error}")))?;
        let js = jetstream::new(control.clone());
        let (feed_events, feed_receiver) = tokio::sync::mpsc::channel(config.nats.nats_subscription_capacity.max(1));
        let feed_name = format!("herald-gateway {} delivery", config.node_id);
        // Stopped once the drain is over, as loss checks of closed connections still ask the stream
        // during it; at once when the gateway is killed.
        let feed_stop = killed.child_token();
        let feed = Feed::start(&config.nats, feed_name, feed_events, true, feed_stop.clone());
        let replies_name = format!("herald-gateway {} replies", config.node_id);
        let replies = Replies::start(&config.nats, replies_name, feed_stop.clone());
        let health = Arc::new(Health::new(control.clone(), feed.clone(), replies.clone(), control_events));
        let router = Router::start(feed.clone(), feed_receiver, log_limits(&config), metrics.clone());
        tokio::spawn(health::monitor(
            health.clone(),
            js.clone(),
            config.stream.clone(),
            metrics.clone(),
            router.clone(),
            shutdown.clone(),
        ));
        let replayer =
            Replayer::new(js.clone(), replies, config.replay_method, config.replay_batch, config.replay_concurrency);
        let inbox = Inbox::new(js.clone(), replayer.clone());
        let shared = Arc::new(Shared {
            inbox: Arc::new(inbox),
            router,
            // On the delivery feed, whose subscriptions feed the router: a request sent there
            // reaches the server after every subscription made before it.
            bounds: Arc::new(bounds::BoundsReader::new(feed.clone())),
            replayer,
            feed,
            api_js,
            cursors: Arc::new(Cursors::new(js.clone(), config.stream.cursors_max_age)),
            registry: Arc::new(Registry::default()),
            policies: Arc::new(Policies::new(config.session_policy, config.stream.clone(), js.clone())),
            prefs: Arc::new(Prefs::new(js.clone())),
            socketio_states: RecoveryStates::new(js.clone()),
            publish_refusals,
            limits: Arc::new(limits::Limits::new(config.max_connections, config.max_connections_per_address)),
            refusals: Refusals::new(metrics.connections_refused.clone()),
            config,
            client: control,
            js,
            verifier,
            metrics,
            health,
            shutdown: shutdown.clone(),
            killed: killed.clone(),
            checks_cut: CancellationToken::new(),
            feed_stop,
            sessions: TaskTracker::new(),
            polling: Default::default(),
            sockjs: Default::default(),
        });
        start_background_tasks(&shared, questions);
        if let Some(api_listener) = api_listener {
            tokio::spawn(api::serve(shared.clone(), api_listener));
        }
        info!(addr = %local_addr, node = %shared.config.node_id, "gateway listening");
        let stopped = tokio::spawn(run(shared, listener));
        Ok(Gateway { local_addr, api_addr, shutdown, killed, stopped })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP API, when enabled.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Starts a graceful shutdown: no new connections (but the polls that take a SockJS session's
    /// close), every socket closed with 1012, NATS drained.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops at once, as if the process died: sockets are dropped without a close frame, nothing
    /// is drained or flushed.
    pub fn kill(&self) {
        self.killed.cancel();
        self.shutdown.cancel();
    }

    /// Waits until the gateway has stopped.
    pub async fn stopped(self) {
        let _ = self.stopped.await;
    }
}

/// The tasks that keep a gateway's shared state current, all stopped by `shutdown`.
fn start_background_tasks(shared: &Arc<Shared>, questions: events::Questions) {
    let shutdown = shared.shutdown.clone();
    let (interval, rate) = (shared.config.cursor_flush_interval, shared.config.cursor_write_rate);
    tokio::spawn(shared.cursors.clone().run_flusher(interval, rate, shutdown.clone()));
    tokio::spawn(shared.prefs.clone().watch(
        shared.router.clone(),
        shared.registry.clone(),
        shared.health.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(shared.policies.clone().run(shared.health.clone(), shutdown.clone()));
    tokio::spawn(shared.inbox.clone().run_flusher(shutdown.clone(), shared.metrics.read_flush_failures.clone()));
    tokio::spawn(delivery::reach::watch(shared.feed.clone(), shared.router.clone(), shutdown.clone()));
    tokio::spawn(shared.inbox.clone().watch(shared.registry.clone(), shutdown.clone()));
    questions.answer(&shared.client, &shared.registry, &shared.config.node_id, &shutdown);
}

async fn run(shared: Arc<Shared>, listener: TcpListener) {
    let accepting = tokio::spawn(server::accept_loop(shared.clone(), listener));
    shared.shutdown.cancelled().await;
    // Sessions wait on their mailboxes, not on the gateway's shutdown (thousands of sessions
    // polling one shared token would contend on it at every wake-up): tell each.
    shared.registry.close_all(&stopping(&shared));
    if shared.killed.is_cancelled() {
        shared.sessions.close();
        shared.sessions.wait().await;
        let _ = accepting.await;
        warn!("gateway killed");
        return;
    }
    info!("draining: closing every socket with 1012");
    shared.sessions.close();
    let (checks_cut, half_grace) = (shared.checks_cut.clone(), shared.config.shutdown_grace / 2);
    tokio::spawn(async move {
        tokio::time::sleep(half_grace).await;
        checks_cut.cancel();
    });
    if tokio::time::timeout(shared.config.shutdown_grace, shared.sessions.wait()).await.is_err() {
        warn!("shutdown grace elapsed with sockets, or loss checks of closed ones, still open");
    }
    // The listener closes before the gateway says it stopped.
    accepting.abort();
    let _ = accepting.await;
    shared.feed_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), shared.cursors.flush(usize::MAX)).await.is_err() {
        warn!("cursor flush timed out");
    }
    if tokio::time::timeout(Duration::from_secs(5), shared.client.drain()).await.is_err() {
        warn!("NATS drain timed out");
    }
    info!("gateway stopped");
}

/// How sessions close when the gateway stops: 1012, or dropped when it is killed.
pub(crate) fn stopping(shared: &Shared) -> close::Close {
    if shared.killed.is_cancelled() { close::Close::gone("gateway killed") } else { close::Close::restart() }
}

/// How much each broadcast log keeps.
fn log_limits(config: &Config) -> LogLimits {
    LogLimits { entries: config.broadcast_log_entries, bytes: config.broadcast_log_bytes }
}

/// A listener with `backlog` queued connections (tokio's `bind` uses 1024, below what a storm needs).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Messages buffered per subscription on the control connection (KV watches).
const CONTROL_SUBSCRIPTION_CAPACITY: usize = 65536;

/// Connects one of the gateway's async-nats connections (control, and the HTTP API's publisher).
/// Deliveries come on a connection of their own, the [`feed`], so that message traffic and control
/// traffic never queue behind each other.
async fn connect(
    config: &Config,
    role: &str,
    capacity: Option<usize>,
    on_event: impl Fn(&async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, StartError> {
    let addresses = config.nats.addresses().map_err(|e| StartError::Nats(e.to_string()))?;
    let mut options = config
        .nats
        .options_with_events(&format!("herald-gateway {} {role}", config.node_id), Arc::new(on_event))
        .await
        .map_err(|e| StartError::Nats(e.to_string()))?;
    if let Some(capacity) = capacity {
        options = options.subscription_capacity(capacity);
    }
    options.connect(addresses).await.map_err(|e| StartError::Nats(e.to_string()))
}

fn verifier(config: &Config) -> Result<Verifier, StartError> {
    let public_pem = match &config.jwt_public_key {
        Some(path) => {
            Some(std::fs::read(path).map_err(|error| StartError::KeyFile { path: path.display().to_string(), error })?)
        }
        None => None,
    };
    let secret = config.effective_secret();
    let verifier = Verifier::new(secret.as_deref().map(str::as_bytes), public_pem.as_deref())?;
    Ok(verifier.with_audience(config.jwt_audience.clone()))
}

/// An HS256 token for `user`, allowed every topic, signed with the configured (or dev) secret.
pub fn dev_token(config: &Config, user: &str, ttl: Duration) -> Option<String> {
    let secret = config.effective_secret()?;
    let claims = Claims { sub: user.to_string(), exp: now_secs() + ttl.as_secs(), topics: vec!["*".to_string()] };
    Some(issue_hs256(secret.as_bytes(), &claims))
}
