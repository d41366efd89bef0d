//! What a connection must do on time: ping the client every heartbeat, give up on a client it has
//! heard nothing from for a heartbeat plus the timeout, end at the token's expiry, and give up on a
//! client that takes no bytes for the stall timeout. Pure: the connection's task passes the clock.

use std::time::Duration;

use tokio::time::Instant;

/// As far as a deadline goes: a token's expiry past it (`exp` can be any 64-bit number) counts
/// as this, since an instant that far would overflow the clock.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a token that expires at `exp` (seconds since the epoch, `since_epoch` being now) expires:
/// at the start of its `exp` second, as a new connection is refused from then on.
pub(crate) fn token_expiry(now: Instant, since_epoch: Duration, exp: u64) -> Instant {
    now + Duration::from_secs(exp).saturating_sub(since_epoch).min(FAR_FUTURE)
}

/// What is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Send a ping.
    Ping,
    /// Nothing heard for a heartbeat plus the timeout: close with 1001.
    Silent,
    /// The token expired: close with 4001.
    Expired,
    /// The client took no bytes for the stall timeout: close with 4008.
    Stalled,
}

#[derive(Debug)]
pub(crate) struct Deadlines {
    heartbeat: Duration,
    /// How long past a heartbeat a client may stay silent.
    silence: Duration,
    stall: Duration,
    next_ping: Instant,
    heard: Instant,
    expires: Instant,
}

impl Deadlines {
    pub(crate) fn new(
        now: Instant,
        heartbeat: Duration,
        timeout: Duration,
        stall: Duration,
        expires: Instant,
    ) -> Deadlines {
        Deadlines { heartbeat, silence: heartbeat + timeout, stall, next_ping: now + heartbeat, heard: now, expires }
    }

    /// The client sent something.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// The client was seen alive at `at` otherwise (taking bytes from a full socket).
    pub(crate) fn alive_at(&mut self, at: Instant) {
        self.heard = self.heard.max(at);
    }

    /// The connection now ends at `expires` (a refreshed token).
    pub(crate) fn expire_at(&mut self, expires: Instant) {
        self.expires = expires;
    }

    /// The earliest deadline, given since when a write has been stuck (if one is).
    pub(crate) fn next(&self, stalled_since: Option<Instant>) -> Instant {
        let mut next = self.next_ping.min(self.heard + self.silence).min(self.expires);
        if let Some(since) = stalled_since {
            next = next.min(since + self.stall);
        }
        next
    }

    /// What is due at `now`, most serious first; a due ping is rescheduled.
    pub(crate) fn due(&mut self, now: Instant, stalled_since: Option<Instant>) -> Option<Due> {
        if now >= self.expires {
            Some(Due::Expired)
        } else if now >= self.heard + self.silence {
            Some(Due::Silent)
        } else if stalled_since.is_some_and(|since| now >= since + self.stall) {
            Some(Due::Stalled)
        } else if now >= self.next_ping {
            self.next_ping = now + self.heartbeat;
            Some(Due::Ping)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_token_expiry_too_far_for_the_clock_is_as_far_as_a_deadline_goes() {
        let now = Instant::now();
        let since_epoch = Duration::from_millis(1_000_400);
        assert_eq!(token_expiry(now, since_epoch, 1_060), now + Duration::from_millis(59_600));
        assert_eq!(token_expiry(now, since_epoch, 10), now, "expired already");
        assert_eq!(token_expiry(now, since_epoch, u64::MAX), now + FAR_FUTURE);
    }

    #[test]
    fn a_silent_client_is_given_up_a_heartbeat_plus_the_timeout_after_it_was_last_heard() {
        let start = Instant::now();
        let mut deadlines = Deadlines::new(start, 25 * SEC, 10 * SEC, 15 * SEC, start + 3600 * SEC);
        assert_eq!(deadlines.next(None), start + 25 * SEC);
        assert_eq!(deadlines.due(start + 25 * SEC, None), Some(Due::Ping));
        assert_eq!(deadlines.next(None), start + 35 * SEC, "the silence deadline comes before the next ping");
        assert_eq!(deadlines.due(start + 34 * SEC, None), None);
        assert_eq!(deadlines.due(start + 35 * SEC, None), Some(Due::Silent));
        deadlines.heard(start + 30 * SEC);
        assert_eq!(deadlines.due(start + 35 * SEC, None), None);
        assert_eq!(deadlines.next(None), start + 50 * SEC);
    }

    #[test]
    fn a_stuck_write_and_the_expiry_are_due_on_time() {
        let start = Instant::now();
        let mut deadlines = Deadlines::new(start, 25 * SEC, 10 * SEC, 15 * SEC, start + 20 * SEC);
        assert_eq!(deadlines.next(Some(start + 2 * SEC)), start + 17 * SEC);
        assert_eq!(deadlines.due(start + 17 * SEC, Some(start + 2 * SEC)), Some(Due::Stalled));
        assert_eq!(deadlines.due(start + 17 * SEC, None), None);
        assert_eq!(deadlines.due(start + 20 * SEC, None), Some(Due::Expired));
    }
}
