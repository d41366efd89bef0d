//! A sequence kept in KV that only moves forward (a device's cursor, a user's read position):
//! every write is a compare-and-set against the stored revision, so a slower writer with an older
//! value loses the race harmlessly, wherever it runs.
//!
//! Forward within one stream: a stream `HERALD` made again (deleted by hand) numbers its messages
//! from 1 again, so each value names the stream it counts in (its epoch), and a value of another
//! stream counts as none, instead of hiding the new stream's messages below it.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv;
use bytes::Bytes;

/// The epoch of the stream `HERALD` as last seen (a number from its creation time; 0 until known).
#[derive(Debug, Default)]
pub(crate) struct StreamEpoch(AtomicU64);

impl StreamEpoch {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, epoch: u64) {
        self.0.store(epoch, Ordering::Relaxed);
    }
}

/// A stored value: a sequence and the epoch of the stream it counts in, 0 when it does not say
/// (written before values named their stream, or while the epoch was not known yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
}

impl Position {
    /// Whether it counts in the stream of `epoch`: the same stream, or either one unknown.
    pub(crate) fn counts_in(&self, epoch: u64) -> bool {
        self.epoch == 0 || epoch == 0 || self.epoch == epoch
    }

    /// Decimal text: the sequence, then a space and the epoch when known.
    fn text(&self) -> Bytes {
        match self.epoch {
            0 => Bytes::from(self.seq.to_string()),
            epoch => Bytes::from(format!("{} {epoch}", self.seq)),
        }
    }
}

/// Writes a value tries before giving up (each conflict means another writer got there first).
const MAX_ATTEMPTS: usize = 5;

/// The value could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct KvError(pub(crate) String);

fn error(what: impl std::fmt::Display) -> KvError {
    KvError(what.to_string())
}

/// The sequence stored at `key` for the stream of `epoch` (none when absent, unreadable as a
/// position, or of another stream).
pub(crate) async fn load(bucket: &kv::Store, key: &str, epoch: u64) -> Result<Option<u64>, KvError> {
    let value = bucket.get(key).await.map_err(error)?;
    Ok(value.as_deref().and_then(parse).filter(|stored| stored.counts_in(epoch)).map(|stored| stored.seq))
}

/// What a key holds after a write: its position and the revision that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
    pub(crate) revision: u64,
}

/// Moves the sequence at `key` up to `seq` in the stream of `epoch`, never down (a value of
/// another stream is replaced); returns the sequence stored afterwards.
pub(crate) async fn advance(bucket: &kv::Store, key: &str, seq: u64, epoch: u64) -> Result<u64, KvError> {
    Ok(advance_from(bucket, key, Position { seq, epoch }, None).await?.seq)
}

/// [`advance`], given what this process last wrote at `key` (if anything): when nobody wrote
/// since, one compare-and-set does it without reading the key first.
pub(crate) async fn advance_from(
    bucket: &kv::Store,
    key: &str,
    to: Position,
    last_written: Option<Stored>,
) -> Result<Stored, KvError> {
    let value = to.text();
    let written = |revision| Stored { seq: to.seq, epoch: to.epoch, revision };
    if let Some(last) = last_written {
        if last.epoch == to.epoch && last.seq >= to.seq {
            return Ok(last);
        }
        if let Ok(revision) = bucket.update(key, value.clone(), last.revision).await {
            return Ok(written(revision));
        }
    }
    // Why the last write failed: another writer's revision came first, or KV did not answer.
    let mut failure = String::new();
    for _ in 0..MAX_ATTEMPTS {
        let attempt = match bucket.entry(key).await.map_err(error)? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                if let Some(stored) = parse(&entry.value).filter(|stored| stored.counts_in(to.epoch))
                    && stored.seq >= to.seq
                {
                    return Ok(Stored { seq: stored.seq, epoch: stored.epoch, revision: entry.revision });
                }
                bucket.update(key, value.clone(), entry.revision).await.map_err(|e| e.to_string())
            }
            _ => bucket.create(key, value.clone()).await.map_err(|e| e.to_string()),
        };
        match attempt {
            Ok(revision) => return Ok(written(revision)),
            Err(error) => failure = error,
        }
    }
    Err(error(format!("{key}: not written in {MAX_ATTEMPTS} attempts, the last: {failure}")))
}

/// A stored position: decimal text, the sequence and, after a space, the epoch (see
/// [`Position::text`]).
pub(crate) fn parse(value: &[u8]) -> Option<Position> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (seq, epoch) = text.split_once(' ').unwrap_or((text, "0"));
    Some(Position { seq: seq.parse().ok()?, epoch: epoch.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_written_and_counts_only_in_its_own_stream() {
        let tagged = Position { seq: 302, epoch: 77 };
        assert_eq!(tagged.text(), "302 77");
        assert_eq!(parse(&tagged.text()), Some(tagged));
        assert_eq!(parse(b"302"), Some(Position { seq: 302, epoch: 0 }), "written before epochs");
        assert_eq!(parse(b"x 1"), None);
        assert!(tagged.counts_in(77) && !tagged.counts_in(78));
        assert!(tagged.counts_in(0), "an epoch not known yet takes what is there");
        assert!(Position { seq: 302, epoch: 0 }.counts_in(78), "an untagged value counts anywhere");
    }
}
