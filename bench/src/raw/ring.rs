//! The broadcast path: every `push.all` message, encoded once as a WebSocket frame, goes into one
//! shared ring (`tokio::sync::broadcast`) that every socket's task reads at its own position. The
//! fan-out costs the feed one send and a wake-up per waiting socket; each socket then takes what
//! has queued for it on whichever worker thread runs it, so the work spreads over every thread
//! and nothing is pushed per socket.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::broadcast::{self, Receiver, Sender, error::RecvError, error::TryRecvError};

use super::batch::Batch;
use super::frame::{framed_len, put_text_frame};

/// Why a socket stops reading the ring.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RingEnd {
    /// The socket fell more than the ring's capacity behind and missed this many entries.
    Lagged(u64),
    /// The feed is gone.
    Closed,
}

/// A ring of `capacity` entries (rounded up to a power of two).
pub(crate) fn new(capacity: usize) -> Sender<Bytes> {
    broadcast::Sender::new(capacity.max(1))
}

/// Moves every message of the `push.all` subscription into the ring. Messages that have already
/// arrived together (up to `coalesce`) become one entry of consecutive frames: one send, one
/// wake-up per socket and one iovec instead of several.
pub(crate) async fn feed(subscription: async_nats::Subscriber, ring: Sender<Bytes>, coalesce: usize) {
    let mut arrived = subscription.ready_chunks(coalesce.max(1));
    while let Some(messages) = arrived.next().await {
        // An error only means no socket is connected: there is no one to deliver to.
        let _ = ring.send(encode(messages.iter().map(|message| &message.payload[..])));
    }
}

/// Consecutive text frames, one per payload, in one buffer.
pub(crate) fn encode<'a>(payloads: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
    let mut entry = BytesMut::with_capacity(payloads.clone().map(|payload| framed_len(payload.len())).sum());
    for payload in payloads {
        put_text_frame(&mut entry, payload);
    }
    entry.freeze()
}

/// The next entry for `reader`, once there is one.
pub(crate) async fn next(reader: &mut Receiver<Bytes>) -> Result<Bytes, RingEnd> {
    reader.recv().await.map_err(|error| match error {
        RecvError::Lagged(missed) => RingEnd::Lagged(missed),
        RecvError::Closed => RingEnd::Closed,
    })
}

/// Moves the entries waiting for `reader` into `batch` until it is full or the ring is empty.
pub(crate) fn take(reader: &mut Receiver<Bytes>, batch: &mut Batch) -> Result<(), RingEnd> {
    while !batch.is_full() {
        match reader.try_recv() {
            Ok(entry) => batch.push(entry),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(missed)) => return Err(RingEnd::Lagged(missed)),
            Err(TryRecvError::Closed) => return Err(RingEnd::Closed),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ws::{Parsed, parse};

    #[test]
    fn encodes_consecutive_frames() {
        let entry = encode([&b"one"[..], &[b'x'; 300][..]].into_iter());
        let Parsed::Frame(first, used) = parse(&entry) else { panic!("no first frame") };
        assert_eq!(first.payload, b"one");
        let Parsed::Frame(second, rest) = parse(&entry[used..]) else { panic!("no second frame") };
        assert_eq!((second.payload.len(), used + rest), (300, entry.len()));
    }

    #[test]
    fn takes_in_batches_and_notices_lagging() {
        let ring = new(4);
        let mut reader = ring.subscribe();
        for entry in ["a", "b", "c"] {
            ring.send(Bytes::from(entry)).unwrap();
        }
        let mut batch = Batch::new(2, 100);
        take(&mut reader, &mut batch).unwrap();
        assert_eq!(batch.frames(), ["a", "b"]);
        for entry in ["d", "e", "f", "g", "h"] {
            ring.send(Bytes::from(entry)).unwrap();
        }
        // Four entries fit: "c" and "d" were overwritten.
        assert_eq!(take(&mut reader, &mut Batch::new(10, 100)), Err(RingEnd::Lagged(2)));
    }
}
