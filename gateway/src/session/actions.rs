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
use super::replay::{Replay, Stored};
use super::state::{Action, Outcome};
use crate::cluster::events::publish_device_lost;
use crate::delivery::leader::message_get;
use crate::delivery::message;

/// How long a closing session keeps trying to note its lost messages: KV may be failing over in
/// the same failure that lost them, and a note not written is a loss the client is never told of.
const LOSS_NOTE_PATIENCE: Duration = Duration::from_secs(30);
/// How long one attempt at the note may take.
const LOSS_NOTE_ATTEMPT: Duration = Duration::from_secs(2);
/// How long a session keeps trying a read of the stream (its bounds for a join or a catch-up, a
/// replay, a loss check) before it gives up: a stream electing a leader fails reads (or answers
/// from a stale view) for a moment.
pub(super) const STREAM_PATIENCE: Duration = Duration::from_secs(5);
/// How long a session keeps asking the stream's leader whether a missing message is stored before
/// it assumes the loss: a loss reported for nothing has the client reload its state, while waiting
/// holds only this connection's live messages (a repair sends them in order afterwards). A stream
/// whose cluster heals from a partition may go without a leader for longer than [`STREAM_PATIENCE`].
/// A gateway that stops cuts it halfway through its shutdown grace (`Shared::checks_cut`).
const LOSS_CHECK_PATIENCE: Duration = Duration::from_secs(30);
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
            let bounds = retried(STREAM_PATIENCE, read).await;
            Outcome::Bounds(bounds.map_err(|error| error.to_string()))
        }),
        Action::Replay { audiences, since, upto } => replay(session, audiences, since, upto),
        Action::Attach { topic, attaching } => once(async move {
            let shared = &session.shared;
            let audiences = vec![Audience::Topic(topic)];
            let attached =
                shared.router.attach(session.key, session.user.clone(), session.mailbox.clone(), audiences, attaching);
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
            // On the feed, which leaves a server cut off from the stream (see `delivery::reach`).
            let query = serde_json::json!({ "seq": from, "next_by_subj": audience.push_subject() });
            let find = || message_get(&session.shared.feed, query.clone());
            tokio::select! {
                found = retried(LOSS_CHECK_PATIENCE, find) => Outcome::Stored(found),
                () = session.shared.checks_cut.cancelled() => {
                    Outcome::Stored(Err("the gateway is stopping before the stream answered".to_string()))
                }
            }
        }),
        Action::RememberTopics { topics } => once(async move {
            let shared = &session.shared;
            if let Err(error) = shared.socketio_states.write(&session.user, &session.device, topics).await {
                warn!(user = %session.user, %error, "topics not kept: a recovery will not find them");
            }
            Outcome::Remembered
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
                    biased;
                    _ = killed.cancelled() => {}
                    _ = note => {}
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
    match retried(LOSS_NOTE_PATIENCE, note).await {
        // Another socket of the device (a client that came back while the gateway looked for the
        // loss or waited for KV, on any gateway) may have resumed before the note and reported its
        // replay complete: told, it closes with 4008 so that its next resume reports the loss.
        Ok(note) => publish_device_lost(&session.shared.client, &session.who(), note).await,
        Err(error) => {
            warn!(user = %session.user, device = %session.device, first, error, "lost-messages note not written")
        }
    }
}

/// `attempt`'s result, tried again after failures until it succeeds or `patience` from the first
/// failure has passed (the last failure then), with pauses that double from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`],
/// jittered: sessions that failed together do not all try again at once.
pub(super) async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    patience: Duration,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    let mut failing: Option<Patience> = None;
    loop {
        let error = match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        debug!(%error, "failed; trying again");
        if !failing.get_or_insert_with(|| Patience::new(patience)).pause().await {
            return Err(error);
        }
    }
}

/// The pauses between attempts at something that fails for a moment at times, until `patience`
/// from the first failure has passed.
struct Patience {
    deadline: Instant,
    next: Duration,
}

impl Patience {
    fn new(patience: Duration) -> Patience {
        Patience { deadline: Instant::now() + patience, next: FIRST_PAUSE }
    }

    /// Waits before the next attempt; false, at once, when it would end past the patience.
    async fn pause(&mut self) -> bool {
        let pause = self.next.mul_f64(0.5 + rand::random::<f64>());
        if Instant::now() + pause >= self.deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        true
    }
}

fn once(future: impl Future<Output = Outcome> + Send + 'static) -> BoxStream<'static, Outcome> {
    stream::once(future).boxed()
}

/// Where a replay is: it reads `(since, upto]`, `since` moving up with each message read, so that
/// a replay the stream fails (a leader election) opens again where it stopped.
struct Reading {
    session: Arc<Session>,
    audiences: Vec<Audience>,
    since: u64,
    upto: u64,
    open: Option<Replay>,
    /// [`Replay::held_ahead`] of the replays opened before the one open, the most of each.
    held_ahead: Vec<u64>,
    /// [`Replay::held_ahead_sum`] of the open replay when it was last told.
    told: u64,
    /// A message read, to go out once what the replay learned with it was told.
    next: Option<Stored>,
    /// Since the first of the failures in a row, if any.
    failing: Option<Patience>,
}

impl Reading {
    /// Closes the open replay, keeping what it saw ahead of it.
    fn close(&mut self) {
        if let Some(replay) = self.open.take() {
            self.keep(&replay.held_ahead());
        }
        self.told = 0;
    }

    fn keep(&mut self, seen: &[u64]) {
        self.held_ahead.resize(seen.len().max(self.held_ahead.len()), 0);
        for (kept, seen) in self.held_ahead.iter_mut().zip(seen) {
            *kept = (*kept).max(*seen);
        }
    }

    /// What the open replay learned of the messages held ahead of it, with the kept ones, if it
    /// learned something since it was last told (a batch's first reply says it: rarely).
    fn news_ahead(&mut self) -> Option<Vec<u64>> {
        let replay = self.open.as_ref()?;
        let sum = replay.held_ahead_sum();
        if sum == self.told {
            return None;
        }
        self.told = sum;
        let mut seen = self.held_ahead.clone();
        let open = replay.held_ahead();
        seen.resize(open.len().max(seen.len()), 0);
        for (kept, open) in seen.iter_mut().zip(open) {
            *kept = (*kept).max(open);
        }
        Some(seen)
    }
}

/// The stored messages of `audiences` in `(since, upto]`, then how the replay ended. A failure is
/// tried again from the last message read, with the patience of a bounds read.
fn replay(session: Arc<Session>, audiences: Vec<Audience>, since: u64, upto: u64) -> BoxStream<'static, Outcome> {
    let start = Reading {
        session,
        audiences,
        since,
        upto,
        open: None,
        held_ahead: Vec::new(),
        told: 0,
        next: None,
        failing: None,
    };
    stream::unfold(Some(start), |reading| async move {
        let mut reading = reading?;
        if let Some(stored) = reading.next.take() {
            return Some((Outcome::Replayed(Box::new(message::from_stored(stored))), Some(reading)));
        }
        loop {
            let read = match reading.open.as_mut() {
                Some(replay) => replay.next().await,
                None => {
                    match reading.session.shared.replayer.open(&reading.audiences, reading.since, reading.upto).await {
                        Ok(replay) => {
                            reading.open = Some(replay);
                            continue;
                        }
                        Err(error) => Some(Err(error)),
                    }
                }
            };
            match read {
                Some(Ok(stored)) => {
                    reading.since = stored.seq;
                    reading.failing = None;
                    // Told before the message: a connection that ends after it can tell whether
                    // the client got messages past some the stream's limits removed.
                    if let Some(seen) = reading.news_ahead() {
                        reading.next = Some(stored);
                        return Some((Outcome::HeldAhead(seen), Some(reading)));
                    }
                    return Some((Outcome::Replayed(Box::new(message::from_stored(stored))), Some(reading)));
                }
                None => {
                    reading.close();
                    return Some((Outcome::ReplayEnded(Ok(reading.held_ahead)), None));
                }
                Some(Err(error)) => {
                    reading.close();
                    let failing = reading.failing.get_or_insert_with(|| Patience::new(STREAM_PATIENCE));
                    debug!(%error, since = reading.since, "replay failed; opening it again");
                    if !failing.pause().await {
                        return Some((Outcome::ReplayEnded(Err(error.to_string())), None));
                    }
                    reading.session.shared.metrics.replays_reopened.inc();
                }
            }
        }
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
