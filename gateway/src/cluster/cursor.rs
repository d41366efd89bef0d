//! Device cursors in KV `herald-cursors`: the last `seq` each user's device acknowledged.
//!
//! Acks are cheap and frequent (a STOMP `ack:auto` subscription acknowledges every write), so they
//! only raise an atomic in the device's [`DeviceCursor`], held by its sessions on this gateway; a
//! flusher writes the cursors that moved to KV every `cursor_flush_interval`, and a closing
//! connection writes its own at once. Writes
//! never move a cursor back: each is a compare-and-set against the stored revision, so a slower
//! gateway flushing an older value after the device moved on loses the race harmlessly. While a
//! device is connected, the gateway remembers the revision it last wrote, so that the next write is
//! one request instead of a read and a write (a device acknowledges about once a second while
//! messages flow). A flush writes at most `cursor_write_rate` cursors a second, those written
//! longest ago first: a gateway with more acknowledging devices than that writes each of them less
//! often, instead of loading NATS with one KV write per device per interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The bucket's max age (zero: none), after which an unwritten cursor is gone.
    max_age: Duration,
    /// The devices whose sessions on this gateway acknowledged something, by KV key.
    devices: Mutex<HashMap<Box<str>, Held>>,
    /// Flushes so far: a cursor notes the one that last wrote it.
    flushes: AtomicU64,
}

/// A device's cursor and how many of its sessions on this gateway hold it.
struct Held {
    cursor: Arc<DeviceCursor>,
    sessions: usize,
}

/// A connected device's acknowledgements, raised by its sessions without a lock.
pub(crate) struct DeviceCursor {
    key: Box<str>,
    acked: AtomicU64,
    /// What this gateway last wrote at `key`.
    written: Mutex<Option<Stored>>,
    /// The flush that last wrote this cursor (or the last before it was created).
    flushed_in: AtomicU64,
}

impl DeviceCursor {
    fn new(key: Box<str>, flushed_in: u64) -> DeviceCursor {
        DeviceCursor {
            key,
            acked: AtomicU64::new(0),
            written: Mutex::new(None),
            flushed_in: AtomicU64::new(flushed_in),
        }
    }

    /// Records that the device has everything up to `seq`.
    pub(crate) fn ack(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::Relaxed);
    }

    fn written(&self) -> MutexGuard<'_, Option<Stored>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The seq to write, when the device acknowledged past what was written.
    fn due(&self) -> Option<(u64, Option<Stored>)> {
        let seq = self.acked.load(Ordering::Relaxed);
        let written = *self.written();
        (seq > written.map_or(0, |written| written.seq)).then_some((seq, written))
    }

    fn remember(&self, stored: Stored) {
        let mut written = self.written();
        if written.is_none_or(|written| written.revision < stored.revision) {
            *written = Some(stored);
        }
    }
}

/// A cursor could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cursor store: {0}")]
pub(crate) struct CursorError(String);

fn error(what: impl std::fmt::Display) -> CursorError {
    CursorError(what.to_string())
}

/// Cursors one flush writes at most, for `rate` writes a second (at least one).
fn writes_per_flush(interval: Duration, rate: u32) -> usize {
    ((interval.as_secs_f64() * f64::from(rate)).ceil() as usize).max(1)
}

/// The `limit` cursors of `moved` written longest ago (a new one counts from when it came).
fn longest_unwritten(mut moved: Vec<Arc<DeviceCursor>>, limit: usize) -> Vec<Arc<DeviceCursor>> {
    if moved.len() > limit {
        moved.select_nth_unstable_by_key(limit, |cursor| cursor.flushed_in.load(Ordering::Relaxed));
        moved.truncate(limit);
    }
    moved
}

/// Now, in Unix nanoseconds (the unit of KV entries' times).
fn unix_nanos() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128
}

/// Whether a cursor written at `written` (Unix nanoseconds) is past half the bucket's `max_age`
/// (zero: none).
fn expires_soon(written: i128, max_age: Duration) -> bool {
    let age = Duration::from_nanos(u64::try_from(unix_nanos() - written).unwrap_or(0));
    !max_age.is_zero() && age > max_age / 2
}

/// The KV key of a device's cursor.
pub(crate) fn cursor_key(user: &str, device: &str) -> String {
    format!("{}.{}", kv_key(user), kv_key(device))
}

/// A device missed messages from `first` on: noted at `revision` of the cursors' bucket (later
/// notes have higher revisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LostNote {
    pub(crate) first: u64,
    pub(crate) revision: u64,
}

/// The last entry of the note at `key`, read from the bucket's leader: the first seq it notes (none
/// once removed) and its revision.
async fn lost_entry(bucket: &kv::Store, key: &str) -> Result<Option<(Option<u64>, u64)>, CursorError> {
    let subject = format!("$KV.{KV_CURSORS}.{key}");
    match bucket.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => {
            // Removals carry their operation; a note is a plain put.
            let operation = message.headers.get("KV-Operation").map(|value| value.as_str());
            let removed = matches!(operation, Some("DEL" | "PURGE"));
            let first = if removed { None } else { forward::parse(&message.payload) };
            Ok(Some((first, message.sequence)))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(error(e)),
    }
}

/// The KV key noting that a device missed messages from some seq on (see [`Cursors::mark_lost`]).
fn lost_key(user: &str, device: &str) -> String {
    format!("{}.lost", cursor_key(user, device))
}

impl Cursors {
    pub(crate) fn new(js: jetstream::Context, max_age: Duration) -> Cursors {
        let devices = Mutex::new(HashMap::new());
        Cursors { js, bucket: OnceCell::new(), max_age, devices, flushes: AtomicU64::new(0) }
    }

    async fn bucket(&self) -> Result<&kv::Store, CursorError> {
        self.bucket.get_or_try_init(|| async { self.js.get_key_value(KV_CURSORS).await.map_err(error) }).await
    }

    /// The device's stored cursor, if any.
    pub(crate) async fn load(&self, user: &str, device: &str) -> Result<Option<u64>, CursorError> {
        forward::load(self.bucket().await?, &cursor_key(user, device)).await.map_err(error)
    }

    /// The cursor a connection of the device resumes from, if any. One written more than half the
    /// bucket's max age ago is written again as it is, in the background: the max age removes the
    /// cursors of devices that stopped connecting, not those of devices that connect but had
    /// nothing to acknowledge for a while.
    pub(crate) async fn resume_from(&self, user: &str, device: &str) -> Result<Option<u64>, CursorError> {
        let bucket = self.bucket().await?;
        let key = cursor_key(user, device);
        let entry = match bucket.entry(&key).await.map_err(error)? {
            Some(entry) if entry.operation == kv::Operation::Put => entry,
            _ => return Ok(None),
        };
        if expires_soon(entry.created.unix_timestamp_nanos(), self.max_age) {
            let (bucket, value) = (bucket.clone(), entry.value.clone());
            tokio::spawn(async move {
                // A newer write (another session's) wrote the cursor anyway; other failures are
                // tried again at the device's next connection.
                match bucket.update(&key, value, entry.revision).await {
                    Err(e) if e.kind() != kv::UpdateErrorKind::WrongLastRevision => {
                        warn!(%key, error = %e, "cursor not written again before its max age");
                    }
                    _ => {}
                }
            });
        }
        Ok(forward::parse(&entry.value))
    }

    /// Notes that the device missed messages from `seq` on that it can no longer get in order (its
    /// connection is about to close), so that its next resume from past `seq` is told. A note that
    /// waits for a resume already, from `seq` or before, stays as it is (it tells the same resumes
    /// and more); one from later is lowered to `seq`. Fails if another note was written between the
    /// read and the write (the caller tries again).
    pub(crate) async fn mark_lost(&self, user: &str, device: &str, seq: u64) -> Result<LostNote, CursorError> {
        let bucket = self.bucket().await?;
        let key = lost_key(user, device);
        match lost_entry(bucket, &key).await? {
            Some((Some(first), revision)) if first <= seq => {
                // Written again as it is: a resume that reported it and is removing it by its
                // revision (see `forget_lost`) leaves it, since this loss has not been reported.
                // The resumes that read it need not hear of it again: the revision they read is given.
                bucket.update(&key, Bytes::from(first.to_string()), revision).await.map_err(error)?;
                Ok(LostNote { first, revision })
            }
            entry => {
                let last = entry.map_or(0, |(_, revision)| revision);
                let revision = bucket.update(&key, Bytes::from(seq.to_string()), last).await.map_err(error)?;
                Ok(LostNote { first: seq, revision })
            }
        }
    }

    /// The note of messages a resuming device missed, if a closed connection wrote one, as the
    /// bucket's leader has it (a replica may not have a note just written yet). It stays until the
    /// resume has written its report ([`Cursors::forget_lost`]): a connection that ends before
    /// leaves it for the next one.
    pub(crate) async fn read_lost(&self, user: &str, device: &str) -> Result<Option<LostNote>, CursorError> {
        let bucket = self.bucket().await?;
        Ok(match lost_entry(bucket, &lost_key(user, device)).await? {
            Some((Some(first), revision)) => Some(LostNote { first, revision }),
            _ => None,
        })
    }

    /// Removes the note at `revision`, which a resume reported; a newer note stays.
    pub(crate) async fn forget_lost(&self, user: &str, device: &str, revision: u64) -> Result<(), CursorError> {
        let bucket = self.bucket().await?;
        bucket.purge_expect_revision(lost_key(user, device), Some(revision)).await.map_err(error)
    }

    fn devices(&self) -> MutexGuard<'_, HashMap<Box<str>, Held>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's cursor, for a session that acknowledges; give it back with [`Cursors::release`].
    pub(crate) fn hold(&self, user: &str, device: &str) -> Arc<DeviceCursor> {
        // A new cursor queues behind those that moved before it, not ahead of them all.
        let flushed_in = self.flushes.load(Ordering::Relaxed);
        let mut devices = self.devices();
        let held = devices.entry(cursor_key(user, device).into()).or_insert_with_key(|key| Held {
            cursor: Arc::new(DeviceCursor::new(key.clone(), flushed_in)),
            sessions: 0,
        });
        held.sessions += 1;
        held.cursor.clone()
    }

    /// Sets a new device's first cursor now (its first connection started live at `seq`).
    pub(crate) async fn start_device(&self, user: &str, device: &str, seq: u64) {
        let key = cursor_key(user, device);
        if let Err(e) = self.store(&key, seq).await {
            warn!(%key, seq, error = %e, "first cursor not written");
        }
    }

    /// Writes the device's cursor now if it moved; the device is forgotten when no session of it
    /// holds it any more (a connection is closing).
    pub(crate) async fn release(&self, cursor: &Arc<DeviceCursor>) {
        {
            let mut devices = self.devices();
            if let Some(held) = devices.get_mut(&cursor.key)
                && Arc::ptr_eq(&held.cursor, cursor)
            {
                held.sessions -= 1;
                if held.sessions == 0 {
                    devices.remove(&cursor.key);
                }
            }
        }
        if let Err(error) = self.write_due(cursor).await {
            warn!(key = %cursor.key, %error, "cursor not written");
        }
    }

    /// Writes the cursors that moved, at most `limit` of them: those written longest ago first.
    pub(crate) async fn flush(&self, limit: usize) {
        let flush = self.flushes.fetch_add(1, Ordering::Relaxed) + 1;
        let moved: Vec<Arc<DeviceCursor>> = self
            .devices()
            .values()
            .filter(|held| held.cursor.due().is_some())
            .map(|held| held.cursor.clone())
            .collect();
        let cursors = longest_unwritten(moved, limit);
        let failed = Mutex::new((0usize, None));
        futures::stream::iter(cursors)
            .for_each_concurrent(FLUSH_CONCURRENCY, |cursor| {
                let failed = &failed;
                async move {
                    cursor.flushed_in.store(flush, Ordering::Relaxed);
                    if let Err(error) = self.write_due(&cursor).await {
                        let mut failed = failed.lock().unwrap_or_else(|p| p.into_inner());
                        failed.0 += 1;
                        failed.1.get_or_insert((cursor.key.clone(), error));
                    }
                }
            })
            .await;
        // One line per flush: while a bucket elects a leader every write fails, each second.
        if let (count, Some((key, error))) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            warn!(count, first = %key, %error, "cursors not written (tried again at the next flush)");
        }
    }

    async fn write_due(&self, cursor: &DeviceCursor) -> Result<(), CursorError> {
        let Some((seq, written)) = cursor.due() else { return Ok(()) };
        cursor.remember(self.write(&cursor.key, seq, written).await?);
        Ok(())
    }

    /// Flushes every `interval`, writing at most `rate` cursors a second, until `shutdown` (closing
    /// sessions then write their own).
    pub(crate) async fn run_flusher(self: Arc<Self>, interval: Duration, rate: u32, shutdown: CancellationToken) {
        let limit = writes_per_flush(interval, rate);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => self.flush(limit).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> DeviceCursor {
        DeviceCursor::new("ada.phone".into(), 0)
    }

    #[test]
    fn a_cursor_is_written_again_past_half_the_max_age_and_never_without_one() {
        let day = Duration::from_secs(24 * 3600);
        let written_ago = |age: Duration| unix_nanos() - age.as_nanos() as i128;
        assert!(!expires_soon(written_ago(14 * day), 30 * day));
        assert!(expires_soon(written_ago(16 * day), 30 * day));
        assert!(!expires_soon(written_ago(400 * day), Duration::ZERO), "no max age");
        assert!(!expires_soon(unix_nanos() + 1_000_000_000, 30 * day), "a clock behind the server's");
    }

    #[test]
    fn a_cursor_is_due_only_when_acknowledged_past_what_was_written() {
        let cursor = cursor();
        assert_eq!(cursor.due(), None, "nothing acknowledged yet");
        cursor.ack(7);
        cursor.ack(5);
        assert_eq!(cursor.due(), Some((7, None)), "the highest ack counts");
        let stored = Stored { seq: 7, revision: 3 };
        cursor.remember(stored);
        assert_eq!(cursor.due(), None);
        cursor.ack(6);
        assert_eq!(cursor.due(), None, "an older ack writes nothing");
        cursor.ack(9);
        assert_eq!(cursor.due(), Some((9, Some(stored))), "the next write starts from the revision written");
    }

    #[test]
    fn a_flush_takes_the_cursors_written_longest_ago_up_to_its_share_of_the_rate() {
        assert_eq!(writes_per_flush(Duration::from_secs(1), 1000), 1000);
        assert_eq!(writes_per_flush(Duration::from_millis(250), 1000), 250);
        assert_eq!(writes_per_flush(Duration::from_millis(1), 10), 1, "a flush writes at least one");
        let moved: Vec<Arc<DeviceCursor>> = [4, 0, 2, 7, 1]
            .into_iter()
            .enumerate()
            .map(|(index, flushed_in)| Arc::new(DeviceCursor::new(format!("ada.d{index}").into(), flushed_in)))
            .collect();
        let mut taken: Vec<Box<str>> =
            longest_unwritten(moved.clone(), 3).into_iter().map(|cursor| cursor.key.clone()).collect();
        taken.sort();
        assert_eq!(taken, ["ada.d1".into(), "ada.d2".into(), "ada.d4".into()], "the longest unwritten");
        assert_eq!(longest_unwritten(moved, 9).len(), 5, "under the limit, every moved cursor");
    }

    #[test]
    fn a_late_answer_for_an_older_write_does_not_replace_a_newer_one() {
        let cursor = cursor();
        cursor.remember(Stored { seq: 9, revision: 5 });
        cursor.remember(Stored { seq: 7, revision: 4 });
        assert_eq!(*cursor.written(), Some(Stored { seq: 9, revision: 5 }));
    }
}
