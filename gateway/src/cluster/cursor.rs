//! Device cursors in KV `herald-cursors`: the last `seq` each user's device acknowledged.
//!
//! Acks are cheap and frequent, so they only update a map in memory; a flusher writes the map to KV
//! every `cursor_flush_interval`, and a closing connection writes its own cursor at once. Writes
//! never move a cursor back: each is a compare-and-set against the stored revision, so a slower
//! gateway flushing an older value after the device moved on loses the race harmlessly. While a
//! device is connected, the gateway remembers the revision it last wrote, so that the next write is
//! one request instead of a read and a write (a device acknowledges about once a second while
//! messages flow, so a gateway with many sockets writes that many cursors every second).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::id::kv_key;
use herald_shared::subject::KV_CURSORS;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::forward::{self, Stored};

/// Cursors written at once by one flush.
const FLUSH_CONCURRENCY: usize = 32;

pub(crate) struct Cursors {
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
    /// The devices that acknowledged on this gateway since they connected, by KV key.
    devices: Mutex<HashMap<String, Device>>,
}

#[derive(Default)]
struct Device {
    /// Acknowledged but not yet written.
    pending: Option<u64>,
    /// What this gateway last wrote.
    written: Option<Stored>,
}

/// A cursor could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cursor store: {0}")]
pub(crate) struct CursorError(String);

fn error(what: impl std::fmt::Display) -> CursorError {
    CursorError(what.to_string())
}

/// The KV key of a device's cursor.
pub(crate) fn cursor_key(user: &str, device: &str) -> String {
    format!("{}.{}", kv_key(user), kv_key(device))
}

/// The KV key noting that a device missed messages from some seq on (see [`Cursors::mark_lost`]).
fn lost_key(user: &str, device: &str) -> String {
    format!("{}.lost", cursor_key(user, device))
}

impl Cursors {
    pub(crate) fn new(js: jetstream::Context) -> Cursors {
        Cursors { js, bucket: OnceCell::new(), devices: Mutex::new(HashMap::new()) }
    }

    async fn bucket(&self) -> Result<&kv::Store, CursorError> {
        self.bucket.get_or_try_init(|| async { self.js.get_key_value(KV_CURSORS).await.map_err(error) }).await
    }

    /// The device's stored cursor, if any.
    pub(crate) async fn load(&self, user: &str, device: &str) -> Result<Option<u64>, CursorError> {
        forward::load(self.bucket().await?, &cursor_key(user, device)).await.map_err(error)
    }

    /// Notes that the device missed messages from `seq` on that it can no longer get in order (its
    /// connection is about to close), so that its next resume from past `seq` is told.
    pub(crate) async fn mark_lost(&self, user: &str, device: &str, seq: u64) -> Result<(), CursorError> {
        let bucket = self.bucket().await?;
        bucket.put(lost_key(user, device), Bytes::from(seq.to_string())).await.map_err(error)?;
        Ok(())
    }

    /// The seq a resuming device missed messages from, if a closed connection noted one; the note is
    /// removed, since the resume reports it.
    pub(crate) async fn take_lost(&self, user: &str, device: &str) -> Result<Option<u64>, CursorError> {
        let bucket = self.bucket().await?;
        let key = lost_key(user, device);
        let Some(value) = bucket.get(&key).await.map_err(error)? else { return Ok(None) };
        bucket.purge(&key).await.map_err(error)?;
        Ok(forward::parse(&value))
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, Device>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an acknowledgement; written by the next flush.
    pub(crate) fn ack(&self, key: &str, seq: u64) {
        let mut devices = self.devices();
        let device = match devices.get_mut(key) {
            Some(device) => device,
            None => devices.entry(key.to_string()).or_default(),
        };
        device.pending = Some(device.pending.unwrap_or(0).max(seq));
    }

    /// Sets a new device's first cursor now (its first connection started live at `seq`).
    pub(crate) async fn start_device(&self, user: &str, device: &str, seq: u64) {
        let key = cursor_key(user, device);
        if let Err(e) = self.store(&key, seq).await {
            warn!(%key, seq, error = %e, "first cursor not written");
        }
    }

    /// Writes the device's pending cursor now and forgets the device (a connection is closing).
    pub(crate) async fn flush_device(&self, user: &str, device: &str) {
        let key = cursor_key(user, device);
        let Some(Device { pending: Some(seq), written }) = self.devices().remove(&key) else { return };
        if let Err(e) = self.write(&key, seq, written).await {
            warn!(%key, seq, error = %e, "cursor not written");
        }
    }

    /// Writes every pending cursor.
    pub(crate) async fn flush(&self) {
        let pending: Vec<(String, u64, Option<Stored>)> = self
            .devices()
            .iter_mut()
            .filter_map(|(key, device)| Some((key.clone(), device.pending.take()?, device.written)))
            .collect();
        futures::stream::iter(pending)
            .for_each_concurrent(FLUSH_CONCURRENCY, |(key, seq, written)| async move {
                match self.write(&key, seq, written).await {
                    Ok(stored) => self.remember(&key, stored),
                    Err(e) => warn!(%key, seq, error = %e, "cursor not written"),
                }
            })
            .await;
    }

    /// Notes what a flush wrote for a device that is still connected.
    fn remember(&self, key: &str, stored: Stored) {
        if let Some(device) = self.devices().get_mut(key)
            && device.written.is_none_or(|written| written.revision < stored.revision)
        {
            device.written = Some(stored);
        }
    }

    /// Flushes every `interval` until `shutdown`, then once more.
    pub(crate) async fn run_flusher(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => self.flush().await,
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Moves the stored cursor at `key` up to `seq`, never down.
    async fn store(&self, key: &str, seq: u64) -> Result<(), CursorError> {
        self.write(key, seq, None).await.map(|_| ())
    }

    async fn write(&self, key: &str, seq: u64, written: Option<Stored>) -> Result<Stored, CursorError> {
        forward::advance_from(self.bucket().await?, key, seq, written).await.map_err(error)
    }
}
