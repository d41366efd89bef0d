//! Which stream sequences a connection has complete: everything addressed to it at those
//! sequences was sent (or was the client's already, below where it started). A replay reads a
//! range completely; live delivery does not prove a range complete, since the last message of a
//! subject can go missing with nothing after it to tell. So the ranges are kept apart: a gap the
//! router finds later inside a hole between them is looked into, not taken as covered.

use smallvec::{SmallVec, smallvec};

/// At most this many separate ranges are kept; past it the range above the oldest hole is
/// dropped. A later gap in what it covered is then looked into again, and a message that replay
/// sent can be taken for a lost one: a false alarm (4008, `complete:false`), never a silent loss,
/// and only after that many catch-ups on one connection.
const MAX_RANGES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Coverage {
    /// Disjoint, non-adjacent inclusive ranges, in order: most connections keep one, inline.
    ranges: SmallVec<[(u64, u64); 1]>,
}

impl Coverage {
    /// Everything up to `through` is complete.
    pub(crate) fn through(through: u64) -> Coverage {
        Coverage { ranges: smallvec![(0, through)] }
    }

    /// `from..=to` was read completely.
    pub(crate) fn add(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        let (mut from, mut to) = (from, to);
        // Ranges that overlap or touch `from..=to` merge into it.
        self.ranges.retain(|&mut (lo, hi)| {
            let apart = hi.saturating_add(1) < from || to.saturating_add(1) < lo;
            if !apart {
                from = from.min(lo);
                to = to.max(hi);
            }
            apart
        });
        let at = self.ranges.partition_point(|&(lo, _)| lo < from);
        self.ranges.insert(at, (from, to));
        if self.ranges.len() > MAX_RANGES {
            self.ranges.remove(1);
        }
    }

    /// The lowest sequence of `from..=to` not complete, if any.
    pub(crate) fn first_missing(&self, from: u64, to: u64) -> Option<u64> {
        let mut seq = from;
        for &(lo, hi) in &self.ranges {
            if seq < lo {
                break;
            }
            if seq <= hi {
                seq = hi.checked_add(1)?;
            }
        }
        (seq <= to).then_some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap_and_stay_apart_otherwise() {
        let mut coverage = Coverage::through(10);
        coverage.add(11, 20);
        assert_eq!(coverage.ranges[..], [(0, 20)]);
        coverage.add(30, 40);
        coverage.add(50, 60);
        assert_eq!(coverage.ranges[..], [(0, 20), (30, 40), (50, 60)]);
        coverage.add(35, 51);
        assert_eq!(coverage.ranges[..], [(0, 20), (30, 60)]);
        coverage.add(25, 24);
        assert_eq!(coverage.ranges[..], [(0, 20), (30, 60)], "an empty range adds nothing");
    }

    #[test]
    fn the_first_missing_sequence_skips_what_is_complete() {
        let mut coverage = Coverage::through(10);
        coverage.add(21, 30);
        assert_eq!(coverage.first_missing(5, 10), None);
        assert_eq!(coverage.first_missing(5, 15), Some(11));
        assert_eq!(coverage.first_missing(12, 25), Some(12));
        assert_eq!(coverage.first_missing(21, 30), None);
        assert_eq!(coverage.first_missing(25, 40), Some(31));
        assert_eq!(Coverage::through(u64::MAX).first_missing(1, u64::MAX), None);
    }

    #[test]
    fn past_the_limit_the_oldest_hole_is_forgotten_as_missing() {
        let mut coverage = Coverage::through(0);
        for at in 1..=MAX_RANGES as u64 {
            coverage.add(at * 10, at * 10);
        }
        assert_eq!(coverage.ranges.len(), MAX_RANGES);
        assert_eq!(coverage.first_missing(10, 10), Some(10), "10's range was dropped");
        assert_eq!(coverage.first_missing(0, 0), None, "the start stays");
        assert_eq!(coverage.first_missing(20, 20), None);
    }
}
