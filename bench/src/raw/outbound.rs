//! One socket's outbound queue: bounded in bytes, filled by the feeds without waiting, drained by the
//! socket's task. A queue over its bound is closed (slow consumer) instead of blocking a feed.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

pub(crate) struct Outbound {
    queue: Mutex<Queue>,
    /// Wakes the socket's task when the queue goes from empty to non-empty, or closes.
    pub(crate) ready: Notify,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

impl Outbound {
    pub(crate) fn new(limit: usize) -> Outbound {
        Outbound { queue: Mutex::new(Queue::default()), ready: Notify::new(), limit }
    }

    /// Queues `frame`; closes the queue if it grows over its limit.
    pub(crate) fn push(&self, frame: &Bytes) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.closed {
            return;
        }
        if queue.bytes + frame.len() > self.limit {
            queue.closed = true;
            queue.frames.clear();
            queue.bytes = 0;
        } else {
            let was_empty = queue.frames.is_empty();
            queue.bytes += frame.len();
            queue.frames.push_back(frame.clone());
            if !was_empty {
                return;
            }
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// Moves up to `max_frames` queued frames (about `max_bytes`) into `batch`; returns whether
    /// the queue is closed.
    pub(crate) fn take(&self, batch: &mut Vec<Bytes>, max_frames: usize, max_bytes: usize) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = 0;
        while batch.len() < max_frames && bytes < max_bytes {
            let Some(frame) = queue.frames.pop_front() else { break };
            bytes += frame.len();
            batch.push(frame);
        }
        queue.bytes -= bytes;
        queue.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_in_batches_and_closes_when_full() {
        let outbound = Outbound::new(10);
        for _ in 0..3 {
            outbound.push(&Bytes::from_static(b"abc"));
        }
        let mut batch = Vec::new();
        assert!(!outbound.take(&mut batch, 2, 100));
        assert_eq!(batch.len(), 2);
        outbound.push(&Bytes::from_static(b"abcdefgh"));
        assert!(outbound.take(&mut batch, 10, 100));
    }
}
