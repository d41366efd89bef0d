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

/// Moves the sequence at `key` up to `seq`, never down; returns the value stored afterwards.
pub(crate) async fn advance(bucket: &kv::Store, key: &str, seq: u64) -> Result<u64, KvError> {
    let value = Bytes::from(seq.to_string());
    for _ in 0..MAX_ATTEMPTS {
        let written = match bucket.entry(key).await.map_err(error)? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let stored = parse(&entry.value).unwrap_or(0);
                if stored >= seq {
                    return Ok(stored);
                }
                bucket.update(key, value.clone(), entry.revision).await.is_ok()
            }
            _ => bucket.create(key, value.clone()).await.is_ok(),
        };
        if written {
            return Ok(seq);
        }
    }
    Err(error(format!("{key}: too many concurrent writers")))
}

/// A stored sequence: decimal text.
pub(crate) fn parse(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}
