//! One session's mailbox: what reaches it from outside its own task. The router puts the user's own
//! (personal) messages here in stream order; other parts put events (an rpc answer, a repair after
//! the delivery feed reconnected) and close requests (a newer session, an operator, the gateway
//! stopping). Each put wakes the session's task through one waker, which the broadcast logs use as
//! well: a flag and an [`AtomicWaker`], so waking takes no lock.
//!
//! The router wakes a session once per burst that put messages in its mailbox, after raising the
//! watermark, even when older messages still wait there: the session takes messages only up to the
//! watermark it read, so a message put while the session was reading may wait above it, and only
//! a wake-up after the watermark moved brings the session back for it.
//!
//! Personal messages are bounded in bytes: a session that does not take them fast enough loses the
//! queued ones and is told so ([`Inbox::take_overflow`]); it then catches up from the stream, so
//! nothing is lost and a slow socket never holds more than the limit here. Gaps are kept (a few at
//! most): the catch-up reads only past what the session sent, and a gap may say that something
//! older is missing. The lock is never held across an await.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use futures::task::AtomicWaker;
use herald_shared::frame::ServerFrame;

use super::message::Live;
use crate::close::Close;
use crate::cluster::cursor::LostNote;

/// The most gaps an overflowing mailbox keeps apart; more are spanned by one.
const KEPT_GAPS: usize = 8;

/// Something a session must handle that is not a message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// Messages may not have reached this gateway (its delivery feed reconnected): catch up from
    /// the stream.
    Repair,
    /// A notice to send, e.g. the answer to an `rpc`.
    Notice(ServerFrame),
    /// The stream was made again: what the session sent and what it would get next cannot be
    /// told apart any more.
    StreamReplaced,
    /// Another connection of the device noted lost messages for its next resume.
    LossNoted(LostNote),
    /// The user's read position moved to `read`: the connection tells its client, with the count
    /// of what it was sent that is still unread.
    ReadMoved { read: u64 },
    /// The user's unread personal messages in `(read, upto]` (none: they could not be counted),
    /// as [`Event::ReadMoved`]'s connection asked.
    ReadCounted { read: u64, upto: u64, unread: Option<u64> },
}

pub(crate) struct Mailbox {
    state: Mutex<State>,
    /// Set by a wake-up, cleared when the session's task sees it.
    woken: AtomicBool,
    /// A put asked the router for a wake-up that has not happened yet.
    wake_scheduled: AtomicBool,
    /// The session's task, while it waits.
    waker: AtomicWaker,
    /// The most bytes of personal messages held (each counted by [`Live::cost`], at most half the
    /// limit, so that a message larger than the limit still gets through).
    limit: usize,
}

#[derive(Default)]
struct State {
    personal: VecDeque<Live>,
    bytes: usize,
    /// Personal messages were dropped for lack of room since the session last looked.
    overflowed: bool,
    events: Vec<Event>,
    close: Option<Close>,
}

impl Mailbox {
    pub(crate) fn new(limit: usize) -> Mailbox {
        Mailbox {
            state: Mutex::new(State::default()),
            woken: AtomicBool::new(false),
            wake_scheduled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            limit,
        }
    }

    /// Adds a personal message (or gap) in stream order; never blocks. Returns whether the caller
    /// must wake the session ([`Mailbox::wake`]) at the end of its burst: true for the first put
    /// since the last wake-up, so the router wakes each session once per burst.
    #[must_use]
    pub(crate) fn push(&self, entry: Live) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        let cost = self.cost(&entry);
        if state.bytes + cost > self.limit {
            self.overflow(&mut state, entry);
        } else {
            state.bytes += cost;
            state.personal.push_back(entry);
        }
        drop(state);
        !self.wake_scheduled.swap(true, Ordering::AcqRel)
    }

    /// Wakes the session's task.
    pub(crate) fn wake(&self) {
        self.wake_scheduled.store(false, Ordering::Release);
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves when the session was woken since it last waited (a wake-up is never lost: one
    /// that comes while nobody waits is kept for the next wait).
    pub(crate) async fn woken(&self) {
        poll_fn(|cx| {
            if self.woken.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake-up between the first look and the registration.
            if self.woken.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }

    /// Hands the session an event.
    pub(crate) fn push_event(&self, event: Event) {
        let mut state = self.lock();
        if state.close.is_some() {
            return;
        }
        state.events.push(event);
        drop(state);
        self.wake();
    }

    /// Asks the session to close with `close`; the first request wins.
    pub(crate) fn close(&self, close: Close) {
        let mut state = self.lock();
        if state.close.is_some() {
            return;
        }
        state.close = Some(close);
        state.personal = VecDeque::new();
        state.bytes = 0;
        drop(state);
        self.wake();
    }

    /// The session's side: its personal messages and events, locked.
    pub(crate) fn inbox(&self) -> Inbox<'_> {
        Inbox { state: self.lock(), limit: self.limit }
    }

    fn cost(&self, entry: &Live) -> usize {
        entry.cost().min(self.limit / 2)
    }

    /// Drops the queued messages and `entry`, keeping the gaps among them (the session read none
    /// of them, so spanning two is exact), and says so.
    fn overflow(&self, state: &mut State, entry: Live) {
        let mut gaps: VecDeque<Live> = VecDeque::new();
        for gap in state.personal.drain(..).chain([entry]).filter(|entry| matches!(entry, Live::Gap { .. })) {
            let full = gaps.len() >= KEPT_GAPS;
            match gaps.back_mut() {
                Some(newest) if full => *newest = Live::span(newest, &gap),
                _ => gaps.push_back(gap),
            }
        }
        state.bytes = gaps.iter().map(|gap| self.cost(gap)).sum();
        state.personal = gaps;
        state.overflowed = true;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a harmful way.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A locked view of a mailbox for its session.
pub(crate) struct Inbox<'a> {
    state: MutexGuard<'a, State>,
    limit: usize,
}

impl Inbox<'_> {
    /// The oldest personal entry.
    pub(crate) fn front(&self) -> Option<&Live> {
        self.state.personal.front()
    }

    /// Takes the oldest personal entry.
    pub(crate) fn pop(&mut self) -> Option<Live> {
        let entry = self.state.personal.pop_front()?;
        self.state.bytes -= entry.cost().min(self.limit / 2); // as Mailbox::cost
        if self.state.personal.is_empty() {
            // An idle session keeps no queue.
            self.state.personal = VecDeque::new();
        }
        Some(entry)
    }

    /// Whether personal messages were dropped since the last call.
    pub(crate) fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.state.overflowed)
    }

    /// The events since the last call.
    pub(crate) fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.state.events)
    }

    /// The close asked for, if any.
    pub(crate) fn close_requested(&self) -> Option<Close> {
        self.state.close.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use herald_shared::subject::Audience;

    use super::*;
    use crate::close::CloseCode;
    use crate::delivery::message::Message;

    fn message(seq: u64, size: usize) -> Live {
        let payload = Bytes::from(vec![b'x'; size]);
        Live::Message(Arc::new(Message::new(seq, Audience::User("u".into()), "", "", "t", payload)))
    }

    #[test]
    fn asks_for_one_wake_up_per_burst() {
        let mailbox = Mailbox::new(1 << 20);
        assert!(mailbox.push(message(1, 10)));
        assert!(!mailbox.push(message(2, 10)), "one wake-up per burst");
        mailbox.wake();
        let mut inbox = mailbox.inbox();
        assert_eq!(inbox.pop().map(|e| e.key()), Some(1));
        assert_eq!(inbox.pop().map(|e| e.key()), Some(2));
        assert!(inbox.pop().is_none());
    }

    #[test]
    fn a_message_put_while_older_ones_wait_still_wakes_the_session() {
        // The session took nothing of burst 1 yet (or only up to an older watermark): burst 2's
        // message must bring it back after burst 2 raised the watermark.
        let mailbox = Mailbox::new(1 << 20);
        assert!(mailbox.push(message(1, 10)));
        mailbox.wake();
        assert!(mailbox.push(message(2, 10)), "a new burst wakes the session again");
    }

    #[test]
    fn overflow_drops_what_is_queued_and_says_so_once() {
        let mailbox = Mailbox::new(1000);
        let _ = mailbox.push(message(1, 300));
        let _ = mailbox.push(message(2, 300));
        let _ = mailbox.push(message(3, 300));
        let _ = mailbox.push(message(4, 300));
        let mut inbox = mailbox.inbox();
        assert!(inbox.take_overflow());
        assert!(!inbox.take_overflow());
        assert_eq!(inbox.pop().map(|e| e.key()), Some(4));
    }

    #[test]
    fn overflow_keeps_the_gaps_a_few_apart() {
        let mailbox = Mailbox::new(1000);
        let gap =
            |first: u64| Live::Gap { first, last: first, audience: Audience::User("u".into()), first_on_route: false };
        let _ = mailbox.push(message(1, 300));
        for seq in 2..=(KEPT_GAPS as u64 + 2) {
            let _ = mailbox.push(gap(seq));
        }
        let _ = mailbox.push(message(20, 300));
        let _ = mailbox.push(message(21, 300));
        let mut inbox = mailbox.inbox();
        assert!(inbox.take_overflow());
        let mut kept = Vec::new();
        while let Some(entry) = inbox.pop() {
            kept.push(match entry {
                Live::Gap { first, last, .. } => format!("{first}-{last}"),
                Live::Message(message) => message.seq.to_string(),
            });
        }
        let mut expected: Vec<String> = (2..KEPT_GAPS as u64 + 1).map(|seq| format!("{seq}-{seq}")).collect();
        expected.push(format!("{}-{}", KEPT_GAPS + 1, KEPT_GAPS + 2));
        expected.push("21".into());
        assert_eq!(kept, expected, "1 and 20 dropped, the last two gaps spanned by one, 21 queued after");
    }

    #[test]
    fn a_message_larger_than_the_limit_counts_for_half_of_it() {
        let mailbox = Mailbox::new(1000);
        let _ = mailbox.push(message(1, 5000));
        let _ = mailbox.push(message(2, 100));
        let mut inbox = mailbox.inbox();
        assert!(!inbox.take_overflow());
        assert_eq!(inbox.pop().map(|e| e.key()), Some(1));
    }

    #[test]
    fn a_close_request_drops_messages_and_keeps_the_first_reason() {
        let mailbox = Mailbox::new(1000);
        let _ = mailbox.push(message(1, 10));
        mailbox.close(Close::new(CloseCode::Replaced, "newer"));
        mailbox.close(Close::new(CloseCode::Disconnected, "operator"));
        assert!(!mailbox.push(message(2, 10)));
        mailbox.push_event(Event::Repair);
        let mut inbox = mailbox.inbox();
        assert!(inbox.front().is_none());
        assert!(inbox.take_events().is_empty());
        assert_eq!(inbox.close_requested().map(|c| c.code), Some(CloseCode::Replaced));
    }
}
