//! One socket's outbound queue: bounded in bytes, fed by the dispatcher (live messages), by the
//! session (control frames, replay) and drained by the socket's single writer.
//!
//! It also holds the two rules that make delivery exact for one connection:
//! - `msg` frames leave in increasing `seq`: a live frame whose `seq` is not above the last one
//!   queued is a duplicate and is dropped;
//! - while a replay is joined to live delivery, live frames are held behind a gate and released
//!   after the replay, without those the replay already sent. Holds nest: the gate opens when the
//!   last holder releases (a repair and a topic replay may overlap). Held frames keep their kind,
//!   so that those of a kind muted meanwhile are dropped at release (a user's muted kinds load
//!   while the first session joins).
//!
//! A full queue never blocks the dispatcher: it closes the connection with 4008 (the client resumes
//! with `since` and loses nothing). A frame counts for at most half the limit: a message bigger
//! than the limit must not close every connection it is sent to, again at each resume, and a
//! queue still holds at most the limit plus two such frames. The lock is never held across an
//! await.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use herald_shared::frame::close_code;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why and how a connection ends: the close code and reason sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

impl Close {
    pub(crate) fn new(code: u16, reason: impl Into<String>) -> Close {
        Close { code, reason: reason.into() }
    }
}

/// The socket is closing; nothing more can be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when the queue goes from empty to non-empty, or on close.
    writer: Notify,
    /// Wakes replays waiting for room after the writer drained a batch.
    room: Notify,
    /// Cancelled once the outbox is closed, for everyone who waits on the connection.
    closed: CancellationToken,
    /// The most bytes the queue (plus the gate) may hold, each frame counted by [`Outbox::cost`].
    limit: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// The cost of the queued frames (their bytes, but at most half the limit each).
    queued_bytes: usize,
    /// The highest `seq` queued: the connection's resume point as far as this gateway knows.
    last_seq: u64,
    /// Everything addressed to the connection up to here has been queued (or was the client's
    /// already): set by each replay that read the stream up to this point.
    complete_through: u64,
    /// How many replays hold the gate; live frames go straight to the queue only at 0.
    holds: u32,
    /// Live frames (and replayed frames newer than the live position) held meanwhile.
    held: Vec<Held>,
    held_bytes: usize,
    close: Option<Close>,
}

/// A frame behind the gate.
struct Held {
    seq: u64,
    frame: Bytes,
    /// The message's kind when the frame was live and had one (replayed frames were filtered).
    kind: Option<Box<str>>,
}

impl Outbox {
    /// An outbox holding at most `limit` bytes, with its gate closed: live frames are held until
    /// [`Outbox::release`], so that `welcome` (and any replay) go first.
    pub(crate) fn new(limit: usize) -> Outbox {
        let state = State { holds: 1, ..State::default() };
        Outbox {
            state: Mutex::new(state),
            writer: Notify::new(),
            room: Notify::new(),
            closed: CancellationToken::new(),
            limit,
        }
    }

    /// Queues a live `msg` frame; called by the dispatcher, never blocks. Returns whether the writer
    /// must be woken ([`Outbox::wake_writer`]): the dispatcher wakes writers once per burst of
    /// messages, so that a busy socket's writer finds several frames to send in one write.
    #[must_use]
    pub(crate) fn push_live(&self, seq: u64, frame: &Bytes, kind: &str) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        if state.holds > 0 {
            let kind = (!kind.is_empty()).then(|| kind.into());
            state.held.push(Held { seq, frame: frame.clone(), kind });
            state.held_bytes += self.cost(frame);
            if state.held_bytes + state.queued_bytes > self.limit {
                drop(state);
                self.slow_consumer();
            }
            return false;
        }
        if seq <= state.last_seq {
            return false;
        }
        state.last_seq = seq;
        let was_empty = state.queue.is_empty();
        state.queued_bytes += self.cost(frame);
        state.queue.push_back(frame.clone());
        if state.queued_bytes > self.limit {
            drop(state);
            self.slow_consumer();
            return false;
        }
        was_empty
    }

    /// Wakes the writer after [`Outbox::push_live`] asked for it.
    pub(crate) fn wake_writer(&self) {
        self.writer.notify_one();
    }

    /// Queues a control frame (welcome, pong, error, results); counts toward the limit.
    pub(crate) fn push_control(&self, frame: Bytes) {
        let state = self.lock();
        if state.close.is_none() {
            self.enqueue(state, frame);
        }
    }

    /// Queues a replayed `msg` frame, waiting for room instead of overflowing, in `seq` order.
    pub(crate) async fn push_replayed(&self, seq: u64, frame: Bytes) -> Result<(), Closed> {
        self.push_waiting(Some(seq), frame).await
    }

    /// Queues a frame outside the `seq` order (a topic's replay of older messages), waiting for room.
    pub(crate) async fn push_out_of_order(&self, frame: Bytes) -> Result<(), Closed> {
        self.push_waiting(None, frame).await
    }

    async fn push_waiting(&self, seq: Option<u64>, frame: Bytes) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if state.close.is_some() {
                    return Err(Closed);
                }
                if state.queued_bytes < self.limit / 2 {
                    if let Some(seq) = seq {
                        if seq <= state.last_seq {
                            return Ok(());
                        }
                        state.last_seq = seq;
                    }
                    self.enqueue(state, frame);
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Holds live frames behind the gate from now on (a replay is about to run); pair with
    /// [`Outbox::release`].
    pub(crate) fn hold(&self) {
        self.lock().holds += 1;
    }

    /// Ends one hold, adding `extra` (replayed frames newer than the live position) to the held
    /// frames and dropping held live frames of a `muted` kind. When no hold remains, the held
    /// frames, in `seq` order without duplicates, go to the queue if newer than the last one queued.
    pub(crate) fn release(&self, extra: Vec<(u64, Bytes)>, muted: &[String]) {
        let mut state = self.lock();
        if state.close.is_some() {
            return;
        }
        if !muted.is_empty() {
            let is_muted = |held: &Held| held.kind.as_deref().is_some_and(|kind| muted.iter().any(|m| m == kind));
            state.held.retain(|held| !is_muted(held));
            state.held_bytes = state.held.iter().map(|held| self.cost(&held.frame)).sum();
        }
        state.held_bytes += extra.iter().map(|(_, frame)| self.cost(frame)).sum::<usize>();
        state.held.extend(extra.into_iter().map(|(seq, frame)| Held { seq, frame, kind: None }));
        state.holds = state.holds.saturating_sub(1);
        if state.holds > 0 {
            return;
        }
        let mut held = std::mem::take(&mut state.held);
        state.held_bytes = 0;
        held.sort_by_key(|held| held.seq);
        held.dedup_by_key(|held| held.seq);
        let mut woke = false;
        for Held { seq, frame, .. } in held {
            if seq > state.last_seq {
                state.last_seq = seq;
                state.queued_bytes += self.cost(&frame);
                woke |= state.queue.is_empty();
                state.queue.push_back(frame);
            }
        }
        let overflow = state.queued_bytes > self.limit;
        drop(state);
        if woke {
            self.writer.notify_one();
        }
        if overflow {
            self.slow_consumer();
        }
    }

    /// The highest `seq` queued so far.
    pub(crate) fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Treats everything up to `seq` as sent (the client already has it).
    pub(crate) fn advance_to(&self, seq: u64) {
        let mut state = self.lock();
        state.last_seq = state.last_seq.max(seq);
    }

    /// Records that nothing addressed to the connection up to `seq` is missing (a replay covered it).
    pub(crate) fn complete_through(&self, seq: u64) {
        let mut state = self.lock();
        state.complete_through = state.complete_through.max(seq);
    }

    /// `(last_seq, complete_through)`, read together.
    pub(crate) fn positions(&self) -> (u64, u64) {
        let state = self.lock();
        (state.last_seq, state.complete_through)
    }

    /// Starts closing with `close` unless already closing; the first reason wins. Queued frames are
    /// dropped: the client resumes from the last `seq` it received.
    pub(crate) fn close(&self, close: Close) {
        {
            let mut state = self.lock();
            if state.close.is_some() {
                return;
            }
            state.close = Some(close);
            state.queue.clear();
            state.queued_bytes = 0;
            state.held = Vec::new();
            state.held_bytes = 0;
        }
        self.closed.cancel();
        self.writer.notify_one();
        self.room.notify_waiters();
    }

    /// Resolves once the outbox is closing.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// The close reason, once closing.
    pub(crate) fn close_reason(&self) -> Option<Close> {
        self.lock().close.clone()
    }

    /// For the writer: waits for frames and moves up to `max_frames` of them (and roughly
    /// `max_bytes`) into `batch`; returns the close to send once closing and nothing is left.
    pub(crate) async fn next_batch(
        &self,
        batch: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> Option<Close> {
        loop {
            {
                let mut state = self.lock();
                if !state.queue.is_empty() {
                    let (mut bytes, mut frames, mut cost) = (0, 0, 0);
                    while bytes < max_bytes && frames < max_frames {
                        frames += 1;
                        let Some(frame) = state.queue.pop_front() else { break };
                        bytes += frame.len();
                        cost += self.cost(&frame);
                        batch.push(frame);
                    }
                    state.queued_bytes -= cost;
                    let roomy = state.queued_bytes < self.limit / 2;
                    drop(state);
                    if roomy {
                        self.room.notify_waiters();
                    }
                    return None;
                }
                if let Some(close) = &state.close {
                    return Some(close.clone());
                }
            }
            self.writer.notified().await;
        }
    }

    fn enqueue(&self, mut state: std::sync::MutexGuard<'_, State>, frame: Bytes) {
        let was_empty = state.queue.is_empty();
        state.queued_bytes += self.cost(&frame);
        state.queue.push_back(frame);
        let overflow = state.queued_bytes > self.limit;
        drop(state);
        if overflow {
            self.slow_consumer();
        } else if was_empty {
            self.writer.notify_one();
        }
    }

    /// What `frame` counts toward the limit.
    fn cost(&self, frame: &Bytes) -> usize {
        frame.len().min(self.limit / 2)
    }

    fn slow_consumer(&self) {
        self.close(Close::new(close_code::SLOW_CONSUMER, "slow consumer: reconnect with since"));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a harmful way.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    async fn drain(outbox: &Outbox) -> Vec<Bytes> {
        let mut batch = Vec::new();
        assert_eq!(outbox.next_batch(&mut batch, 1000, usize::MAX).await, None);
        batch
    }

    #[tokio::test]
    async fn a_live_frame_asks_for_the_writer_only_when_the_queue_was_empty() {
        let outbox = Outbox::new(1 << 20);
        // Held behind the gate: nothing to send yet.
        assert!(!outbox.push_live(1, &frame("m1"), ""));
        outbox.release(Vec::new(), &[]);
        assert_eq!(drain(&outbox).await, vec![frame("m1")]);
        assert!(outbox.push_live(2, &frame("m2"), ""), "the first frame of a burst wakes the writer");
        assert!(!outbox.push_live(3, &frame("m3"), ""), "the writer will find this one with the first");
        assert!(!outbox.push_live(3, &frame("dup3"), ""), "a duplicate is not queued");
        assert_eq!(drain(&outbox).await, vec![frame("m2"), frame("m3")]);
        assert!(outbox.push_live(4, &frame("m4"), ""));
    }

    #[tokio::test]
    async fn holds_live_frames_until_released_and_drops_what_replay_sent() {
        let outbox = Outbox::new(1 << 20);
        outbox.push_control(frame("welcome"));
        let _ = outbox.push_live(5, &frame("m5"), "");
        let _ = outbox.push_live(7, &frame("m7"), "");
        outbox.push_replayed(4, frame("r4")).await.unwrap();
        outbox.push_replayed(5, frame("r5")).await.unwrap();
        outbox.push_control(frame("replayed"));
        outbox.release(Vec::new(), &[]);
        let _ = outbox.push_live(7, &frame("dup7"), "");
        let _ = outbox.push_live(9, &frame("m9"), "");
        let sent: Vec<_> = drain(&outbox).await;
        assert_eq!(sent, vec![frame("welcome"), frame("r4"), frame("r5"), frame("replayed"), frame("m7"), frame("m9")]);
        assert_eq!(outbox.last_seq(), 9);
    }

    #[tokio::test]
    async fn release_merges_extra_frames_in_order() {
        let outbox = Outbox::new(1 << 20);
        outbox.release(Vec::new(), &[]);
        let _ = outbox.push_live(10, &frame("m10"), "");
        outbox.hold();
        let _ = outbox.push_live(14, &frame("m14"), "");
        let _ = outbox.push_live(12, &frame("t12"), "");
        outbox.release(vec![(12, frame("t12")), (11, frame("t11")), (9, frame("old9"))], &[]);
        assert_eq!(drain(&outbox).await, vec![frame("m10"), frame("t11"), frame("t12"), frame("m14")]);
    }

    #[tokio::test]
    async fn held_frames_of_a_kind_muted_meanwhile_are_dropped_at_release() {
        let outbox = Outbox::new(1 << 20);
        outbox.hold();
        let _ = outbox.push_live(1, &frame("ad1"), "marketing");
        let _ = outbox.push_live(2, &frame("mail2"), "mail");
        let _ = outbox.push_live(3, &frame("plain3"), "");
        let muted = ["marketing".to_string()];
        // The first release leaves a hold: the ad is dropped already, the rest stays held.
        outbox.release(Vec::new(), &muted);
        let _ = outbox.push_live(4, &frame("ad4"), "marketing");
        outbox.release(vec![(5, frame("r5"))], &[]);
        assert_eq!(drain(&outbox).await, vec![frame("mail2"), frame("plain3"), frame("ad4"), frame("r5")]);
    }

    #[tokio::test]
    async fn nested_holds_open_the_gate_at_the_last_release() {
        let outbox = Outbox::new(1 << 20);
        outbox.release(Vec::new(), &[]);
        outbox.hold();
        outbox.hold();
        let _ = outbox.push_live(3, &frame("m3"), "");
        outbox.release(vec![(2, frame("t2"))], &[]);
        let _ = outbox.push_live(4, &frame("m4"), "");
        outbox.push_control(frame("ctl"));
        assert_eq!(drain(&outbox).await, vec![frame("ctl")]);
        outbox.advance_to(2);
        outbox.release(Vec::new(), &[]);
        assert_eq!(drain(&outbox).await, vec![frame("m3"), frame("m4")]);
    }

    #[tokio::test]
    async fn overflow_closes_with_4008_and_frees_the_queue() {
        let outbox = Outbox::new(10);
        outbox.release(Vec::new(), &[]);
        let _ = outbox.push_live(1, &frame("1234"), "");
        let _ = outbox.push_live(2, &frame("1234"), "");
        assert!(outbox.close_reason().is_none());
        let _ = outbox.push_live(3, &frame("123"), "");
        assert!(outbox.close_reason().is_some());
        let mut batch = Vec::new();
        let close = outbox.next_batch(&mut batch, 10, 100).await;
        assert!(batch.is_empty());
        assert_eq!(close.map(|c| c.code), Some(close_code::SLOW_CONSUMER));
        let _ = outbox.push_live(4, &frame("late"), "");
        assert_eq!(outbox.next_batch(&mut batch, 10, 100).await.map(|c| c.code), Some(close_code::SLOW_CONSUMER));
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_limit_counts_for_half_of_it() {
        let outbox = Outbox::new(10);
        outbox.release(Vec::new(), &[]);
        assert!(outbox.push_live(1, &frame("a live frame over the limit"), ""));
        outbox.push_control(frame("ping"));
        assert_eq!(drain(&outbox).await, vec![frame("a live frame over the limit"), frame("ping")]);
        outbox.push_replayed(2, frame("a replayed one too")).await.unwrap();
        assert_eq!(drain(&outbox).await, vec![frame("a replayed one too")]);
        // Two of them and a bit more are too much: the queue stays bounded.
        let _ = outbox.push_live(3, &frame("a live frame over the limit"), "");
        let _ = outbox.push_live(4, &frame("a live frame over the limit"), "");
        assert_eq!(outbox.close_reason(), None);
        let _ = outbox.push_live(5, &frame("x"), "");
        assert_eq!(outbox.close_reason().map(|close| close.code), Some(close_code::SLOW_CONSUMER));
    }

    #[tokio::test]
    async fn replay_waits_for_room_instead_of_overflowing() {
        let outbox = std::sync::Arc::new(Outbox::new(8));
        outbox.release(Vec::new(), &[]);
        outbox.push_replayed(1, frame("aaaa")).await.unwrap();
        let replay = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push_replayed(2, frame("bbbb")).await })
        };
        let mut batch = Vec::new();
        outbox.next_batch(&mut batch, 1, 100).await;
        assert_eq!(replay.await.unwrap(), Ok(()));
        outbox.next_batch(&mut batch, 1, 100).await;
        assert_eq!(batch, vec![frame("aaaa"), frame("bbbb")]);
        outbox.close(Close::new(1000, "bye"));
        assert_eq!(outbox.push_replayed(3, frame("c")).await, Err(Closed));
    }
}
