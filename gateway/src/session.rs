//! One WebSocket connection, from the upgrade to the close.
//!
//! Three tasks per socket: the writer (owns the write half, drains the outbox), the reader (owns
//! the read half, handles client frames) and this supervisor, which sets the session up, sends
//! pings, watches the token's expiry and the gateway's shutdown, and ends everything with one close.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_shared::frame::{ClientFrame, ServerFrame, close_code, error_code};
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
use crate::auth::ConnectRequest;
use crate::dispatch::SessionEntry;
use crate::outbox::{Close, Outbox};
use crate::reader::{Inbound, MessageReader};
use crate::{stream_state, wire};

/// How long a closing socket's writer may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

/// A connected client.
pub(crate) struct Session {
    shared: Arc<Shared>,
    pub(crate) conn: String,
    pub(crate) user: Arc<str>,
    pub(crate) device: String,
    request: ConnectRequest,
    entry: Arc<SessionEntry>,
    /// Milliseconds since `started` when the client was last heard from.
    last_heard: AtomicU64,
    started: Instant,
}

impl Session {
    fn outbox(&self) -> &Outbox {
        &self.entry.outbox
    }

    fn audiences(&self) -> Vec<Audience> {
        let mut audiences = vec![Audience::User(self.user.to_string()), Audience::All];
        audiences.extend(self.request.topics.iter().cloned().map(Audience::Topic));
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
}

/// Runs the connection on `upgraded` until it closes.
pub(crate) async fn run(shared: Arc<Shared>, upgraded: Upgraded, request: ConnectRequest) {
    let (read_half, write_half) = split(upgraded);
    let outbox = Arc::new(Outbox::new(shared.config.outbound_queue_bytes));
    let writer = tokio::spawn(crate::writer::run(write_half, outbox.clone(), shared.config.write_batch_frames));
    let user: Arc<str> = request.claims.sub.as_str().into();
    let entry = Arc::new(SessionEntry { key: shared.dispatcher.next_key(), user: user.clone(), outbox });
    let session = Arc::new(Session {
        conn: crate::id::random_id(12),
        user,
        device: request.device.clone(),
        request,
        entry,
        last_heard: AtomicU64::new(0),
        started: Instant::now(),
        shared: shared.clone(),
    });
    shared.metrics.connections.inc();
    info!(user = %session.user, device = %session.device, conn = %session.conn, "connected");

    let close = serve(&session, read_half).await;
    session.outbox().close(close.clone());
    if close.code == close_code::SLOW_CONSUMER {
        shared.metrics.slow_consumer_closes.inc();
    }
    shared.dispatcher.detach(session.entry.key, session.audiences()).await;
    let sent = finish_writer(writer, close).await;
    shared.metrics.connections.dec();
    info!(user = %session.user, conn = %session.conn, code = sent.code, reason = %sent.reason, "disconnected");
}

async fn serve(session: &Arc<Session>, read_half: ReadHalf) -> Close {
    if let Err(close) = start(session).await {
        return close;
    }
    let reader = MessageReader::new(
        fastwebsockets::after_handshake_split(read_half, tokio::io::sink(), fastwebsockets::Role::Server).0,
        session.shared.config.max_frame_bytes,
    );
    let reader = tokio::spawn(read_loop(session.clone(), reader));
    supervise(session, reader).await
}

/// Subscribes, sends `welcome`, and opens live delivery.
async fn start(session: &Session) -> Result<(), Close> {
    let shared = &session.shared;
    shared
        .dispatcher
        .attach(session.entry.clone(), session.audiences())
        .await
        .map_err(|e| Close::new(1011, e.to_string()))?;
    // Sent after the subscriptions on the same connection: every message stored after `bounds`
    // was read reaches this session live.
    let bounds = stream_state::bounds(&shared.js).await.map_err(|e| Close::new(1013, e.to_string()))?;
    session.send(&ServerFrame::Welcome {
        conn: session.conn.clone(),
        user: session.user.to_string(),
        device: session.device.clone(),
        node: shared.config.node_id.clone(),
        seq: bounds.last,
        heartbeat: shared.config.heartbeat.as_secs(),
    });
    session.outbox().release(Vec::new());
    Ok(())
}

/// Waits for the end of the connection, sending pings meanwhile; returns how it closes.
async fn supervise(session: &Session, mut reader: JoinHandle<Close>) -> Close {
    let config = &session.shared.config;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
    let expiry = tokio::time::sleep(Duration::from_secs(session.request.claims.exp.saturating_sub(now_secs())));
    tokio::pin!(expiry);
    let close = loop {
        tokio::select! {
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
            }
        }
    };
    reader.abort();
    close
}

async fn read_loop(session: Arc<Session>, mut reader: MessageReader<ReadHalf>) -> Close {
    loop {
        let inbound = match reader.next().await {
            Ok(inbound) => inbound,
            Err(close) => return close,
        };
        session.touch();
        match inbound {
            Inbound::Ping(payload) => session.outbox().push_control(wire::pong(&payload)),
            Inbound::Pong => {}
            Inbound::Close(code) => return Close::new(code.filter(|c| echoable(*c)).unwrap_or(close_code::NORMAL), ""),
            Inbound::Text(text) => {
                if let Err(close) = handle_text(&session, &text).await {
                    return close;
                }
            }
        }
    }
}

/// Codes a peer may send and we may send back.
fn echoable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

async fn handle_text(session: &Arc<Session>, text: &[u8]) -> Result<(), Close> {
    let frame = match serde_json::from_slice::<ClientFrame>(text) {
        Ok(frame) => frame,
        Err(error) => return refuse_frame(session, text, error),
    };
    match frame {
        ClientFrame::Ping => session.send(&ServerFrame::Pong),
        ClientFrame::Ack { .. } | ClientFrame::Sub { .. } | ClientFrame::Unsub { .. } | ClientFrame::Rpc { .. } => {
            session.send(&ServerFrame::error(error_code::UNKNOWN_TYPE, "not supported by this gateway yet"));
        }
    }
    Ok(())
}

/// A text message that is not a valid client frame: an `error` frame when it is a JSON object with a
/// `type` (so newer clients survive older gateways), a 1008 close when it cannot be parsed at all.
fn refuse_frame(session: &Session, text: &[u8], error: serde_json::Error) -> Result<(), Close> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: String,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(text) else {
        return Err(Close::new(close_code::POLICY, "not a JSON frame with a type"));
    };
    const KNOWN: [&str; 5] = ["ack", "sub", "unsub", "rpc", "ping"];
    if KNOWN.contains(&probe.kind.as_str()) {
        session.send(&ServerFrame::error(error_code::BAD_REQUEST, format!("bad {} frame: {error}", probe.kind)));
    } else {
        session.send(&ServerFrame::error(error_code::UNKNOWN_TYPE, format!("unknown frame type {:?}", probe.kind)));
    }
    Ok(())
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
