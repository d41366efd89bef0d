//! Opening a session: everything before `welcome`.
//!
//! The subscriptions exist before the stream's last sequence `L` is read (on the same NATS
//! connection, so anything stored after `L` arrives live); the session starts with `last_sent = L`,
//! or replays `(since, L]` first when it resumes. Live messages that arrive meanwhile wait in its
//! sources (see [`super::state`]).

use std::fmt::Display;
use std::pin::pin;
use std::time::Duration;

use futures::future::{Either, select};
use herald_shared::frame::ServerFrame;
use tracing::{debug, warn};

use super::Session;
use super::actions::{STREAM_PATIENCE, retried};
use super::bounds::{Bounds, epoch_text};
use super::live::LiveSources;
use super::state::{Noted, Params, SessionState, Start, audiences_of};
use crate::close::{Close, CloseCode};
use crate::codec::Codec;
use crate::config::NewDeviceReplay;
use crate::delivery::router::Attaching;

/// How long one read of KV may take at a join.
const KV_ATTEMPT: Duration = Duration::from_secs(2);

/// Subscribes, reads the stream's bounds and where the device resumes, and returns the session,
/// `welcome` queued.
pub(super) async fn open(session: &Session, codec: Codec) -> Result<Box<SessionState>, Close> {
    let shared = &session.shared;
    let audiences = audiences_of(&session.user, session.request.topics.iter());
    let attached = shared
        .router
        .attach(session.key, session.user.clone(), session.mailbox.clone(), audiences, Attaching::Replaying)
        .await
        .map_err(|error| Close::new(CloseCode::Internal, error.to_string()))?;
    // Each step is boxed: KV futures are large, and a burst of connects holds one per session.
    let muted = async {
        if attached.first_of_user {
            // Read again while KV fails: the prefs watch brings only later changes.
            let load = || shared.prefs.load(&attached.user, &session.user);
            if let Err(error) = read_kv(load).await {
                warn!(user = %session.user, %error, "muted kinds not loaded");
            }
        }
    };
    // A protocol that cannot report an incomplete resume reads the device's state before the claim
    // (beside the read above), so that a connection refused for it closes nobody it would replace.
    // Either order is exact: a cursor read early is at most older (more is replayed), and a note
    // written after the read reaches the session as `herald.lost`.
    let read_before = async {
        if codec.reports_incomplete_resumes() { Ok(None) } else { known_device_state(session).await.map(Some) }
    };
    let ((), read_before) = tokio::join!(Box::pin(muted), Box::pin(read_before));
    let read_before = read_before?;
    let shares_device = session.request.shares_device;
    Box::pin(shared.policies.claim(
        &session.user,
        &session.device,
        &session.conn,
        session.mailbox.clone(),
        shares_device,
    ))
    .await;
    // On the delivery connection, after the session's subscriptions: the server has them before
    // it answers.
    // At least what this gateway has seen live, and the client's `since` if it gave one.
    let known = shared.router.watermark().routed().max(session.request.since.unwrap_or(0));
    let read = || shared.bounds.read_at_least(known);
    let bounds = retried(STREAM_PATIENCE, read).await.map_err(|e| Close::new(CloseCode::Unavailable, e.to_string()))?;
    let resume = resume_point(session, bounds, read_before);
    let (resume, read) = tokio::join!(Box::pin(resume), Box::pin(read_position(session)));
    // Not read again: a failed count only leaves `welcome.unread` at 0, and a new device then
    // replays from its read position all the same.
    let muted = attached.user.muted();
    let unread = Box::pin(shared.inbox.unread_and_first(&session.user, read, bounds.last, &muted)).await;
    let first_unread = unread.as_ref().ok().and_then(|(_, first)| *first);
    let unread = unread.map(|(count, _)| count);
    let start = match (&resume, &unread) {
        (Resume::Since { requested, noted }, _) => Start::Resume { requested: *requested, noted: *noted },
        // Nothing unread: live at once, no `replayed` (a client learns it from `welcome.unread`).
        (Resume::NewDevice, Ok(0)) => Start::Live,
        (Resume::NewDevice, _) if shared.config.new_device_replay == NewDeviceReplay::Unread => Start::Unread { read },
        (Resume::NewDevice | Resume::Live, _) => Start::Live,
    };
    if let Resume::NewDevice = resume {
        // Just below its first unread message when it replays them (a connection that ends before
        // the client acknowledged them leaves them for the next, with what else came since), else
        // where it starts live: a reconnect without `since`, even before any ack, misses nothing.
        let first = if let Start::Unread { .. } = start { first_unread } else { None };
        let cursor = first.map_or(bounds.last, |first| (first - 1).min(bounds.last));
        Box::pin(shared.cursors.start_device(&session.user, &session.device, cursor)).await;
    }
    let unread = unread.unwrap_or_else(|error| {
        warn!(user = %session.user, %error, "unread count unavailable");
        0
    });
    let welcome = ServerFrame::Welcome {
        conn: session.conn.clone(),
        user: session.user.to_string(),
        device: session.device.clone(),
        node: shared.config.node_id.clone(),
        seq: bounds.last,
        heartbeat: shared.config.heartbeat.as_secs(),
        read,
        unread,
        epoch: (bounds.epoch != 0).then(|| epoch_text(bounds.epoch)),
    };
    Ok(Box::new(SessionState::new(Params {
        user: session.user.clone(),
        local: attached.user,
        codec,
        sources: LiveSources::new(session.mailbox.clone(), attached.logs),
        topics: session.request.topics.clone(),
        allowed_topics: session.request.claims.topics.clone(),
        max_topics: shared.config.max_topics,
        per_subject_cap: shared.config.stream.stream_max_msgs_per_subject,
        keep_topics_every: pings_per_write(shared.config.stream.socketio_recovery_window, shared.config.heartbeat),
        welcome,
        bounds,
        start,
    })))
}

/// How many pings (every `heartbeat`) apart a connection writes its kept state: four times a
/// recovery `window` (as policy claims are refreshed), at most once a ping.
fn pings_per_write(window: std::time::Duration, heartbeat: std::time::Duration) -> u16 {
    let pings = (window / 4).as_millis() / heartbeat.as_millis().max(1);
    u16::try_from(pings).unwrap_or(u16::MAX).max(1)
}

/// Where a connection resumes.
enum Resume {
    /// After `since`, or after the device's cursor.
    Since { requested: u64, noted: Noted },
    /// A device seen for the first time.
    NewDevice,
    /// The client asked for nothing before now: live.
    Live,
}

/// Where the device resumes, and what its earlier connections noted as lost: from `read_before`,
/// the state read before the claim, or read now. KV is read again for the stream's patience (it may
/// be failing over); a device whose state it still cannot read resumes from the stream's end with
/// nothing known, so that its resume reports itself incomplete rather than skip messages in silence.
async fn resume_point(session: &Session, bounds: Bounds, read_before: Option<DeviceState>) -> Resume {
    let (user, device) = (&session.user, &session.device);
    let state = match read_before {
        Some(state) => state,
        None => device_state(session).await,
    };
    match state {
        DeviceState::Live => Resume::Live,
        DeviceState::Since { since, noted } if of_another_stream(session.request.epoch, bounds.epoch) => {
            // The position means other messages: the stream's end, reported incomplete, as a
            // `since` beyond it.
            debug!(%user, %device, since, "since of another epoch of the stream: resuming from its end, incomplete");
            Resume::Since { requested: u64::MAX, noted }
        }
        DeviceState::Since { since, noted } => Resume::Since { requested: since, noted },
        DeviceState::Cursor { cursor: Some(cursor), noted } => Resume::Since { requested: cursor, noted },
        DeviceState::Cursor { cursor: None, .. } => Resume::NewDevice,
        DeviceState::Unreadable(error) => {
            warn!(%user, %device, %error, "cursor unreadable: resuming from the stream's end, incomplete");
            Resume::Since { requested: bounds.last, noted: Noted::Unknown }
        }
    }
}

/// Whether the client's `since` is a position of another stream than the current one: the
/// stream was made again since the client's `welcome`, its sequences started over.
fn of_another_stream(asked: Option<u64>, current: u64) -> bool {
    asked.is_some_and(|asked| current != 0 && asked != current)
}

/// What a join reads of the device's state in KV.
enum DeviceState {
    /// The client asked for nothing before now.
    Live,
    /// The client gave `since`; the device's lost-messages note.
    Since { since: u64, noted: Noted },
    /// The device's cursor (none for a new device) and, when it has one, its note.
    Cursor { cursor: Option<u64>, noted: Noted },
    /// The cursor could not be read.
    Unreadable(String),
}

impl DeviceState {
    /// Whether a resume from it may skip messages nobody could tell the client of.
    fn is_unknown(&self) -> bool {
        matches!(
            self,
            DeviceState::Unreadable(_)
                | DeviceState::Since { noted: Noted::Unknown, .. }
                | DeviceState::Cursor { cursor: Some(_), noted: Noted::Unknown }
        )
    }
}

/// Reads the device's state, each read tried again while KV fails (it may be failing over).
async fn device_state(session: &Session) -> DeviceState {
    let (cursors, user, device) = (&session.shared.cursors, &session.user, &session.device);
    let noted = async {
        match read_kv(|| cursors.read_lost(user, device)).await {
            Ok(Some(note)) => Noted::Lost(note),
            Ok(None) => Noted::Nothing,
            Err(error) => {
                warn!(%user, %device, %error, "lost-messages note unreadable");
                Noted::Unknown
            }
        }
    };
    match session.request.since {
        Some(since) => DeviceState::Since { since, noted: noted.await },
        None if session.request.live => DeviceState::Live,
        None => {
            // Read together, as a failing KV makes each wait; a new device has no use for the note.
            let cursor = pin!(read_kv(|| cursors.resume_from(user, device)));
            let (cursor, noted) = match select(cursor, pin!(noted)).await {
                Either::Left((Ok(None), _)) => (Ok(None), Noted::Nothing),
                Either::Left((cursor, noted)) => (cursor, noted.await),
                Either::Right((noted, cursor)) => (cursor.await, noted),
            };
            match cursor {
                Ok(cursor) => DeviceState::Cursor { cursor, noted },
                Err(error) => DeviceState::Unreadable(error),
            }
        }
    }
}

/// The device's state, for a client that cannot be told that its resume may skip messages: fails
/// when it cannot be read, so that the client tries again later.
async fn known_device_state(session: &Session) -> Result<DeviceState, Close> {
    let state = device_state(session).await;
    if state.is_unknown() {
        let (user, device) = (&session.user, &session.device);
        if let DeviceState::Unreadable(error) = &state {
            warn!(%user, %device, %error, "cursor unreadable");
        }
        warn!(%user, %device, "device state unreadable: the connection is refused for now");
        return Err(Close::new(CloseCode::Unavailable, "KV unavailable: what the device missed is unknown"));
    }
    Ok(state)
}

/// `read` tried again for the stream's patience, each attempt given [`KV_ATTEMPT`]: a request to a
/// KV without a leader would wait for the client's whole request timeout.
async fn read_kv<T, E: Display, F: Future<Output = Result<T, E>>>(mut read: impl FnMut() -> F) -> Result<T, String> {
    let attempt = || {
        let read = read();
        async move {
            match tokio::time::timeout(KV_ATTEMPT, read).await {
                Ok(result) => result.map_err(|error| error.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }
    };
    retried(STREAM_PATIENCE, attempt).await
}

/// The user's read position, read again for the stream's patience if KV fails; 0 when it still
/// cannot be read (the welcome then counts from there, and a new device gets every personal message
/// the stream holds: some twice, none missed).
async fn read_position(session: &Session) -> u64 {
    let inbox = &session.shared.inbox;
    read_kv(|| inbox.read_position(&session.user)).await.unwrap_or_else(|error| {
        warn!(user = %session.user, %error, "read position unavailable");
        0
    })
}
