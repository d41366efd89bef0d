//! Publishing load: at a steady rate for a while (core NATS, as most backends publish), or a burst
//! that must be stored before the test goes on (JetStream with acknowledgements, Herald only).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::Subject;

use crate::payload::{now_ns, stamped};
use crate::targets::{Target, TargetKind};

/// Publish acknowledgements awaited together in a burst.
const ACK_WINDOW: usize = 512;
/// A paced publisher that falls this far behind its schedule stops (the tool cannot keep up).
const BEHIND_FACTOR: u32 = 3;

/// What a paced publish did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Paced {
    /// Messages published.
    pub sent: u64,
    /// Time from the first publish to the flush after the last.
    pub elapsed_secs: f64,
}

impl Paced {
    /// Messages per second actually published.
    pub fn rate(&self) -> f64 {
        if self.elapsed_secs > 0.0 { self.sent as f64 / self.elapsed_secs } else { 0.0 }
    }
}

/// Publishes `rate` messages per second for `duration` (core NATS), each a payload of
/// `payload_bytes` stamped with its publish time, to `subject(n)` for the n-th message. Stops early
/// if it falls far behind schedule.
pub async fn paced(
    client: &async_nats::Client,
    rate: f64,
    duration: Duration,
    payload_bytes: usize,
    mut subject: impl FnMut(u64) -> Subject,
) -> Result<Paced> {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let started = Instant::now();
    let give_up = duration * BEHIND_FACTOR + Duration::from_secs(1);
    let mut sent = 0u64;
    while sent < total && started.elapsed() < give_up {
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            client.publish(subject(sent), stamped(now_ns(), payload_bytes)).await.context("publish")?;
            sent += 1;
        }
        if sent < total {
            let next = started + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    client.flush().await.context("flush publishes")?;
    Ok(Paced { sent, elapsed_secs: started.elapsed().as_secs_f64() })
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
    if target.kind != TargetKind::Herald {
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
