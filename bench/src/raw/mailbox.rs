//! One socket's unicast mailbox: the frames addressed to its user (`push.user.<id>`), which a
//! shared ring cannot carry efficiently. Bounded in bytes and filled without waiting; a mailbox
//! over its bound is closed (slow consumer) instead of blocking the feed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;

use super::batch::Batch;

/// Frames for one socket, and the waker of the socket's task.
pub(crate) struct Mailbox {
    queue: Mutex<Queue>,
    /// Whether frames wait or the mailbox closed; lets the socket's task check without the lock.
    pending: AtomicBool,
    waker: AtomicWaker,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

/// The mailbox went over its bound: its socket fell too far behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overflowed;

impl Mailbox {
    /// An empty mailbox holding at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Queue::default()),
            pending: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            limit,
        }
    }

    /// Queues `frame` and wakes the socket's task; closes the mailbox if it goes over its bound.
    pub(crate) fn push(&self, frame: Bytes) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.closed {
                return;
            }
            if queue.bytes + frame.len() > self.limit {
                *queue = Queue { closed: true, ..Queue::default() };
            } else {
                queue.bytes += frame.len();
                queue.frames.push_back(frame);
            }
            self.pending.store(true, Ordering::Release);
        }
        self.waker.wake();
    }

    /// Ready when frames wait or the mailbox closed; otherwise wakes `cx` when that changes.
    pub(crate) fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.pending.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Moves queued frames into `batch` until it is full or the mailbox is empty.
    pub(crate) fn take(&self, batch: &mut Batch) -> Result<(), Overflowed> {
        if !self.pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.closed {
            return Err(Overflowed);
        }
        while !batch.is_full() {
            let Some(frame) = queue.frames.pop_front() else { break };
            queue.bytes -= frame.len();
            batch.push(frame);
        }
        self.pending.store(!queue.frames.is_empty(), Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn takes_in_batches() {
        let mailbox = Mailbox::new(100);
        for frame in ["a", "b", "c"] {
            mailbox.push(Bytes::from(frame));
        }
        let mut batch = Batch::new(2, 100);
        mailbox.take(&mut batch).unwrap();
        assert_eq!(batch.frames(), ["a", "b"]);
        let mut batch = Batch::new(2, 100);
        mailbox.take(&mut batch).unwrap();
        assert_eq!(batch.frames(), ["c"]);
    }

    #[test]
    fn closes_over_its_bound() {
        let mailbox = Mailbox::new(10);
        mailbox.push(Bytes::from_static(b"abcdef"));
        mailbox.push(Bytes::from_static(b"ghijkl"));
        // Later frames are dropped: the socket is going away.
        mailbox.push(Bytes::from_static(b"m"));
        assert_eq!(mailbox.take(&mut Batch::new(10, 100)), Err(Overflowed));
    }

    #[tokio::test]
    async fn wakes_its_socket() {
        let mailbox = std::sync::Arc::new(Mailbox::new(100));
        let waiting = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { poll_fn(|cx| mailbox.poll_pending(cx)).await }
        });
        tokio::task::yield_now().await;
        mailbox.push(Bytes::from_static(b"x"));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        let mut batch = Batch::new(10, 100);
        mailbox.take(&mut batch).unwrap();
        assert_eq!(batch.frames(), ["x"]);
        assert!(poll_fn(|cx| Poll::Ready(mailbox.poll_pending(cx))).await.is_pending());
    }
}
