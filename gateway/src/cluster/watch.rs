//! Following a KV bucket without missing a change, and retrying with backoff when it breaks.

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;

/// Watches every key of `bucket`: from `last_revision + 1` when resuming, else new changes only. A
/// bucket recreated meanwhile (deleted, or lost with a NATS store) counts its revisions from 1
/// again: it is then followed from its start.
pub(crate) async fn watch_from(bucket: &kv::Store, last_revision: u64) -> Result<kv::Watch, kv::WatchError> {
    if last_revision == 0 {
        return bucket.watch_all().await;
    }
    let recreated = bucket.status().await.is_ok_and(|status| status.info.state.last_sequence < last_revision);
    bucket.watch_all_from_revision(if recreated { 1 } else { last_revision + 1 }).await
}

/// Waits 100 ms, then twice as long each time, up to 2 s.
pub(crate) struct Backoff {
    next: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100), failures: 0 }
    }
}

impl Backoff {
    /// Counts a failure; says whether it is worth a warning. The first few while starting are
    /// expected (the buckets are created by the health check a moment later).
    pub(crate) fn failed(&mut self, was_running: bool) -> bool {
        if was_running {
            *self = Backoff::default();
        }
        self.failures += 1;
        was_running || self.failures > 10
    }

    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = shutdown.cancelled() => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(2));
    }
}
