//! One WebSocket connection, from the upgrade to the close.
//!
//! Three tasks per socket: the writer (owns the write half, drains the outbox), the reader (owns the
//! read half, answers what it can at once) and this supervisor, which opens the session ([`join`]),
//! runs whatever needs the stream one at a time (topic joins, repairs), sends pings, watches the
//! token's expiry and the gateway's shutdown, and ends everything with one close.

mod inbound;
mod join;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_shared::frame::{ServerFrame, close_code};
use herald_shared::subject::Audience;
use herald_shared::token::now_secs;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Shared;
use crate::auth::ConnectRequest;
use crate::dispatch::SessionEntry;
use crate::events::{Who, publish_lifecycle};
use crate::outbox::{Close, Outbox};
use crate::reader::MessageReader;
use crate::registry::LocalSession;
use crate::wire;

/// How long a closing socket's writer may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Topic requests a client may have waiting.
const TOPIC_QUEUE: usize = 16;

type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

/// A `sub` or `unsub` waiting for the supervisor, which runs them in order.
#[derive(Debug)]
pub(crate) enum TopicRequest {
    Subscribe { topic: String, since: Option<u64> },
    Unsubscribe { topic: String },
}

/// A connected client.
pub(crate) struct Session {
    shared: Arc<Shared>,
    conn: String,
    user: Arc<str>,
    device: String,
    request: ConnectRequest,
    entry: Arc<SessionEntry>,
    /// Topics this connection is subscribed to.
    topics: Mutex<BTreeSet<String>>,
    topic_requests: mpsc::Sender<TopicRequest>,
    /// Milliseconds since `started` when the client was last heard from.
    last_heard: AtomicU64,
    started: Instant,
}

impl Session {
    fn outbox(&self) -> &Outbox {
        &self.entry.outbox
    }

    /// Everything this connection receives: its user, `push.all`, its topics.
    fn audiences(&self) -> Vec<Audience> {
        let mut audiences = vec![Audience::User(self.user.to_string()), Audience::All];
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        audiences.extend(topics.iter().cloned().map(Audience::Topic));
        audiences
    }

    fn touch(&self) {
        self.last_heard.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_heard.load(Ordering::Relaxed)))
    }

    fn send(&self, frame: &ServerFrame) {
        self.outbox().push_control(wire::text(frame.to_json().as_bytes()));
    }

    fn who(&self) -> Who<'_> {
        Who { user: &self.user, device: &self.device, conn: &self.conn, node: &self.shared.config.node_id }
    }
}

/// Runs connection `conn` on `upgraded` until it closes.
pub(crate) async fn run(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    request: ConnectRequest,
    conn: String,
    address: IpAddr,
) {
    let (read_half, write_half) = split(upgraded);
    let outbox = Arc::new(Outbox::new(shared.config.outbound_queue_bytes));
    let writer = tokio::spawn(crate::writer::run(write_half, outbox.clone(), shared.config.write_batch_frames));
    let user: Arc<str> = request.claims.sub.as_str().into();
    let (topic_requests, topic_queue) = mpsc::channel(TOPIC_QUEUE);
    let session = Arc::new(Session {
        entry: Arc::new(SessionEntry::new(shared.dispatcher.next_key(), user.clone(), outbox.clone())),
        topics: Mutex::new(request.topics.iter().cloned().collect()),
        conn,
        user,
        device: request.device.clone(),
        request,
        topic_requests,
        last_heard: AtomicU64::new(0),
        started: Instant::now(),
        shared: shared.clone(),
    });
    shared.registry.insert(LocalSession { conn: session.conn.clone(), user: session.user.clone(), outbox });
    shared.metrics.connections.inc();
    info!(user = %session.user, device = %session.device, conn = %session.conn, %address, "connected");

    let close = serve(&session, read_half, topic_queue).await;
    session.outbox().close(close.clone());
    if close.code == close_code::SLOW_CONSUMER {
        shared.metrics.slow_consumer_closes.inc();
    }
    shared.dispatcher.detach(session.entry.key, session.audiences(), true).await;
    shared.registry.remove(&session.conn);
    let sent = finish_writer(writer, close).await;
    // A killed gateway leaves things as a crashed process would.
    if !shared.killed.is_cancelled() {
        shared.policies.release(&session.user, &session.device, &session.conn).await;
        shared.cursors.flush_device(&session.user, &session.device).await;
        publish_lifecycle(&shared.client, &session.who(), Some(&sent)).await;
    }
    shared.metrics.connections.dec();
    info!(user = %session.user, conn = %session.conn, code = sent.code, reason = %sent.reason, "disconnected");
}

async fn serve(session: &Arc<Session>, read_half: ReadHalf, topic_queue: mpsc::Receiver<TopicRequest>) -> Close {
    let opened = tokio::select! {
        biased;
        _ = session.shared.killed.cancelled() => Err(killed()),
        opened = join::open(session) => opened,
        _ = session.outbox().closed() => Err(session.outbox().close_reason().unwrap_or_else(|| Close::new(1011, "closed"))),
        _ = session.shared.shutdown.cancelled() => Err(Close::new(close_code::RESTART, "gateway restarting")),
    };
    if let Err(close) = opened {
        return close;
    }
    publish_lifecycle(&session.shared.client, &session.who(), None).await;
    let reader = MessageReader::new(
        fastwebsockets::after_handshake_split(read_half, tokio::io::sink(), fastwebsockets::Role::Server).0,
        session.shared.config.max_frame_bytes,
    );
    let reader = tokio::spawn(inbound::read_loop(session.clone(), reader));
    supervise(session, reader, topic_queue).await
}

/// Waits for the end of the connection; meanwhile sends pings and runs topic requests and repairs,
/// one at a time. Returns how the connection closes.
async fn supervise(
    session: &Session,
    mut reader: JoinHandle<Close>,
    mut topic_queue: mpsc::Receiver<TopicRequest>,
) -> Close {
    let config = &session.shared.config;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
    let expiry = tokio::time::sleep(Duration::from_secs(session.request.claims.exp.saturating_sub(now_secs())));
    tokio::pin!(expiry);
    let close = loop {
        let work = tokio::select! {
            biased;
            _ = session.shared.killed.cancelled() => break killed(),
            ended = &mut reader => return ended.unwrap_or_else(|_| Close::new(1011, "reader failed")),
            _ = session.outbox().closed() => {
                break session.outbox().close_reason().unwrap_or_else(|| Close::new(1011, "closed"));
            }
            _ = session.shared.shutdown.cancelled() => break Close::new(close_code::RESTART, "gateway restarting"),
            _ = &mut expiry => break Close::new(close_code::TOKEN_EXPIRED, "token expired"),
            _ = heartbeat.tick() => {
                if session.silent_for() > config.heartbeat + config.heartbeat_timeout {
                    break Close::new(1001, "no heartbeat");
                }
                session.outbox().push_control(wire::ping());
                continue;
            }
            _ = session.entry.repair.notified() => join::repair(session).await,
            Some(request) = topic_queue.recv() => join::topic_request(session, request).await,
        };
        if let Err(close) = work {
            break close;
        }
    };
    reader.abort();
    close
}

/// The gateway died: the socket is dropped, the client sees no close frame.
fn killed() -> Close {
    Close::new(1006, "gateway killed")
}

/// Waits for the writer to send the close frame, dropping the socket if it cannot.
async fn finish_writer(mut writer: JoinHandle<Close>, close: Close) -> Close {
    match tokio::time::timeout(CLOSE_GRACE, &mut writer).await {
        Ok(Ok(sent)) => sent,
        _ => {
            writer.abort();
            warn!(code = close.code, "socket dropped: the close frame could not be written");
            close
        }
    }
}

/// Splits the upgraded connection; a plain TCP stream splits without a lock between the halves.
fn split(upgraded: Upgraded) -> (ReadHalf, WriteHalf) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            // Bytes the HTTP layer read past the handshake belong to the WebSocket stream.
            let buffered: Bytes = parts.read_buf;
            (Box::pin(std::io::Cursor::new(buffered).chain(read)), Box::pin(write))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::pin(read), Box::pin(write))
        }
    }
}
