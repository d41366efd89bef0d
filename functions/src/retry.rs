//! What to do with a durable event after its handler ran: acknowledge it, deliver it again after a
//! delay, or give up and dead-letter it. Pure: no clock, no I/O.

use std::time::Duration;

use crate::error::HandlerError;

/// Exponential backoff: `initial`, then doubling after each failure, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before the next delivery after delivery number `failed_attempt` (1-based) failed.
    pub fn delay(&self, failed_attempt: u64) -> Duration {
        let doublings = failed_attempt.saturating_sub(1).min(31) as u32;
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

/// How often, and how patiently, an event is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries before giving up (at least 1).
    pub max_attempts: u64,
    /// Delays between deliveries.
    pub backoff: Backoff,
}

/// The fate of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Done: acknowledge.
    Ack,
    /// Deliver again after this delay.
    Retry(Duration),
    /// Give up: publish a dead letter, then stop redelivery.
    DeadLetter,
}

impl RetryPolicy {
    /// Decides what follows delivery number `attempt` (1-based) that ended with `outcome`.
    pub fn decide(&self, outcome: Result<(), &HandlerError>, attempt: u64) -> Decision {
        match outcome {
            Ok(()) => Decision::Ack,
            Err(error) if error.is_permanent() => Decision::DeadLetter,
            Err(_) if attempt >= self.max_attempts.max(1) => Decision::DeadLetter,
            Err(_) => Decision::Retry(self.backoff.delay(attempt)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn policy(max_attempts: u64) -> RetryPolicy {
        RetryPolicy { max_attempts, backoff: Backoff { initial: SECOND, max: 10 * SECOND } }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let backoff = Backoff { initial: SECOND, max: 10 * SECOND };
        let delays: Vec<_> = (1..=6).map(|attempt| backoff.delay(attempt).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff.delay(0), SECOND);
        assert_eq!(backoff.delay(u64::MAX), 10 * SECOND);
    }

    #[test]
    fn backoff_does_not_overflow() {
        let backoff = Backoff { initial: Duration::MAX, max: Duration::MAX };
        assert_eq!(backoff.delay(40), Duration::MAX);
    }

    #[test]
    fn success_is_acked_on_any_attempt() {
        assert_eq!(policy(3).decide(Ok(()), 1), Decision::Ack);
        assert_eq!(policy(3).decide(Ok(()), 3), Decision::Ack);
    }

    #[test]
    fn transient_failures_retry_until_the_last_attempt() {
        let error = HandlerError::transient("down");
        assert_eq!(policy(3).decide(Err(&error), 1), Decision::Retry(SECOND));
        assert_eq!(policy(3).decide(Err(&error), 2), Decision::Retry(2 * SECOND));
        assert_eq!(policy(3).decide(Err(&error), 3), Decision::DeadLetter);
        // Deliveries beyond the limit (a copy crashed mid-attempt) give up too.
        assert_eq!(policy(3).decide(Err(&error), 7), Decision::DeadLetter);
    }

    #[test]
    fn permanent_failures_dead_letter_at_once() {
        let error = HandlerError::permanent("unparsable");
        assert_eq!(policy(5).decide(Err(&error), 1), Decision::DeadLetter);
    }

    #[test]
    fn zero_attempts_means_one() {
        let error = HandlerError::transient("down");
        assert_eq!(policy(0).decide(Err(&error), 1), Decision::DeadLetter);
    }
}
