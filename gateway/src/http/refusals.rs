//! Connections refused before the upgrade: counted by status and reason in `/metrics`
//! (`herald_gateway_connections_refused_total`), each logged at debug, and summed up at info at most
//! once per [`SUMMARY_EVERY`], so that a flood of refusals (an attack, a misconfigured client
//! fleet) shows in the logs without filling them.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{debug, info};

use crate::http::auth::Rejection;
use crate::http::metrics::RefusalLabels;

/// The shortest time between two info lines about refusals.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Refusals {
    counts: Family<RefusalLabels, Counter>,
    summary: Mutex<Summary>,
}

/// When the last info line was written, and the refusals since.
struct Summary {
    last_line: Option<Instant>,
    unreported: u64,
}

impl Refusals {
    /// Counts into `counts` (the family registered in the gateway's metrics).
    pub(crate) fn new(counts: Family<RefusalLabels, Counter>) -> Refusals {
        Refusals { counts, summary: Mutex::new(Summary { last_line: None, unreported: 0 }) }
    }

    /// A connection from `address` was refused with `rejection`.
    pub(crate) fn refused(&self, rejection: &Rejection, address: IpAddr) {
        let status = rejection.status.as_u16();
        self.counts.get_or_create(&RefusalLabels { status, reason: rejection.error }).inc();
        debug!(%address, status, error = rejection.error, reason = %rejection.reason, "connection refused");
        if let Some((refused, over)) = self.summarize(Instant::now()) {
            info!(refused, seconds = over.as_secs(), "connections refused (by reason in /metrics, each at debug)");
        }
    }

    /// Counts one refusal; unless an info line was written less than [`SUMMARY_EVERY`] ago,
    /// returns how many refusals it should report and over how long.
    fn summarize(&self, now: Instant) -> Option<(u64, Duration)> {
        let mut summary = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        summary.unreported += 1;
        let over = summary.last_line.map_or(Duration::ZERO, |last| now.duration_since(last));
        if summary.last_line.is_some() && over < SUMMARY_EVERY {
            return None;
        }
        let refused = std::mem::take(&mut summary.unreported);
        summary.last_line = Some(now);
        Some((refused, over))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_reported_then_at_most_one_line_per_period() {
        let refusals = Refusals::new(Family::default());
        let start = Instant::now();
        assert_eq!(refusals.summarize(start), Some((1, Duration::ZERO)));
        for n in 1..100 {
            assert_eq!(refusals.summarize(start + Duration::from_millis(n)), None);
        }
        assert_eq!(refusals.summarize(start + SUMMARY_EVERY), Some((100, SUMMARY_EVERY)));
        assert_eq!(refusals.summarize(start + SUMMARY_EVERY + Duration::from_secs(1)), None);
    }
}
