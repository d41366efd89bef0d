//! Joining what the stream holds to live delivery, without a gap or a duplicate.
//!
//! Every join has the same shape: live frames are held (the outbox starts on hold; later joins
//! hold it again), the subscriptions exist before the stream's last sequence `L` is read (on the
//! same NATS connection, so anything stored after `L` arrives live), the stored messages in
//! `(since, L]` are replayed in order, and then the held live frames newer than what was replayed
//! are released.

use bytes::Bytes;
use herald_shared::frame::{ServerFrame, close_code, error_code};
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::subject::Audience;
use tracing::warn;

use super::{Session, TopicRequest};
use crate::delivery::message;
use crate::delivery::outbox::Close;
use crate::session::bounds::Bounds;
use crate::session::replay::{self, Replay};

/// Subscribes, sends `welcome`, replays what the connection missed and opens live delivery.
pub(super) async fn open(session: &Session) -> Result<(), Close> {
    let shared = &session.shared;
    let attached = shared
        .dispatcher
        .attach(session.entry.clone(), session.audiences())
        .await
        .map_err(|e| Close::new(1011, e.to_string()))?;
    // Each step is boxed: KV futures are large, and a burst of connects holds one per session.
    if attached.first_of_user {
        Box::pin(shared.prefs.load(&shared.dispatcher, session.user.clone())).await;
    }
    Box::pin(shared.policies.claim(&session.user, &session.device, &session.conn, session.entry.outbox.clone())).await;
    let bounds = read_bounds(session).await?;
    session.entry.replay_reads_through(bounds.last);
    let resume = Box::pin(resume_point(session)).await;
    if let Resume::NewDevice = resume {
        // The device's cursor starts here, before the welcome: a reconnect without `since`, even
        // before any ack, then replays what the device missed meanwhile.
        Box::pin(session.shared.cursors.start_device(&session.user, &session.device, bounds.last)).await;
    }
    session.send(&ServerFrame::Welcome {
        conn: session.conn.clone(),
        user: session.user.to_string(),
        device: session.device.clone(),
        node: shared.config.node_id.clone(),
        seq: bounds.last,
        heartbeat: shared.config.heartbeat.as_secs(),
    });
    match resume {
        Resume::Since(requested) => {
            // A client ahead of the stream (a replaced stream, a bogus `since`) gets what comes next.
            let since = requested.min(bounds.last);
            let audiences = session.audiences();
            let (report, lost) = tokio::join!(
                Box::pin(replay(session, &audiences, since, bounds, Order::InOrder)),
                Box::pin(session.shared.cursors.take_lost(&session.user, &session.device)),
            );
            let mut report = report?;
            let lost = lost.unwrap_or_else(|error| {
                warn!(user = %session.user, %error, "lost-messages note unreadable");
                None
            });
            // Messages the previous connection missed before `since` are not in this replay.
            report.complete &= requested <= bounds.last && lost.is_none_or(|first| first > since);
            // The client has everything up to `since`: a held live duplicate of it is dropped.
            session.outbox().advance_to(since);
            session.outbox().complete_through(bounds.last);
            session.send(&report.frame(since, None));
        }
        Resume::NewDevice | Resume::Live => {
            session.outbox().advance_to(bounds.last);
            session.outbox().complete_through(bounds.last);
        }
    }
    // Live frames held since the attach came before the user's muted kinds were known.
    let muted = shared.dispatcher.muted(session.user.clone()).await;
    session.outbox().release(Vec::new(), &muted);
    session.entry.replay_done();
    Ok(())
}

/// Where a connection starts.
enum Resume {
    /// Replay from here (`since` from the query, or the device's cursor).
    Since(u64),
    /// A device seen for the first time: live.
    NewDevice,
    /// The cursor could not be read: live.
    Live,
}

async fn resume_point(session: &Session) -> Resume {
    if let Some(since) = session.request.since {
        return Resume::Since(since);
    }
    match session.shared.cursors.load(&session.user, &session.device).await {
        Ok(Some(cursor)) => Resume::Since(cursor),
        Ok(None) => Resume::NewDevice,
        Err(error) => {
            warn!(user = %session.user, %error, "cursor unavailable: starting live");
            Resume::Live
        }
    }
}

/// The dispatcher found that messages may not have reached this gateway (and put the session on
/// hold): replay from the last `seq` sent. If some of them are gone from the stream, the client is
/// told the honest way: a 4008 close, and its resume reports `complete: false`.
pub(super) async fn repair(session: &Session) -> Result<(), Close> {
    session.entry.repair_started();
    if let Some(first) = session.entry.take_lost() {
        return Err(close_after_loss(session, first).await);
    }
    let since = session.outbox().last_seq();
    let bounds = read_bounds(session).await?;
    session.entry.replay_reads_through(bounds.last);
    let report = replay(session, &session.audiences(), since, bounds, Order::InOrder).await?;
    if !report.complete {
        return Err(Close::new(close_code::SLOW_CONSUMER, "messages missed: reconnect with since"));
    }
    session.outbox().complete_through(bounds.last);
    session.outbox().release(Vec::new(), &[]);
    session.entry.replay_done();
    Ok(())
}

/// Messages from `first` on were missed behind newer ones: they cannot be delivered in order any
/// more. A note in KV makes the client's resume (on any gateway) report `complete: false`.
async fn close_after_loss(session: &Session, first: u64) -> Close {
    let shared = &session.shared;
    let noted =
        tokio::time::timeout(LOSS_NOTE_TIMEOUT, shared.cursors.mark_lost(&session.user, &session.device, first));
    if !matches!(noted.await, Ok(Ok(()))) {
        warn!(user = %session.user, device = %session.device, first, "lost-messages note not written");
    }
    Close::new(close_code::SLOW_CONSUMER, "messages missed: reconnect with since")
}

/// How long a closing session waits to note its lost messages.
const LOSS_NOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs one `sub` or `unsub`; refusals are `error` frames, the connection stays.
pub(super) async fn topic_request(session: &Session, request: TopicRequest) -> Result<(), Close> {
    match request {
        TopicRequest::Subscribe { topic, since } => subscribe(session, topic, since).await,
        TopicRequest::Unsubscribe { topic } => {
            let removed = session.topics.lock().unwrap_or_else(|p| p.into_inner()).remove(&topic);
            if removed {
                session.shared.dispatcher.detach(session.entry.key, vec![Audience::Topic(topic.clone())], false).await;
            }
            session.send(&ServerFrame::Unsubscribed { topic });
            Ok(())
        }
    }
}

async fn subscribe(session: &Session, topic: String, since: Option<u64>) -> Result<(), Close> {
    if let Err(e) = check_id(IdKind::Topic, &topic) {
        session.send(&ServerFrame::topic_error(error_code::BAD_REQUEST, e.to_string(), &topic));
        return Ok(());
    }
    if !topic_allowed(&session.request.claims.topics, &topic) {
        let message = format!("the token does not allow topic {topic}");
        session.send(&ServerFrame::topic_error(error_code::FORBIDDEN, message, &topic));
        return Ok(());
    }
    let known = session.topics.lock().unwrap_or_else(|p| p.into_inner()).contains(&topic);
    if !known && session.topics.lock().unwrap_or_else(|p| p.into_inner()).len() >= session.shared.config.max_topics {
        let limit = session.shared.config.max_topics;
        let message = format!("at most {limit} topics per connection");
        session.send(&ServerFrame::topic_error(error_code::BAD_REQUEST, message, &topic));
        return Ok(());
    }
    if since.is_some() {
        session.outbox().hold();
    }
    let audience = Audience::Topic(topic.clone());
    let attached = session.shared.dispatcher.attach(session.entry.clone(), vec![audience.clone()]).await;
    if let Err(e) = attached {
        if since.is_some() {
            session.outbox().release(Vec::new(), &[]);
        }
        session.send(&ServerFrame::topic_error(error_code::UNAVAILABLE, e.to_string(), &topic));
        return Ok(());
    }
    session.topics.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.clone());
    if since.is_none() {
        // `subscribed` promises live delivery: the subscription must be on the server first. (With
        // `since`, reading the stream's bounds below does the same.) If the feed is down, its
        // reconnection re-subscribes and repairs the connection, topic included.
        if let Err(error) = session.shared.feed.flush().await {
            warn!(user = %session.user, %topic, %error, "topic subscription not confirmed by NATS yet");
        }
    }
    session.send(&ServerFrame::Subscribed { topic: topic.clone() });
    let Some(requested) = since else { return Ok(()) };
    let bounds = read_bounds(session).await?;
    let since = requested.min(bounds.last);
    let live_position = session.outbox().last_seq();
    let mut report = replay(session, &[audience], since, bounds, Order::TopicBlock { live_position }).await?;
    report.complete &= requested <= bounds.last;
    session.send(&report.frame(since, Some(topic)));
    session.outbox().release(report.newer, &[]);
    Ok(())
}

async fn read_bounds(session: &Session) -> Result<Bounds, Close> {
    // On the delivery connection, after the session's subscriptions: the server has them before
    // it answers.
    session.shared.bounds.read().await.map_err(|e| Close::new(1013, e.to_string()))
}

/// Where replayed frames go.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Into the queue in `seq` order (the connection has nothing newer).
    InOrder,
    /// A topic joined later: frames at or below the connection's live position go out now as a
    /// block of their own; newer ones are merged with the held live frames at release.
    TopicBlock { live_position: u64 },
}

/// What a replay did.
struct Report {
    sent: u64,
    last: Option<u64>,
    complete: bool,
    /// Frames newer than the live position (topic joins only), for the release.
    newer: Vec<(u64, Bytes)>,
}

impl Report {
    fn frame(&self, since: u64, topic: Option<String>) -> ServerFrame {
        ServerFrame::Replayed {
            from: since + 1,
            to: self.last.unwrap_or(since),
            count: self.sent,
            complete: self.complete,
            topic,
        }
    }
}

/// Replays `audiences` over `(since, bounds.last]`, skipping the user's muted kinds.
async fn replay(
    session: &Session,
    audiences: &[Audience],
    since: u64,
    bounds: Bounds,
    order: Order,
) -> Result<Report, Close> {
    let shared = &session.shared;
    let config = &shared.config;
    shared.metrics.replays.inc();
    let muted = shared.dispatcher.muted(session.user.clone()).await;
    let mut reader = Replay::start(
        &shared.js,
        &shared.client,
        config.replay_method,
        audiences,
        since,
        bounds.last,
        config.replay_batch,
    )
    .await
    .map_err(unavailable)?;
    let mut per_subject = vec![0u64; audiences.len()];
    let mut report = Report { sent: 0, last: None, complete: true, newer: Vec::new() };
    while let Some(stored) = reader.next().await {
        let stored = stored.map_err(unavailable)?;
        if let Some(index) = audiences.iter().position(|a| *a == stored.audience) {
            per_subject[index] += 1;
        }
        if muted.iter().any(|kind| kind == replay::kind(&stored)) {
            continue;
        }
        let frame = message::from_stored(&stored).frame;
        let pushed = match order {
            Order::InOrder => session.outbox().push_replayed(stored.seq, frame).await,
            Order::TopicBlock { live_position } if stored.seq <= live_position => {
                session.outbox().push_out_of_order(frame).await
            }
            Order::TopicBlock { .. } => {
                report.newer.push((stored.seq, frame));
                Ok(())
            }
        };
        pushed.map_err(|_| session.outbox().close_reason().unwrap_or_else(|| Close::new(1011, "closed")))?;
        report.sent += 1;
        report.last = Some(stored.seq);
    }
    shared.metrics.replayed_messages.inc_by(report.sent);
    report.complete = replay::complete(bounds.first, since, config.stream.stream_max_msgs_per_subject, &per_subject);
    if !report.complete {
        shared.metrics.replays_incomplete.inc();
    }
    Ok(report)
}

fn unavailable(error: replay::ReplayError) -> Close {
    Close::new(1013, error.to_string())
}
