//! One WebSocket connection, from the upgrade to the close.
//!
//! Two tasks per socket: the writer (owns the write half, drains the outbox) and this one, which
//! opens the session ([`join`]), reads client frames ([`inbound`]), runs whatever needs the stream one
//! at a time (topic joins, repairs), sends pings, watches the token's expiry and the gateway's
//! shutdown, and ends everything with one close. The rarely used, large futures (opening, replays)
//! are boxed, so an idle socket's task stays small.

pub(crate) mod bounds;
mod inbound;
mod join;
pub(crate) mod replay;
pub(crate) mod writer;

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
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Shared;
use crate::cluster::events::{Who, publish_lifecycle};
use crate::cluster::registry::LocalSession;
use crate::delivery::outbox::{Close, Outbox};
use crate::delivery::router::SessionEntry;
use crate::http::auth::ConnectRequest;
use crate::http::ratelimit::TokenBucket;
use crate::websocket::frame;
use crate::websocket::reader::MessageReader;

/// How long a closing socket's writer may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

/// A `sub` or `unsub`.
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
        self.outbox().push_control(frame::text(frame.to_json().as_bytes()));
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
    let writer =
        tokio::spawn(crate::session::writer::run(write_half, outbox.clone(), shared.config.write_batch_frames));
    let user: Arc<str> = request.claims.sub.as_str().into();
    let session = Arc::new(Session {
        entry: Arc::new(SessionEntry::new(shared.dispatcher.next_key(), user.clone(), outbox.clone())),
        topics: Mutex::new(request.topics.iter().cloned().collect()),
        conn,
        user,
        device: request.device.clone(),
        request,
        last_heard: AtomicU64::new(0),
        started: Instant::now(),
        shared: shared.clone(),
    });
    shared.registry.insert(LocalSession { conn: session.conn.clone(), user: session.user.clone(), outbox });
    shared.metrics.connections.inc();
    shared.metrics.users.set(shared.registry.counts().users as i64);
    info!(user = %session.user, device = %session.device, conn = %session.conn, %address, "connected");

    let close = serve(&session, read_half).await;
    // Boxed: a task's size is that of its largest state, and these run once, at the end.
    Box::pin(finish(&session, writer, close)).await;
}

/// Closes the session's socket and releases what it held, after it ended with `close`.
async fn finish(session: &Session, writer: JoinHandle<Close>, close: Close) {
    let shared = &session.shared;
    session.outbox().close(close.clone());
    if close.code == close_code::SLOW_CONSUMER {
        shared.metrics.slow_consumer_closes.inc();
    }
    shared.dispatcher.detach(session.entry.key, session.audiences(), true).await;
    shared.registry.remove(&session.conn);
    shared.metrics.users.set(shared.registry.counts().users as i64);
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

async fn serve(session: &Arc<Session>, read_half: ReadHalf) -> Close {
    let opened = tokio::select! {
        biased;
        _ = session.shared.killed.cancelled() => Err(killed()),
        opened = Box::pin(join::open(session)) => opened,
        _ = session.outbox().closed() => Err(session.outbox().close_reason().unwrap_or_else(|| Close::new(1011, "closed"))),
        _ = session.shared.shutdown.cancelled() => Err(Close::new(close_code::RESTART, "gateway restarting")),
    };
    if let Err(close) = opened {
        return close;
    }
    Box::pin(publish_lifecycle(&session.shared.client, &session.who(), None)).await;
    let reader = MessageReader::new(read_half, session.shared.config.max_frame_bytes);
    supervise(session, reader).await
}

/// Reads client frames until the connection ends; meanwhile sends pings and runs repairs. Returns
/// how the connection closes.
async fn supervise(session: &Arc<Session>, mut reader: MessageReader<ReadHalf>) -> Close {
    let config = &session.shared.config;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
    let expiry = tokio::time::sleep(Duration::from_secs(session.request.claims.exp.saturating_sub(now_secs())));
    tokio::pin!(expiry);
    let mut rpc_budget = TokenBucket::new(config.rpc_rate, config.rpc_burst, Instant::now().into_std());
    loop {
        let work = tokio::select! {
            biased;
            _ = session.shared.killed.cancelled() => return killed(),
            _ = session.outbox().closed() => {
                return session.outbox().close_reason().unwrap_or_else(|| Close::new(1011, "closed"));
            }
            _ = session.shared.shutdown.cancelled() => return Close::new(close_code::RESTART, "gateway restarting"),
            _ = &mut expiry => return Close::new(close_code::TOKEN_EXPIRED, "token expired"),
            _ = session.entry.repair.notified() => Box::pin(join::repair(session)).await,
            inbound = reader.next() => match inbound {
                Ok(inbound) => {
                    session.touch();
                    inbound::handle(session, inbound, &mut rpc_budget).await
                }
                Err(close) => Err(close),
            },
            _ = heartbeat.tick() => {
                if session.silent_for() > config.heartbeat + config.heartbeat_timeout {
                    return Close::new(1001, "no heartbeat");
                }
                session.outbox().push_control(frame::ping());
                Ok(())
            }
        };
        if let Err(close) = work {
            return close;
        }
    }
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
            // Bytes the HTTP layer read past the handshake belong to the WebSocket stream. They are
            // copied out: keeping them would keep the HTTP layer's whole 8 KiB read buffer alive.
            let buffered = Bytes::copy_from_slice(&parts.read_buf);
            (Box::pin(std::io::Cursor::new(buffered).chain(read)), Box::pin(write))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::pin(read), Box::pin(write))
        }
    }
}
