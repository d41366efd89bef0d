//! A broadcast log: the recent messages of one audience every session may share (`push.all`, a
//! topic), kept once per gateway and read by each interested session at its own position.
//!
//! Fan-out costs nothing per socket on the router's side: a message is appended once, and the
//! sessions waiting for more ([`Log::park`]) are woken once per burst. A busy session finds
//! several messages when it runs and sends them in one write; an idle one parks again.
//!
//! The log is bounded in entries and bytes (per gateway, not per socket). A session that falls
//! out of the window finds its position before [`LogView::first`]; it learns the highest
//! sequence evicted, and catches up from the stream if that is newer than what it sent. It also
//! learns of the gaps evicted unread (a few are kept apart, more are spanned by one): a gap may
//! say that something older than what it sent is missing, which a catch-up cannot find.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use super::mailbox::Mailbox;
use super::message::Live;

/// The most evicted gaps a log keeps apart; more are spanned by one.
const KEPT_GAPS: usize = 8;

/// How much a log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogLimits {
    /// Most entries.
    pub(crate) entries: usize,
    /// Most bytes (of payload, roughly: [`Live::cost`]).
    pub(crate) bytes: usize,
}

pub(crate) struct Log {
    ring: RwLock<Ring>,
    /// Sessions waiting for the next append.
    parked: Mutex<Vec<Arc<Mailbox>>>,
    /// How many times the parked sessions were woken: a session parked in an earlier round must
    /// park again.
    round: AtomicU64,
    limits: LogLimits,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<Live>,
    /// The position of `entries[0]`; positions only grow.
    first: u64,
    bytes: usize,
    /// The key of the newest entry evicted so far (0: none).
    last_evicted: u64,
    /// Gaps evicted, oldest first, each with the position it had.
    evicted_gaps: VecDeque<(u64, Live)>,
}

impl Log {
    pub(crate) fn new(limits: LogLimits) -> Log {
        // Round 0 means "never parked" to a session.
        Log { ring: RwLock::default(), parked: Mutex::default(), round: AtomicU64::new(1), limits }
    }

    /// The position the next entry will take: where a session that joins now starts reading.
    pub(crate) fn end(&self) -> u64 {
        let ring = self.read();
        ring.first + ring.entries.len() as u64
    }

    /// Appends an entry (keys must not decrease), evicting the oldest beyond the limits.
    #[cfg(test)]
    pub(crate) fn append(&self, entry: Live) {
        self.append_all([entry]);
    }

    /// Appends entries in order (keys must not decrease), evicting the oldest beyond the limits.
    pub(crate) fn append_all(&self, entries: impl IntoIterator<Item = Live>) {
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            ring.bytes += entry.cost();
            ring.entries.push_back(entry);
        }
        while ring.entries.len() > self.limits.entries.max(1)
            || (ring.bytes > self.limits.bytes && ring.entries.len() > 1)
        {
            let Some(evicted) = ring.entries.pop_front() else { break };
            ring.bytes -= evicted.cost();
            ring.last_evicted = evicted.key();
            if let Live::Gap { .. } = evicted {
                let position = ring.first;
                keep_evicted_gap(&mut ring.evicted_gaps, position, evicted);
            }
            ring.first += 1;
        }
    }

    /// The log as it is now, locked for reading (never held across an await).
    pub(crate) fn view(&self) -> LogView<'_> {
        LogView { ring: self.read() }
    }

    /// Asks to be woken at the next append, unless already parked in the current round
    /// (`round` remembers the round the session parked in).
    pub(crate) fn park(&self, mailbox: &Arc<Mailbox>, round: &mut u64) {
        let current = self.round.load(Ordering::Acquire);
        if *round == current {
            return;
        }
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).push(mailbox.clone());
        *round = current;
    }

    /// Wakes every parked session (after a burst of appends).
    pub(crate) fn wake_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        if parked.is_empty() {
            return;
        }
        self.round.fetch_add(1, Ordering::AcqRel);
        for mailbox in parked {
            mailbox.wake();
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps an evicted `gap` from `position`. Past [`KEPT_GAPS`], the two oldest kept become one at
/// the older position: told only to a reader that read neither, the span asks about nothing that
/// reader sent live. A reader that read the oldest but not the next (behind by more than that many
/// gaps, so hardly ever) is no longer told of the next one.
fn keep_evicted_gap(kept: &mut VecDeque<(u64, Live)>, position: u64, gap: Live) {
    if kept.len() >= KEPT_GAPS
        && let Some((_, next)) = kept.remove(1)
        && let Some((_, oldest)) = kept.front_mut()
    {
        *oldest = Live::span(oldest, &next);
    }
    kept.push_back((position, gap));
}

/// A read-locked log.
pub(crate) struct LogView<'a> {
    ring: RwLockReadGuard<'a, Ring>,
}

impl LogView<'_> {
    /// The oldest position still held.
    pub(crate) fn first(&self) -> u64 {
        self.ring.first
    }

    /// The entry at `position`, if held.
    pub(crate) fn get(&self, position: u64) -> Option<&Live> {
        let offset = position.checked_sub(self.ring.first)?;
        self.ring.entries.get(usize::try_from(offset).ok()?)
    }

    /// The key of the newest entry evicted so far (0: none).
    pub(crate) fn last_evicted(&self) -> u64 {
        self.ring.last_evicted
    }

    /// One gap spanning the gaps evicted from `position` on, if any.
    pub(crate) fn evicted_gap_from(&self, position: u64) -> Option<Live> {
        let mut gaps = self.ring.evicted_gaps.iter().filter(|(at, _)| *at >= position).map(|(_, gap)| gap);
        let first = gaps.next()?.clone();
        Some(gaps.fold(first, |spanned, gap| Live::span(&spanned, gap)))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use herald_shared::subject::Audience;

    use super::*;
    use crate::delivery::message::Message;

    fn message(seq: u64) -> Live {
        Live::Message(Arc::new(Message::new(seq, Audience::All, "", "", "t", Bytes::from_static(b"x"))))
    }

    #[test]
    fn keeps_a_window_and_remembers_what_it_evicted() {
        let log = Log::new(LogLimits { entries: 3, bytes: 1 << 20 });
        assert_eq!(log.end(), 0);
        for seq in [10, 12, 15, 20] {
            log.append(message(seq));
        }
        let view = log.view();
        assert_eq!((view.first(), view.last_evicted()), (1, 10));
        assert!(view.get(0).is_none());
        assert_eq!(view.get(1).map(Live::key), Some(12));
        assert_eq!(view.get(3).map(Live::key), Some(20));
        assert!(view.get(4).is_none());
        drop(view);
        assert_eq!(log.end(), 4);
    }

    #[test]
    fn gaps_evicted_unread_are_told_to_readers_from_before_them() {
        let log = Log::new(LogLimits { entries: 2, bytes: 1 << 20 });
        let gap = |first, last| Live::Gap { first, last, audience: Audience::All, first_on_route: false };
        log.append(message(10));
        log.append(gap(11, 12));
        log.append(message(13));
        log.append(gap(14, 14));
        log.append(message(15));
        log.append(message(16));
        let view = log.view();
        assert_eq!((view.first(), view.last_evicted()), (4, 14));
        let spanned = |from| match view.evicted_gap_from(from) {
            Some(Live::Gap { first, last, .. }) => Some((first, last)),
            _ => None,
        };
        assert_eq!(spanned(0), Some((11, 14)), "both, spanned by one");
        assert_eq!(spanned(2), Some((14, 14)), "a reader past the first gap");
        assert_eq!(spanned(4), None);
    }

    #[test]
    fn past_its_limit_a_log_spans_its_oldest_evicted_gaps_and_tells_recent_readers_only_recent_ones() {
        let log = Log::new(LogLimits { entries: 1, bytes: 1 << 20 });
        let gap = |seq| Live::Gap { first: seq, last: seq, audience: Audience::All, first_on_route: false };
        // Gaps at every even position, each evicted by the message after it.
        for seq in 1..=KEPT_GAPS as u64 + 2 {
            log.append(gap(seq * 10));
            log.append(message(seq * 10 + 1));
        }
        let view = log.view();
        let told = |from| match view.evicted_gap_from(from) {
            Some(Live::Gap { first, last, .. }) => Some((first, last)),
            _ => None,
        };
        let newest = (KEPT_GAPS as u64 + 2) * 10;
        assert_eq!(told(0), Some((10, newest)), "a reader that read none is told of all");
        assert_eq!(told(2 * (KEPT_GAPS as u64 + 1)), Some((newest, newest)), "a recent reader only of the newest");
        assert_eq!(told(2 * KEPT_GAPS as u64), Some((newest - 10, newest)));
    }

    #[test]
    fn a_byte_limit_keeps_at_least_the_newest_entry() {
        let log = Log::new(LogLimits { entries: 100, bytes: 10 });
        log.append(message(1));
        log.append(message(2));
        let view = log.view();
        assert_eq!((view.first(), view.get(1).map(Live::key)), (1, Some(2)));
    }

    #[tokio::test]
    async fn parked_sessions_are_woken_once_per_round() {
        let log = Log::new(LogLimits { entries: 10, bytes: 1 << 20 });
        let mailbox = Arc::new(Mailbox::new(1024));
        let mut round = 0;
        log.park(&mailbox, &mut round);
        log.park(&mailbox, &mut round);
        assert_eq!(log.parked.lock().unwrap().len(), 1, "parked once per round");
        log.wake_parked();
        // The wake-up was kept for the next wait.
        tokio::time::timeout(std::time::Duration::from_secs(1), mailbox.woken()).await.unwrap();
        log.park(&mailbox, &mut round);
        assert_eq!(log.parked.lock().unwrap().len(), 1, "a new round needs a new park");
    }
}
