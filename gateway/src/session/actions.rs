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
use crate::delivery::router::Attaching;

/// How long a closing session keeps trying to note its lost messages: KV may be failing over in
/// the same failure that lost them, and a note not written is a loss the client is never told of.
const LOSS_NOTE_PATIENCE: Duration = Duration::from_secs(30);
/// How long one attempt at the note may take.
const LOSS_NOTE_ATTEMPT: Duration = Duration::from_secs(2);
/// How long a session keeps trying to read the stream's bounds for its join or a catch-up before
/// it closes (1013): the read is shared by every session reading at that moment, and a stream
/// electing a leader fails it (or answers from a stale view) for a moment.
pub(super) const BOUNDS_PATIENCE: Duration = Duration::from_secs(5);
/// The first pause between two attempts, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// The outcomes of `action`, in order.
pub(super) fn perform(session: &Arc<Session>, action: Action) -> BoxStream<'static, Outcome> {
    let session = session.clone();
    match action {
        Action::ReadBounds { at_least } => once(async move {
            let shared = &session.shared;
            let at_least = shared.router.watermark().routed().max(at_least);
            let read = || async { shared.bounds.read_at_least(at_least).await };
            let bounds = retried(BOUNDS_PATIENCE, read).await;
            Outcome::Bounds(bounds.map_err(|error| error.to_string()))
        }),
        Action::Replay { audiences, since, upto } => replay(session, audiences, since, upto),
        Action::Attach { topic } => once(async move {
            let shared = &session.shared;
            let audiences = vec![Audience::Topic(topic)];
            let attached = shared.router.attach(
                session.key,
                session.user.clone(),
                session.mailbox.clone(),
                audiences,
                Attaching::Sub,
            );
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
    let note = || async {
        let note = session.shared.cursors.mark_lost(&session.user, &session.device, first);
        match tokio::time::timeout(LOSS_NOTE_ATTEMPT, note).await {
            Ok(written) => written.map_err(|error| error.to_string()),
            Err(_) => Err("timed out".to_string()),
        }
    };
    if let Err(error) = retried(LOSS_NOTE_PATIENCE, note).await {
        warn!(user = %session.user, device = %session.device, first, error, "lost-messages note not written");
    }
}

/// `attempt`'s result, tried again after failures until it succeeds or `patience` has passed (the
/// last failure then), with pauses that double from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`],
/// jittered: sessions that failed together do not all try again at once.
pub(super) async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    patience: Duration,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = Instant::now() + patience;
    let mut pause = FIRST_PAUSE;
    loop {
        let error = match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        let pause_now = pause.mul_f64(0.5 + rand::random::<f64>());
        if Instant::now() + pause_now >= deadline {
            return Err(error);
        }
        debug!(%error, "failed; trying again");
        tokio::time::sleep(pause_now).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_attempt_is_tried_again_until_it_succeeds_or_patience_runs_out() {
        let attempts = AtomicU32::new(0);
        let third_time_lucky = || async {
            let n = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            if n < 3 { Err(format!("failure {n}")) } else { Ok(n) }
        };
        assert_eq!(retried(Duration::from_secs(5), third_time_lucky).await, Ok(3));

        attempts.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let never = || async { Err::<(), _>(format!("failure {}", attempts.fetch_add(1, Ordering::Relaxed) + 1)) };
        let failed = retried(Duration::from_secs(5), never).await.unwrap_err();
        let tried = attempts.load(Ordering::Relaxed);
        assert_eq!(failed, format!("failure {tried}"), "the last failure");
        // Pauses of 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2… s, each ±50%: 5 of them fit in 5 s at most jitter,
        // 8 at least: 6 to 9 attempts.
        assert!((6..=9).contains(&tried), "{tried} attempts");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
