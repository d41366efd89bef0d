//! Publishing load: at a steady rate for a while (core NATS, as most backends publish), or a burst
//! that must be stored before the test goes on (JetStream with acknowledgements, Herald only).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::Subject;

use crate::payload::{now_ns, stamped};
use crate::targets::Target;

/// Publish acknowledgements awaited together in a burst.
const ACK_WINDOW: usize = 512;
/// A paced publisher that takes this many times its duration stops (the tool cannot keep up).
const BEHIND_FACTOR: u32 = 2;

/// How late a paced publisher may finish and still count as having held its pace: this share of
/// the duration, plus [`LATE_SLACK`] for timer and scheduling jitter.
const LATE_SHARE: f64 = 0.05;
/// See [`LATE_SHARE`].
const LATE_SLACK: Duration = Duration::from_millis(50);

/// What a paced publish did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Paced {
    /// Messages published.
    pub sent: u64,
    /// Messages the schedule asked for.
    pub planned: u64,
    /// The schedule's duration.
    pub planned_secs: f64,
    /// Time from the first publish to the last one.
    pub publishing_secs: f64,
    /// How much later than scheduled the last message went out.
    pub late_secs: f64,
}

impl Paced {
    /// Messages per second actually published (over the schedule, or longer if it ran late).
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.publishing_secs.max(self.planned_secs).max(f64::EPSILON)
    }

    /// Whether every message went out, the last one at most a little late.
    pub fn kept_pace(&self) -> bool {
        self.sent == self.planned && self.late_secs <= LATE_SHARE * self.planned_secs + LATE_SLACK.as_secs_f64()
    }
}

/// Publishes `rate` messages per second for `duration` (core NATS), each a payload of
/// `payload_bytes` stamped with its publish time, to `subject(n)` for the n-th message, then
/// flushes. Stops early if it falls far behind schedule.
pub async fn paced(
    client: &async_nats::Client,
    rate: f64,
    duration: Duration,
    payload_bytes: usize,
    mut subject: impl FnMut(u64) -> Subject,
) -> Result<Paced> {
    let planned = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let started = Instant::now();
    let give_up = duration * BEHIND_FACTOR + Duration::from_secs(1);
    let mut sent = 0u64;
    while sent < planned && started.elapsed() < give_up {
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(planned);
        while sent < due {
            client.publish(subject(sent), stamped(now_ns(), payload_bytes)).await.context("publish")?;
            sent += 1;
        }
        if sent < planned {
            let next = started + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    let publishing_secs = started.elapsed().as_secs_f64();
    client.flush().await.context("flush publishes")?;
    let last_scheduled = sent.saturating_sub(1) as f64 / rate;
    Ok(Paced {
        sent,
        planned,
        planned_secs: duration.as_secs_f64(),
        publishing_secs,
        late_secs: (publishing_secs - last_scheduled).max(0.0),
    })
}

/// Publishes one message to each subject, as fast as the target takes them: for Herald with
/// JetStream acknowledgements (so every message is stored when this returns), for the others with
/// core NATS and a flush. Returns the messages published.
pub async fn burst(
    target: &Target,
    client: &async_nats::Client,
    subjects: impl IntoIterator<Item = Subject>,
    payload_bytes: usize,
) -> Result<u64> {
    let mut sent = 0u64;
    if !target.kind.is_gateway() {
        for subject in subjects {
            client.publish(subject, stamped(now_ns(), payload_bytes)).await.context("publish")?;
            sent += 1;
        }
        client.flush().await.context("flush publishes")?;
        return Ok(sent);
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut acks = Vec::with_capacity(ACK_WINDOW);
    for subject in subjects {
        acks.push(js.publish(subject, stamped(now_ns(), payload_bytes)).await.context("publish to the stream")?);
        sent += 1;
        if acks.len() == ACK_WINDOW {
            for ack in acks.drain(..) {
                ack.await.context("stream acknowledgement")?;
            }
        }
    }
    for ack in acks {
        ack.await.context("stream acknowledgement")?;
    }
    Ok(sent)
}
