//! Doing what a session's state machine asks ([`Action`]) and turning the results into
//! [`Outcome`]s, as a stream the connection's task polls alongside the socket.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use herald_shared::subject::Audience;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Session;
use super::replay::Replay;
use super::state::{Action, Outcome};
use crate::delivery::message;

/// How long a closing session keeps trying to note its lost messages: KV may be failing over in
/// the same failure that lost them, and a note not written is a loss the client is never told of.
const LOSS_NOTE_PATIENCE: Duration = Duration::from_secs(30);
/// How long one attempt at the note may take.
const LOSS_NOTE_ATTEMPT: Duration = Duration::from_secs(2);

/// The outcomes of `action`, in order.
pub(super) fn perform(session: &Arc<Session>, action: Action) -> BoxStream<'static, Outcome> {
    let session = session.clone();
    match action {
        Action::ReadBounds => once(async move {
            let shared = &session.shared;
            let bounds = shared.bounds.read_at_least(shared.router.watermark().get()).await;
            Outcome::Bounds(bounds.map_err(|error| error.to_string()))
        }),
        Action::Replay { audiences, since, upto } => replay(session, audiences, since, upto),
        Action::Attach { topic } => once(async move {
            let shared = &session.shared;
            let audiences = vec![Audience::Topic(topic)];
            let attached = shared.router.attach(session.key, session.user.clone(), session.mailbox.clone(), audiences);
            Outcome::Attached(match attached.await {
                Ok(mut attached) => attached.logs.pop().ok_or_else(|| "no topic log".to_string()),
                Err(error) => Err(error.to_string()),
            })
        }),
        Action::Flush => once(async move {
            if let Err(error) = session.shared.feed.flush().await {
                warn!(user = %session.user, %error, "subscription not confirmed by NATS yet");
            }
            Outcome::Flushed
        }),
        Action::Detach { topic } => once(async move {
            session.shared.router.detach(session.key, vec![Audience::Topic(topic)], false).await;
            Outcome::Detached
        }),
        Action::FindStored { audience, from } => once(async move {
            let found = session.shared.inbox.first_stored(&audience, from).await;
            Outcome::Stored(found.map_err(|error| error.to_string()))
        }),
        Action::NoteLost { first } => once(async move {
            // A task of its own, which the gateway's drain waits for: the note is written even if
            // the connection ends meanwhile (the client leaves, the gateway stops), since the
            // client's next resume, wherever it lands, must be told.
            let killed = session.shared.killed.clone();
            let note = note_lost(session.clone(), first);
            // A gateway killed stops at once, as it would crash.
            let note = session.shared.sessions.spawn(async move {
                tokio::select! {
                    _ = note => {}
                    _ = killed.cancelled() => {}
                }
            });
            let _ = note.await;
            Outcome::Noted
        }),
    }
}

/// Notes in KV that the session's device missed messages from `first` on, retrying until it is
/// written or [`LOSS_NOTE_PATIENCE`] has passed.
async fn note_lost(session: Arc<Session>, first: u64) {
    let deadline = Instant::now() + LOSS_NOTE_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        let note = session.shared.cursors.mark_lost(&session.user, &session.device, first);
        let error = match tokio::time::timeout(LOSS_NOTE_ATTEMPT, note).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() + pause >= deadline {
            warn!(user = %session.user, device = %session.device, first, error, "lost-messages note not written");
            return;
        }
        debug!(user = %session.user, device = %session.device, first, error, "lost-messages note failed; retrying");
        // Jittered: the sessions of a gateway that lost KV all retry, and not all at once.
        tokio::time::sleep(pause.mul_f64(0.5 + rand::random::<f64>())).await;
        pause = (pause * 2).min(LOSS_NOTE_ATTEMPT);
    }
}

fn once(future: impl Future<Output = Outcome> + Send + 'static) -> BoxStream<'static, Outcome> {
    stream::once(future).boxed()
}

/// Where a replay is.
enum Reading {
    Starting { session: Arc<Session>, audiences: Vec<Audience>, since: u64, upto: u64 },
    Open(Replay),
    Done,
}

/// The stored messages of `audiences` in `(since, upto]`, then how the replay ended.
fn replay(session: Arc<Session>, audiences: Vec<Audience>, since: u64, upto: u64) -> BoxStream<'static, Outcome> {
    let start = Reading::Starting { session, audiences, since, upto };
    stream::unfold(start, |reading| async move {
        let mut replay = match reading {
            Reading::Done => return None,
            Reading::Open(replay) => replay,
            Reading::Starting { session, audiences, since, upto } => {
                match session.shared.replayer.open(&audiences, since, upto).await {
                    Ok(replay) => replay,
                    Err(error) => return Some((Outcome::ReplayEnded(Err(error.to_string())), Reading::Done)),
                }
            }
        };
        Some(match replay.next().await {
            Some(Ok(stored)) => (Outcome::Replayed(Box::new(message::from_stored(stored))), Reading::Open(replay)),
            Some(Err(error)) => (Outcome::ReplayEnded(Err(error.to_string())), Reading::Done),
            None => (Outcome::ReplayEnded(Ok(())), Reading::Done),
        })
    })
    .boxed()
}
