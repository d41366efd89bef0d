//! The delivery feed: the gateway's own NATS connection for the stream's republish, read as one
//! ordered stream of messages.
//!
//! Why not an async-nats subscription per user: async-nats gives every subscription its own channel
//! (measured: 5.9 KiB each before any message, a tenth of a Herald socket's whole budget), reads
//! the channels of several subscriptions in no common order (the gateway had to merge them back
//! into stream order), and drops messages when a channel is full. One connection's messages arrive
//! in the order the server sent them, so here every subscription's messages go, in that order, into
//! one bounded channel to the router. When the router falls behind, the feed stops reading
//! the socket: the server buffers, and if the gateway stays behind long enough the server closes the
//! connection as a slow consumer; the feed reconnects and the router repairs every session from
//! the stream. Nothing is dropped silently, and nothing is reordered.
//!
//! The feed also answers requests (`request`) on the same connection, so a request sent after a
//! subscription reaches the server after it: reading the stream's last sequence that way tells a
//! joining session exactly which messages will arrive live.
//!
//! It also follows the stream's leader-elected advisories: a leader that fails after storing a
//! message and before republishing it leaves that message stored but never delivered, so the
//! router asks a new leader what it stores (see [`super::leader`]).

mod connect;
pub(crate) mod proto;
mod servers;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_shared::nats::NatsSettings;
use herald_shared::subject::STREAM;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub(crate) use proto::Delivered;
use proto::ServerOp;

use connect::{Dialed, Stream};
use servers::Servers;

/// What the feed hands the router, in the order it happened.
#[derive(Debug)]
pub(crate) enum FeedEvent {
    /// A message on one of the subscriptions.
    Message(Delivered),
    /// The feed (re)connected and re-subscribed: anything published while it was away never came.
    Connected,
    /// The connection of `generation` (see [`Feed::generation`]) was lost: answers to requests
    /// sent on it never come.
    Lost { generation: u64 },
    /// The stream has a new leader: what the old one stored but had not yet republished when it
    /// failed never comes.
    LeaderElected,
}

/// A request on the feed failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("no responders for {0}")]
    NoResponders(String),
    #[error("request timed out")]
    TimedOut,
    #[error("the NATS connection is down")]
    Disconnected,
}

enum Command {
    Subscribe {
        sid: u64,
        subject: String,
    },
    Unsubscribe {
        sid: u64,
    },
    Request {
        subject: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<Delivered, RequestError>>,
    },
    /// A publish whose answers go to a reply subject of the caller's (see [`Feed::publish`]).
    Publish {
        subject: String,
        reply: String,
        payload: Bytes,
    },
    Flush {
        done: oneshot::Sender<()>,
    },
    /// Drop the connection and dial the next server.
    Reconnect {
        why: String,
    },
}

/// A cheap handle to the feed task.
#[derive(Clone)]
pub(crate) struct Feed {
    commands: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    next_sid: Arc<AtomicU64>,
}

/// The sid of the feed's own reply subscription.
const REPLY_SID: u64 = 1;
/// The sid of the stream's leader-elected advisories; subscriptions for deliveries start above it.
const LEADER_SID: u64 = 2;
/// How often the feed pings the server, and how many unanswered pings mean a dead connection.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const MAX_UNANSWERED_PINGS: usize = 2;
/// How long a request waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

impl Feed {
    /// Starts the feed task: it connects (and reconnects, forever, until `shutdown`) with
    /// `settings`, and sends what arrives to `events`; with `follow_leader`, the stream's leader
    /// elections too.
    pub(crate) fn start(
        settings: &NatsSettings,
        name: String,
        events: mpsc::Sender<FeedEvent>,
        follow_leader: bool,
        shutdown: CancellationToken,
    ) -> Feed {
        let (commands, receiver) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let reply_prefix = format!("{}.feed.{}", settings.nats_inbox_prefix, crate::id::random_id(12));
        let task = FeedTask {
            servers: Servers::new(&settings.nats_url),
            settings: settings.clone(),
            name,
            commands: receiver,
            events,
            connected: connected.clone(),
            generation: generation.clone(),
            follow_leader,
            subscriptions: HashMap::new(),
            pending: HashMap::new(),
            next_request: 0,
            reply_prefix,
            pongs: VecDeque::new(),
            unanswered: 0,
        };
        tokio::spawn(task.run(shutdown));
        Feed { commands, connected, generation, next_sid: Arc::new(AtomicU64::new(LEADER_SID + 1)) }
    }

    /// A fresh subscription id.
    pub(crate) fn next_sid(&self) -> u64 {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    /// Subscribes `sid` to `subject` (now, or as soon as connected; again after every reconnect).
    pub(crate) fn subscribe(&self, sid: u64, subject: String) {
        let _ = self.commands.send(Command::Subscribe { sid, subject });
    }

    /// Ends subscription `sid`.
    pub(crate) fn unsubscribe(&self, sid: u64) {
        let _ = self.commands.send(Command::Unsubscribe { sid });
    }

    /// Sends a request on the feed's connection, after every subscription asked for before it, and
    /// waits for the answer.
    pub(crate) async fn request(&self, subject: String, payload: Bytes) -> Result<Bytes, RequestError> {
        Ok(self.request_message(subject, payload).await?.payload)
    }

    /// [`Feed::request`], answered with the whole message (its headers, its status).
    pub(crate) async fn request_message(&self, subject: String, payload: Bytes) -> Result<Delivered, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Request { subject, payload, reply }).map_err(|_| RequestError::Disconnected)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Disconnected),
            Err(_) => Err(RequestError::TimedOut),
        }
    }

    /// Waits until the server has processed everything asked of the feed before (a `PING` after
    /// it, answered): subscriptions made before are live on the server.
    pub(crate) async fn flush(&self) -> Result<(), RequestError> {
        let (done, flushed) = oneshot::channel();
        self.commands.send(Command::Flush { done }).map_err(|_| RequestError::Disconnected)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, flushed).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RequestError::Disconnected),
            Err(_) => Err(RequestError::TimedOut),
        }
    }

    /// Publishes `payload` to `subject` with `reply` as its reply subject, after every subscription
    /// asked for before it (one for `reply`, say). Lost while the feed is disconnected: the caller
    /// waits for its answers with a timeout.
    pub(crate) fn publish(&self, subject: String, reply: String, payload: Bytes) {
        let _ = self.commands.send(Command::Publish { subject, reply, payload });
    }

    /// Drops the connection and dials the next server (the one in use cannot serve the stream).
    pub(crate) fn reconnect(&self, why: String) {
        let _ = self.commands.send(Command::Reconnect { why });
    }

    /// Whether the feed is connected right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The connection in use (or last in use): each one has the next number, from 1.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

struct FeedTask {
    settings: NatsSettings,
    /// The servers to dial, those the cluster advertised among them.
    servers: Servers,
    name: String,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<FeedEvent>,
    connected: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    /// Whether to subscribe to the stream's leader elections.
    follow_leader: bool,
    /// Every live subscription, to subscribe again after a reconnect.
    subscriptions: HashMap<u64, String>,
    /// Requests waiting for their answer, by the last token of their reply subject.
    pending: HashMap<u64, oneshot::Sender<Result<Delivered, RequestError>>>,
    next_request: u64,
    reply_prefix: String,
    /// One entry per `PING` sent and not yet answered, in order: a flush waiting for its `PONG`,
    /// or `None` for a keepalive.
    pongs: VecDeque<Option<oneshot::Sender<()>>>,
    /// Keepalive pings sent since the server last answered one of our pings.
    unanswered: usize,
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl FeedTask {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut attempt = 0u32;
        // Every connection, failed or lost, moves on to the next server, from a random first one:
        // gateways spread over the cluster, and a server that went silent is not dialed again first.
        let mut turn: usize = rand::random::<u32>() as usize;
        loop {
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => return,
                dialed = connect::dial(&self.settings, &self.name, &self.servers, turn) => dialed,
            };
            let Dialed { stream, server, info } = match dialed {
                Ok(dialed) => dialed,
                Err(error) => {
                    attempt += 1;
                    turn = turn.wrapping_add(1);
                    warn!(%error, attempt, connection = %self.name, "feed cannot connect to NATS");
                    if self.wait_before_retry(attempt, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            attempt = 0;
            turn = turn.wrapping_add(1);
            self.servers.learn(&info);
            info!(%server, connection = %self.name, "feed connected");
            match self.serve(stream, &shutdown).await {
                Ended::Shutdown => return,
                Ended::Lost(why) => {
                    warn!(%server, why, connection = %self.name, "feed lost its connection; reconnecting")
                }
            }
            self.connected.store(false, Ordering::Release);
            let generation = self.generation.load(Ordering::Acquire);
            if self.events.send(FeedEvent::Lost { generation }).await.is_err() {
                return;
            }
            for (_, waiting) in self.pending.drain() {
                let _ = waiting.send(Err(RequestError::Disconnected));
            }
            // Flushes waiting for a PONG fail (their senders are dropped).
            self.pongs.clear();
            self.unanswered = 0;
        }
    }

    /// Waits before the next connection attempt; returns whether shutdown came meanwhile.
    async fn wait_before_retry(&mut self, attempt: u32, shutdown: &CancellationToken) -> bool {
        let delay = Duration::from_millis((100 * u64::from(attempt)).min(2000));
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = &mut sleep => return false,
                // Commands keep their effect on the state that is replayed at the next connection.
                command = self.commands.recv() => match command {
                    Some(command) => self.apply_offline(command),
                    None => return true,
                },
            }
        }
    }

    /// Runs one established connection until it fails or the gateway stops.
    async fn serve(&mut self, mut stream: Stream, shutdown: &CancellationToken) -> Ended {
        let mut out = BytesMut::new();
        proto::sub(&mut out, &format!("{}.*", self.reply_prefix), REPLY_SID);
        if self.follow_leader {
            proto::sub(&mut out, &format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{STREAM}"), LEADER_SID);
        }
        for (sid, subject) in &self.subscriptions {
            proto::sub(&mut out, subject, *sid);
        }
        if let Err(error) = stream.write_all(&out).await {
            return Ended::Lost(error.to_string());
        }
        out.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.connected.store(true, Ordering::Release);
        // Queued behind the re-subscriptions, so the router repairs before anything newer.
        if self.events.send(FeedEvent::Connected).await.is_err() {
            return Ended::Shutdown;
        }
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Shutdown,
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ended::Shutdown };
                    if let Some(ended) = self.apply(command, &mut out) {
                        return ended;
                    }
                    // Everything else queued goes in the same write.
                    while let Ok(command) = self.commands.try_recv() {
                        if let Some(ended) = self.apply(command, &mut out) {
                            return ended;
                        }
                    }
                }
                read = stream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) => return Ended::Lost("closed by the server".into()),
                        Ok(_) => {}
                        Err(error) => return Ended::Lost(error.to_string()),
                    }
                    loop {
                        match proto::parse(&mut buf) {
                            Ok(Some(op)) => {
                                if let Err(ended) = self.handle(op, &mut out).await {
                                    return ended;
                                }
                            }
                            Ok(None) => break,
                            Err(error) => return Ended::Lost(error.to_string()),
                        }
                    }
                    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                        buf.reserve(READ_CHUNK);
                    }
                }
                _ = ping.tick() => {
                    if self.unanswered >= MAX_UNANSWERED_PINGS {
                        return Ended::Lost("the server stopped answering pings".into());
                    }
                    self.unanswered += 1;
                    self.pongs.push_back(None);
                    out.extend_from_slice(proto::PING);
                }
            }
            if !out.is_empty() {
                if let Err(error) = stream.write_all(&out).await {
                    return Ended::Lost(error.to_string());
                }
                out.clear();
            }
        }
    }

    /// Handles one server operation; an `Err` ends the connection.
    async fn handle(&mut self, op: ServerOp, out: &mut BytesMut) -> Result<(), Ended> {
        match op {
            ServerOp::Msg(message) if message.sid == REPLY_SID => self.answer(message),
            ServerOp::Msg(message) if message.sid == LEADER_SID => {
                if self.events.send(FeedEvent::LeaderElected).await.is_err() {
                    return Err(Ended::Shutdown);
                }
            }
            ServerOp::Msg(message) => {
                // Waits while the router is behind: the socket is not read meanwhile.
                if self.events.send(FeedEvent::Message(message)).await.is_err() {
                    return Err(Ended::Shutdown);
                }
            }
            ServerOp::Ping => out.extend_from_slice(proto::PONG),
            ServerOp::Pong => {
                self.unanswered = 0;
                if let Some(Some(flushed)) = self.pongs.pop_front() {
                    let _ = flushed.send(());
                }
            }
            ServerOp::Info(info) => {
                if let Ok(info) = serde_json::from_slice(&info) {
                    self.servers.learn(&info);
                }
            }
            ServerOp::Ok => {}
            ServerOp::Err(error) => {
                let lower = error.to_ascii_lowercase();
                // Permission errors concern one subscription; the others keep working.
                if lower.starts_with("permissions violation") && lower.contains("leader_elected") {
                    warn!(%error, "NATS refused the stream's leader advisories: grant the gateway's NATS user \
                        the subscription in this version's nats.conf, or a message a failing leader stored \
                        but did not republish reaches clients only with the next message of its subject");
                } else if lower.starts_with("permissions violation") {
                    warn!(%error, connection = %self.name, "NATS refused a subscription");
                } else {
                    return Err(Ended::Lost(error));
                }
            }
        }
        Ok(())
    }

    /// Routes the answer to a request.
    fn answer(&mut self, message: Delivered) {
        let token = message.subject.rsplit(|&b| b == b'.').next().unwrap_or_default();
        let Some(id) = std::str::from_utf8(token).ok().and_then(|t| t.parse::<u64>().ok()) else { return };
        let Some(waiting) = self.pending.remove(&id) else { return };
        let result = if message.answer_status() == Some(503) {
            Err(RequestError::NoResponders(String::from_utf8_lossy(&message.subject).into_owned()))
        } else {
            Ok(message)
        };
        let _ = waiting.send(result);
    }

    /// Applies a command on the connection; `Some` ends the connection.
    fn apply(&mut self, command: Command, out: &mut BytesMut) -> Option<Ended> {
        match command {
            Command::Subscribe { sid, subject } => {
                proto::sub(out, &subject, sid);
                self.subscriptions.insert(sid, subject);
            }
            Command::Unsubscribe { sid } => {
                if self.subscriptions.remove(&sid).is_some() {
                    proto::unsub(out, sid);
                }
            }
            Command::Request { subject, payload, reply } => {
                self.next_request += 1;
                let id = self.next_request;
                proto::publish(out, &subject, &format!("{}.{id}", self.reply_prefix), &payload);
                self.pending.retain(|_, waiting| !waiting.is_closed());
                self.pending.insert(id, reply);
            }
            Command::Publish { subject, reply, payload } => proto::publish(out, &subject, &reply, &payload),
            Command::Flush { done } => {
                out.extend_from_slice(proto::PING);
                self.pongs.push_back(Some(done));
            }
            Command::Reconnect { why } => return Some(Ended::Lost(why)),
        }
        None
    }

    /// A command while disconnected: subscriptions are remembered, requests fail at once.
    fn apply_offline(&mut self, command: Command) {
        match command {
            Command::Subscribe { sid, subject } => {
                self.subscriptions.insert(sid, subject);
            }
            Command::Unsubscribe { sid } => {
                self.subscriptions.remove(&sid);
            }
            Command::Request { reply, .. } => {
                debug!("request while the delivery feed is disconnected");
                let _ = reply.send(Err(RequestError::Disconnected));
            }
            // Dropping `done` tells the waiter the feed is down.
            Command::Flush { .. } => {}
            Command::Publish { .. } => debug!("publish while the delivery feed is disconnected"),
            // Not connected: the next dial goes to the next server anyway.
            Command::Reconnect { .. } => {}
        }
    }
}
