//! How far a STOMP connection lets its device's cursor move: one cursor per device, which `ack:auto`
//! subscriptions move as their messages are written and ACK frames move for the others.

use std::collections::VecDeque;

/// Unacknowledged messages tracked one by one; past this, the first one not tracked stands for
/// all that follow it until an ACK covers everything sent.
const MAX_TRACKED: usize = 1024;

/// A message sent on a subscription the client acknowledges stays owed until an ACK covers it
/// (an ACK covers everything up to its message, as Herald's `ack` does), so the writes of `ack:auto`
/// subscriptions move the cursor only up to the message before the first one still owed: a client
/// mixing modes (a topic on `auto`, its inbox on `client`) gets an unacknowledged message again
/// when it resumes.
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// The last `seq` written on an `ack:auto` subscription.
    auto_sent: u64,
    /// Where the auto subscriptions' writes last moved the cursor.
    moved_to: u64,
    /// `seq`s sent on acknowledged subscriptions and not acknowledged yet, in order.
    owed: VecDeque<u64>,
    /// The first one sent while `owed` was full.
    untracked_from: Option<u64>,
    /// The last `seq` sent on an acknowledged subscription.
    last_owed: u64,
}

impl Acks {
    /// `seq` was sent on a subscription acknowledged by the client, or `auto`.
    pub(super) fn sent(&mut self, seq: u64, auto: bool) {
        if auto {
            self.auto_sent = self.auto_sent.max(seq);
            return;
        }
        self.last_owed = self.last_owed.max(seq);
        if self.owed.len() >= MAX_TRACKED {
            self.untracked_from = Some(self.untracked_from.map_or(seq, |from| from.min(seq)));
            return;
        }
        // In order, but for a topic's block or a refill, which send older messages again.
        let at = self.owed.partition_point(|&owed| owed < seq);
        if self.owed.get(at) != Some(&seq) {
            self.owed.insert(at, seq);
        }
    }

    /// The client acknowledged everything up to `seq`.
    pub(super) fn acked(&mut self, seq: u64) {
        while self.owed.front().is_some_and(|&first| first <= seq) {
            self.owed.pop_front();
        }
        match self.untracked_from {
            _ if seq >= self.last_owed => self.untracked_from = None,
            // What was sent untracked after `seq` is not known: owed from right after it.
            Some(from) if from <= seq => self.untracked_from = Some(seq + 1),
            _ => {}
        }
    }

    /// Where the auto subscriptions' writes move the cursor now, `bound` at most (what a refill
    /// still owes), if further than before: what the bound held back is offered again once it moves.
    pub(super) fn take_auto(&mut self, bound: u64) -> Option<u64> {
        let first_owed = self.owed.front().copied().into_iter().chain(self.untracked_from).min();
        let upto = first_owed.map_or(self.auto_sent, |first| self.auto_sent.min(first - 1)).min(bound);
        (upto > self.moved_to).then(|| {
            self.moved_to = upto;
            upto
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_bound_held_back_is_offered_once_it_moves() {
        let mut acks = Acks::default();
        acks.sent(10, true);
        assert_eq!(acks.take_auto(4), Some(4), "a refill owes 5");
        assert_eq!(acks.take_auto(4), None);
        // The refill sent what it owed (older messages: nothing newer was written).
        acks.sent(5, true);
        assert_eq!(acks.take_auto(u64::MAX), Some(10));
    }

    #[test]
    fn auto_writes_move_the_cursor_up_to_the_first_message_still_owed() {
        let mut acks = Acks::default();
        acks.sent(10, true);
        assert_eq!(acks.take_auto(u64::MAX), Some(10));
        assert_eq!(acks.take_auto(u64::MAX), None);
        acks.sent(11, false);
        acks.sent(12, true);
        acks.sent(13, false);
        acks.sent(14, true);
        assert_eq!(acks.take_auto(u64::MAX), None, "11 is owed");
        acks.acked(11);
        assert_eq!(acks.take_auto(u64::MAX), Some(12), "13 is owed");
        acks.acked(13);
        assert_eq!(acks.take_auto(u64::MAX), Some(14));
    }

    #[test]
    fn an_older_message_sent_again_is_owed_first() {
        let mut acks = Acks::default();
        acks.sent(20, false);
        acks.sent(15, false);
        acks.sent(21, true);
        acks.acked(15);
        assert_eq!(acks.take_auto(u64::MAX), Some(19));
    }

    #[test]
    fn past_what_is_tracked_the_first_untracked_message_stays_owed_until_everything_is_acknowledged() {
        let mut acks = Acks::default();
        let last = MAX_TRACKED as u64 + 10;
        for seq in 1..=last {
            acks.sent(seq, false);
        }
        acks.sent(last + 1, true);
        acks.acked(MAX_TRACKED as u64 + 2);
        assert_eq!(acks.take_auto(u64::MAX), Some(MAX_TRACKED as u64 + 2));
        acks.acked(last);
        assert_eq!(acks.take_auto(u64::MAX), Some(last + 1));
    }
}
