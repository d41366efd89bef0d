//! One connection, from the upgrade to the close, in one task. The protocol is the connection's
//! [`Codec`]; the transport a reader and a writer ([`Connection`]): a WebSocket's halves, or for
//! Server-Sent Events a client that never speaks and the response body's pipe.
//!
//! The exactness rules live in a state machine with no I/O ([`state`]); this task does its I/O:
//! it opens the session ([`join`]), reads client frames ([`inbound`]), writes what the session
//! queued ([`transmit`]), performs what the session asks of NATS one job at a time ([`actions`]),
//! keeps time ([`deadlines`]), and ends everything with one close. It waits on all of them at once
//! and on the session's mailbox, which the router, the broadcast logs and the cluster use to wake
//! it. The rarely used, large futures (opening, closing) are boxed, so an idle socket's task stays
//! small.

mod actions;
pub(crate) mod bounds;
mod coverage;
mod deadlines;
mod inbound;
mod join;
pub(crate) mod live;
mod presence;
pub(crate) mod replay;
mod rpc;
mod state;
mod transmit;
mod write_half;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::OptionFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use herald_shared::subject::Audience;
use herald_shared::token::since_epoch;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::close::{Close, CloseCode};
use crate::cluster::cursor::DeviceCursor;
use crate::cluster::events::{Who, publish_lifecycle};
use crate::cluster::registry::{LocalSession, SocketInfo};
use crate::codec::{Codec, HeraldCodec, WireFormat};
use crate::delivery::mailbox::{Event, Mailbox};
use crate::http::auth::ConnectRequest;
use crate::http::metrics::CloseLabels;
use crate::http::ratelimit::TokenBucket;
use crate::http::tap::TappedStream;
use crate::websocket::reader::{Inbound, MessageReader};
use deadlines::{Deadlines, Due};
use state::{Outcome, SessionState, Tally, UnreadQuestion};
use transmit::Transmit;

/// How long a closing socket may take to send its last frames before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Most bytes taken from the session's queue for one write.
const BATCH_BYTES: usize = 256 * 1024;

pub(crate) type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
pub(crate) use write_half::{WriteHalf, send_queue};

/// A connected client: what the session's I/O needs to know.
pub(crate) struct Session {
    shared: Arc<Shared>,
    /// The session's key with the router.
    key: u64,
    conn: String,
    user: Arc<str>,
    device: String,
    request: ConnectRequest,
    mailbox: Arc<Mailbox>,
    /// The device's cursor, held from the first acknowledgement on.
    cursor: OnceLock<Arc<DeviceCursor>>,
}

impl Session {
    fn who(&self) -> Who<'_> {
        Who { user: &self.user, device: &self.device, conn: &self.conn, node: &self.shared.config.node_id }
    }

    /// Notes that the device has everything up to `seq` (written to KV by the next flush).
    fn ack(&self, seq: u64) {
        self.cursor.get_or_init(|| self.shared.cursors.hold(&self.user, &self.device)).ack(seq);
    }
}

/// A connection's transport and protocol, whatever they are.
pub(crate) struct Connection {
    pub(crate) reader: MessageReader<ReadHalf>,
    pub(crate) write_half: WriteHalf,
    pub(crate) codec: Codec,
}

impl Connection {
    /// An upgraded WebSocket speaking Herald's protocol; messages over `max_frame_bytes` are refused.
    pub(crate) fn herald(upgraded: Upgraded, max_frame_bytes: usize) -> Connection {
        let Socket { reader, writer } = Socket::new(upgraded, max_frame_bytes);
        Connection { reader, write_half: writer, codec: Codec::Herald(HeraldCodec) }
    }
}

/// An upgraded connection's two halves (a protocol that authenticates after the upgrade reads
/// its first frames before the session exists).
pub(crate) struct Socket {
    pub(crate) reader: MessageReader<ReadHalf>,
    pub(crate) writer: WriteHalf,
}

impl Socket {
    /// Splits `upgraded`; messages over `max_frame_bytes` are refused.
    pub(crate) fn new(upgraded: Upgraded, max_frame_bytes: usize) -> Socket {
        let (read_half, writer) = split(upgraded);
        Socket { reader: MessageReader::new(read_half, max_frame_bytes), writer }
    }
}

/// Runs connection `conn` on `socket` until it closes, speaking `codec`'s protocol.
pub(crate) fn run_codec(
    shared: Arc<Shared>,
    socket: Socket,
    request: ConnectRequest,
    conn: String,
    address: IpAddr,
    codec: Codec,
) -> impl Future<Output = ()> + Send + 'static {
    let connection = Connection { reader: socket.reader, write_half: socket.writer, codec };
    run_with(shared, connection, request, conn, address)
}

/// Runs `accepting` (a protocol's handshake after the upgrade), then the session it returns, if
/// any. Only one of the two is held at a time: a task is as large as its largest state for its
/// whole life, and awaited at the end of the accepting `async fn`, the session would sit beside
/// everything that function keeps (its arguments, the socket it was given).
pub(crate) fn accept_then_run<A, S>(accepting: A) -> impl Future<Output = ()> + Send + 'static
where
    A: Future<Output = Option<S>> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    Box::pin(accepting).then(OptionFuture::from).map(|_: Option<()>| ())
}

/// Runs connection `conn` until it closes: registers the session at once, then returns the task
/// that serves it.
///
/// Not an `async fn`: one keeps its arguments for its whole life, and this future lives as long
/// as the connection, so what only the start needs (the request, the address) goes into the
/// session here and the future holds little more than the socket's halves.
pub(crate) fn run_with(
    shared: Arc<Shared>,
    connection: Connection,
    request: ConnectRequest,
    conn: String,
    address: IpAddr,
) -> impl Future<Output = ()> + Send + 'static {
    let session = register(shared, request, conn, address);
    let Connection { mut reader, write_half, codec } = connection;
    let mut transmit = Transmit::new(write_half);
    async move {
        let shared = &session.shared;
        let format = codec.format();
        let opened = tokio::select! {
            biased;
            _ = shared.killed.cancelled() => Err(Close::gone("gateway killed")),
            _ = shared.shutdown.cancelled() => Err(Close::restart()),
            // Boxed: a task's size is that of its largest state, and opening runs once.
            opened = Box::pin(join::open(&session, codec)) => opened,
        };
        let (close, served) = match opened {
            Ok(state) => {
                Box::pin(publish_lifecycle(&shared.client, &session.who(), None)).await;
                let (close, mut state, job) = serve(&session, state, &mut reader, &mut transmit).await;
                // What the client's TCP took of the auto-acknowledged frames, before the cursor's
                // last write: the rest is lost with the connection.
                if let Some(seq) = transmit.acknowledged(true) {
                    session.ack(seq);
                }
                // A close decided outside the state (a stalled write, an expired token) drops its
                // queue all the same.
                state.close(close.clone());
                (close, Some((state, job)))
            }
            Err(close) => (close, None),
        };
        drop(reader);
        let state = served.as_ref().map(|(state, _)| &**state);
        let audiences = state.map(SessionState::audiences).unwrap_or_else(|| join_audiences(&session));
        let in_flight = state.and_then(SessionState::topic_in_flight);
        let last = last_frame(state, format, &close);
        if let Some((state, job)) = served {
            settle_losses(&session, state, job, transmit.unwritten());
        }
        let ending = Ending { audiences, in_flight, last, close };
        Box::pin(finish(&session, format, ending, transmit)).await;
    }
}

/// The session of connection `conn`, known to the registry and counted.
fn register(shared: Arc<Shared>, request: ConnectRequest, conn: String, address: IpAddr) -> Arc<Session> {
    let mailbox = Arc::new(Mailbox::new(shared.config.outbound_queue_bytes));
    let user: Arc<str> = request.claims.sub.as_str().into();
    let session = Arc::new(Session {
        key: shared.router.next_key(),
        conn,
        user,
        device: request.device.clone(),
        request,
        mailbox: mailbox.clone(),
        shared: shared.clone(),
        cursor: OnceLock::new(),
    });
    let about = SocketInfo {
        conn: session.conn.clone(),
        device: session.device.clone(),
        address: address.to_string(),
        since: crate::cluster::events::now_rfc3339(),
    };
    shared.registry.insert(LocalSession {
        conn: session.conn.clone(),
        user: session.user.clone(),
        mailbox,
        about: Arc::new(about),
    });
    if shared.shutdown.is_cancelled() {
        // The gateway began stopping before the registry knew this session.
        session.mailbox.close(crate::stopping(&shared));
    }
    shared.metrics.connections.inc();
    shared.metrics.users.set(shared.registry.counts().users as i64);
    info!(user = %session.user, device = %session.device, conn = %session.conn, %address, "connected");
    session
}

/// Serves the connection until it must close; returns why, the session, and its job under way.
async fn serve(
    session: &Arc<Session>,
    mut state: Box<SessionState>,
    reader: &mut MessageReader<ReadHalf>,
    transmit: &mut Transmit<WriteHalf>,
) -> (Close, Box<SessionState>, Option<BoxStream<'static, Outcome>>) {
    let shared = &session.shared;
    let config = &shared.config;
    let now = Instant::now();
    let expires = deadlines::token_expiry(now, since_epoch(), session.request.claims.exp);
    let heartbeat = state.codec().heartbeat(config.heartbeat);
    let silence = state.codec().silence(config.heartbeat_timeout);
    let mut deadlines = Deadlines::new(now, heartbeat, silence, config.write_stall_timeout, expires);
    let timer = tokio::time::sleep_until(deadlines.next(None));
    tokio::pin!(timer);
    let mut job: Option<BoxStream<'static, Outcome>> = None;
    let mut rpc_budget = TokenBucket::new(config.rpc_rate, config.rpc_burst, std::time::Instant::now());
    // Commands the client sent with its first (Centrifugal's after `connect`), in their order.
    if let Some(input) = state.codec_mut().take_first_input() {
        let first = Inbound::Text(input);
        if let Err(close) = inbound::handle(session, &mut state, first, &mut rpc_budget, &mut deadlines) {
            return (close, state, job);
        }
    }
    loop {
        if let Err(close) = advance(session, &mut state, &mut job, transmit) {
            return (close, state, job);
        }
        // Deadlines only move later as the client talks and reads: the timer is moved earlier when
        // needed, and re-armed when it fires (early, harmlessly, if a deadline moved meanwhile).
        let mut deadline = deadlines.next(transmit.stalled_since());
        if let Some(check) = transmit.next_check() {
            deadline = deadline.min(check);
        }
        if deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        // The gateway stopping reaches the session through its mailbox (see `Registry::close_all`).
        let ended = tokio::select! {
            biased;
            written = transmit.flush(), if transmit.is_busy() => {
                written.map_err(|error| Close::gone(format!("write failed: {error}")))
            }
            outcome = next_outcome(&mut job), if job.is_some() && state.has_room_for_job() => {
                match outcome {
                    Some(outcome) => state.on_outcome(outcome),
                    None => job = None,
                }
                Ok(())
            }
            _ = session.mailbox.woken() => Ok(()),
            inbound = reader.next(), if state.has_room_for_input() => {
                deadlines.heard(Instant::now());
                inbound.and_then(|inbound| {
                    inbound::handle(session, &mut state, inbound, &mut rpc_budget, &mut deadlines)
                })
            }
            _ = &mut timer => {
                let due = on_time(&mut deadlines, &mut state, transmit);
                timer.as_mut().reset(deadlines.next(transmit.stalled_since()));
                due
            }
        };
        if let Err(close) = ended {
            return (close, state, job);
        }
    }
}

/// Lets the session work until it waits on I/O: takes what its sources and mailbox hold, starts
/// its next action, hands the socket its next batch, and parks it in its logs when idle.
fn advance(
    session: &Arc<Session>,
    state: &mut SessionState,
    job: &mut Option<BoxStream<'static, Outcome>>,
    transmit: &mut Transmit<WriteHalf>,
) -> Result<(), Close> {
    let shared = &session.shared;
    let mut parked = false;
    loop {
        state.pull(shared.router.watermark().get());
        if job.is_none()
            && let Some(action) = state.poll_action()
        {
            *job = Some(actions::perform(session, action));
        }
        if let Some(close) = state.closing() {
            return Err(close.clone());
        }
        if !transmit.is_busy()
            && let Some(revision) = state.take_reported_note()
        {
            // Everything taken for the socket so far is written.
            forget_reported_note(session, revision);
        }
        if let Some(question) = state.take_read_count() {
            count_unread(session, question);
        }
        if !transmit.is_busy() && state.has_frames() {
            let max_frames = shared.config.write_batch_frames;
            if transmit.tells() {
                // What auto-acknowledged subscriptions were sent counts once the client has the
                // batch that carries it, also while frames stay queued behind it.
                let mut sent = None;
                transmit.start(|batch| sent = state.take_frames_acknowledged(batch, max_frames, BATCH_BYTES));
                if let Some(seq) = sent.and_then(|seq| transmit.mark(seq)) {
                    session.ack(seq);
                }
            } else {
                transmit.start(|batch| state.take_frames(batch, max_frames, BATCH_BYTES));
            }
        }
        if !transmit.is_busy()
            && !state.has_frames()
            && let Some(seq) = state.take_auto_ack()
            && let Some(seq) = transmit.mark(seq)
        {
            // Everything queued is written: what was sent on auto-acknowledged subscriptions counts
            // once the client has it.
            session.ack(seq);
        }
        if let Some(seq) = transmit.acknowledged(false) {
            session.ack(seq);
        }
        count(&shared.metrics, state.take_tally());
        if transmit.is_busy() || parked {
            return Ok(());
        }
        // Idle: ask the logs to wake the task, then look once more (a message may have come
        // between the last look and the parking).
        state.park();
        parked = true;
    }
}

async fn next_outcome(job: &mut Option<BoxStream<'static, Outcome>>) -> Option<Outcome> {
    match job {
        Some(stream) => stream.next().await,
        None => None,
    }
}

/// Acts on whatever deadline passed.
fn on_time(deadlines: &mut Deadlines, state: &mut SessionState, transmit: &Transmit<WriteHalf>) -> Result<(), Close> {
    // A client reading a long backlog slowly answers the ping queued behind it late: while it
    // takes bytes, it is not silent.
    if let Some(alive) = transmit.peer_alive_at() {
        deadlines.alive_at(alive);
    }
    match deadlines.due(Instant::now(), transmit.stalled_since()) {
        Some(Due::Ping) => {
            let ping = state.codec().ping();
            state.push_frame(ping);
            state.pinged();
            Ok(())
        }
        Some(Due::Silent) => Err(Close::new(CloseCode::NoHeartbeat, "no heartbeat")),
        Some(Due::Expired) => Err(Close::new(CloseCode::TokenExpired, "token expired")),
        Some(Due::Stalled) => Err(Close::slow_consumer("the client stopped reading: reconnect with since")),
        None => Ok(()),
    }
}

/// Adds a session's counts to the gateway's metrics.
fn count(metrics: &crate::http::metrics::Metrics, tally: Tally) {
    if tally == Tally::default() {
        return;
    }
    // Every session adds to the same counters: only what changed is written.
    let add = |counter: &prometheus_client::metrics::counter::Counter, by: u64| {
        if by > 0 {
            counter.inc_by(by);
        }
    };
    add(&metrics.messages_out, tally.delivered);
    add(&metrics.bytes_out, tally.delivered_bytes);
    add(&metrics.replays, tally.replays);
    add(&metrics.replayed_messages, tally.replayed);
    add(&metrics.replays_incomplete, tally.replays_incomplete);
    add(&metrics.repairs, tally.repairs);
    add(&metrics.unrepairable_gaps, tally.unrepairable);
    add(&metrics.losses_assumed, tally.losses_assumed);
}

/// How a connection ends: what it received, its close and the close's last frame.
struct Ending {
    /// Its user, `all` and its topics.
    audiences: Vec<Audience>,
    /// A topic it was joining or leaving when it ended.
    in_flight: Option<Audience>,
    last: Option<Bytes>,
    close: Close,
}

/// Closes the socket and releases what the session held: its routes, its place in the registry,
/// its claim and its cursor; a Socket.IO connection's topics are kept for its recovery.
async fn finish(session: &Session, format: WireFormat, ending: Ending, mut transmit: Transmit<WriteHalf>) {
    let Ending { mut audiences, in_flight, last, close } = ending;
    let shared = &session.shared;
    if close.code == CloseCode::SlowConsumer {
        shared.metrics.slow_consumer_closes.inc();
    }
    shared.metrics.connections_closed.get_or_create(&CloseLabels { code: close.code.label() }).inc();
    if format == WireFormat::SocketIo {
        remember_topics(session, &audiences, &close).await;
    }
    audiences.extend(in_flight);
    shared.router.detach(session.key, audiences, true).await;
    shared.registry.remove(&session.conn);
    shared.metrics.users.set(shared.registry.counts().users as i64);
    // A killed gateway leaves things as a crashed process would.
    // Before the close frame: a client that reconnects as soon as it sees it (a STOMP DISCONNECT's
    // RECEIPT comes just before) resumes from what it acknowledged on this connection. Bounded, so
    // that a KV that does not answer holds no close back (the device then resumes from its older
    // cursor: duplicates, no loss).
    if !shared.killed.is_cancelled()
        && let Some(cursor) = session.cursor.get()
        && tokio::time::timeout(CLOSE_GRACE, shared.cursors.release(cursor)).await.is_err()
    {
        warn!(user = %session.user, device = %session.device, "cursor not written at close: KV did not answer in time");
    }
    if close.code.is_sent() {
        transmit.finish(last, CLOSE_GRACE).await;
    }
    drop(transmit);
    if !shared.killed.is_cancelled() {
        shared.policies.release(&session.user, &session.device, &session.conn).await;
        publish_lifecycle(&shared.client, &session.who(), Some(&close)).await;
    }
    shared.metrics.connections.dec();
    info!(user = %session.user, conn = %session.conn, code = close.number(), reason = %close.reason, "disconnected");
}

/// Keeps a closing connection's topics for its client's recovery, for the recovery window from now
/// on. Not when another connection of its state replaced it (that one keeps them), nor when the
/// gateway was killed (as a crashed one would not). Bounded, so that a KV that does not answer
/// holds no close back.
async fn remember_topics(session: &Session, audiences: &[Audience], close: &Close) {
    let shared = &session.shared;
    if shared.killed.is_cancelled() || close.code == CloseCode::Replaced {
        return;
    }
    let topics = audiences.iter().filter_map(|audience| match audience {
        Audience::Topic(topic) => Some(topic.clone()),
        _ => None,
    });
    let write = shared.socketio_states.write(&session.user, &session.device, topics.collect());
    match tokio::time::timeout(CLOSE_GRACE, write).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(user = %session.user, %error, "topics not kept at close"),
        Err(_) => debug!(user = %session.user, "topics not kept at close: KV did not answer in time"),
    }
}

/// The frame that tells the client why its connection closes, if one is sent: 1006 means the
/// connection is gone (or the gateway was killed).
fn last_frame(state: Option<&SessionState>, format: WireFormat, close: &Close) -> Option<Bytes> {
    if !close.code.is_sent() {
        return None;
    }
    match state {
        Some(state) => state.codec().close(close),
        None => Codec::close_unopened(format, close),
    }
}

/// A connection that ended during a loss check, or with one waiting, or with a gap it had not read
/// yet that may be a loss, has the checks go on in a task of its own, which the gateway's drain
/// waits for: a loss they find is noted, since the client's next resume, wherever it lands, must be
/// told (as [`Action::NoteLost`](state::Action) does for a note under way).
fn settle_losses(
    session: &Arc<Session>,
    mut state: Box<SessionState>,
    job: Option<BoxStream<'static, Outcome>>,
    unwritten: u64,
) {
    state.examine_unread(unwritten);
    if !state.owes_loss_check() {
        return;
    }
    let shared = session.shared.clone();
    let session = session.clone();
    let mut job = job.filter(|_| state.settling_loss());
    let settle = async move {
        loop {
            let outcome = match job.as_mut() {
                Some(stream) => stream.next().await,
                None => None,
            };
            let Some(action) = state.next_loss_action(outcome) else { break };
            job = Some(actions::perform(&session, action));
        }
        count(&session.shared.metrics, state.take_tally());
    };
    shared.sessions.clone().spawn(async move {
        // A gateway killed stops at once, as it would crash.
        tokio::select! {
            biased;
            _ = shared.killed.cancelled() => {}
            _ = settle => {}
        }
    });
}

/// Counts the user's unread personal messages the session asks about, for it to tell its client.
fn count_unread(session: &Arc<Session>, question: UnreadQuestion) {
    let UnreadQuestion { read, upto, muted } = question;
    let session = session.clone();
    session.shared.sessions.clone().spawn(async move {
        let counted = session.shared.inbox.unread(&session.user, read, upto, &muted).await;
        let unread = counted.inspect_err(|error| warn!(user = %session.user, %error, "unread count not read")).ok();
        session.mailbox.push_event(Event::ReadCounted { read, upto, unread });
    });
}

/// Removes the lost-messages note at `revision`, which the connection's first replay reported.
fn forget_reported_note(session: &Arc<Session>, revision: u64) {
    let session = session.clone();
    session.shared.sessions.clone().spawn(async move {
        let shared = &session.shared;
        if let Err(error) = shared.cursors.forget_lost(&session.user, &session.device, revision).await {
            // Either a newer note came (it stays), or KV is down: the next resume reports it again.
            debug!(user = %session.user, device = %session.device, %error, "lost-messages note not removed");
        }
    });
}

/// What a session that never opened may have subscribed to.
fn join_audiences(session: &Session) -> Vec<Audience> {
    state::audiences_of(&session.user, session.request.topics.iter())
}

/// Splits the upgraded connection; a plain TCP stream splits without a lock between the halves.
pub(crate) fn split(upgraded: Upgraded) -> (ReadHalf, WriteHalf) {
    match upgraded.downcast::<TokioIo<TappedStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_inner().into_split();
            // Bytes the HTTP layer read past the handshake belong to the WebSocket stream. They are
            // copied out: keeping them would keep the HTTP layer's whole 8 KiB read buffer alive.
            let buffered = Bytes::copy_from_slice(&parts.read_buf);
            (Box::pin(std::io::Cursor::new(buffered).chain(read)), WriteHalf::tcp(write))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::pin(read), WriteHalf::new(write))
        }
    }
}
