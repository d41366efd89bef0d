//! Time in a run: seconds since it started (what the report shows) and the wall clock (what logs
//! show, to line the two up).

use std::time::Instant;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The start of a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
}

impl Clock {
    /// A clock started now.
    pub fn start() -> Clock {
        Clock { started: Instant::now() }
    }

    /// Seconds since the start, rounded to tenths.
    pub fn secs(&self) -> f64 {
        tenths(self.started.elapsed().as_secs_f64())
    }
}

/// `x` rounded to one decimal.
pub fn tenths(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The wall clock now, RFC 3339 in UTC.
pub fn wall_now() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}
