//! A sequence kept in KV that only moves forward (a device's cursor, a user's read position):
//! every write is a compare-and-set against the stored revision, so a slower writer with an older
//! value loses the race harmlessly, wherever it runs.

use async_nats::jetstream::kv;
use bytes::Bytes;

/// Writes a value tries before giving up (each conflict means another writer got there first).
const MAX_ATTEMPTS: usize = 5;

/// The value could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct KvError(pub(crate) String);

fn error(what: impl std::fmt::Display) -> KvError {
    KvError(what.to_string())
}

/// The sequence stored at `key` (0 when absent or unreadable as a number).
pub(crate) async fn load(bucket: &kv::Store, key: &str) -> Result<Option<u64>, KvError> {
    let value = bucket.get(key).await.map_err(error)?;
    Ok(value.as_deref().and_then(parse))
}

/// What a key holds after a write: its sequence and the revision that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) revision: u64,
}

/// Moves the sequence at `key` up to `seq`, never down; returns the value stored afterwards.
pub(crate) async fn advance(bucket: &kv::Store, key: &str, seq: u64) -> Result<u64, KvError> {
    Ok(advance_from(bucket, key, seq, None).await?.seq)
}

/// [`advance`], given what this process last wrote at `key` (if anything): when nobody wrote
/// since, one compare-and-set does it without reading the key first.
pub(crate) async fn advance_from(
    bucket: &kv::Store,
    key: &str,
    seq: u64,
    last_written: Option<Stored>,
) -> Result<Stored, KvError> {
    let value = Bytes::from(seq.to_string());
    if let Some(last) = last_written {
        if last.seq >= seq {
            return Ok(last);
        }
        if let Ok(revision) = bucket.update(key, value.clone(), last.revision).await {
            return Ok(Stored { seq, revision });
        }
    }
    // Why the last write failed: another writer's revision came first, or KV did not answer.
    let mut failure = String::new();
    for _ in 0..MAX_ATTEMPTS {
        let written = match bucket.entry(key).await.map_err(error)? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let stored = parse(&entry.value).unwrap_or(0);
                if stored >= seq {
                    return Ok(Stored { seq: stored, revision: entry.revision });
                }
                bucket.update(key, value.clone(), entry.revision).await.map_err(|e| e.to_string())
            }
            _ => bucket.create(key, value.clone()).await.map_err(|e| e.to_string()),
        };
        match written {
            Ok(revision) => return Ok(Stored { seq, revision }),
            Err(error) => failure = error,
        }
    }
    Err(error(format!("{key}: not written in {MAX_ATTEMPTS} attempts, the last: {failure}")))
}

/// A stored sequence: decimal text.
pub(crate) fn parse(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}
