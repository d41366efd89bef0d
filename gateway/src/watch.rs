//! Following a KV bucket without missing a change, and retrying with backoff when it breaks.

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;

/// Watches every key of `bucket`: from `last_revision + 1` when resuming, else new changes only.
pub(crate) async fn watch_from(bucket: &kv::Store, last_revision: u64) -> Result<kv::Watch, kv::WatchError> {
    if last_revision == 0 { bucket.watch_all().await } else { bucket.watch_all_from_revision(last_revision + 1).await }
}

/// Waits 100 ms, then twice as long each time, up to 2 s.
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = shutdown.cancelled() => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(2));
    }
}
