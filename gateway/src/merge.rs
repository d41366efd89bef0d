//! Many NATS subscriptions read as one stream, in stream-sequence order.
//!
//! A gateway holds one subscription per connected user (and per topic, and one for `push.all`), and
//! a connection listens to several of them. async-nats gives each subscription its own channel; the
//! connection task fills them one message at a time, in the order the server sent them, which is
//! stream order. Reading the channels from separate tasks would lose that order across channels
//! (seq 11 of a user could overtake seq 10 of `push.all`), and a client resuming from 11 would then
//! miss 10. [`OrderedMerge`] restores the order:
//!
//! - every subscription has its own waker, which records it in a ready queue when data arrives;
//! - at most one message per subscription (its head) is taken out and kept in a min-heap by seq;
//! - the smallest head is released only when the ready queue is empty. At that point, every message
//!   the server sent before that head has been pushed into its channel before the head was (one
//!   connection task pushes them in order), so its channel's wake is already recorded: an empty
//!   ready queue means no earlier message is waiting anywhere.
//!
//! Polling must run outside tokio's cooperative budget (`tokio::task::unconstrained`): a channel that
//! is out of budget wakes itself and returns `Pending`, which would look like endless readiness.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::Stream;
use futures::task::AtomicWaker;

/// Identifies one member of an [`OrderedMerge`]; never reused while the merge lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MemberId(u64);

/// A set of streams read as one, smallest key first (see the module docs for why that is safe).
pub(crate) struct OrderedMerge<S: Stream> {
    members: std::collections::HashMap<MemberId, Member<S>>,
    heads: BinaryHeap<Reverse<(u64, MemberId)>>,
    ready: Arc<ReadyQueue>,
    key: fn(&S::Item) -> u64,
    next_id: u64,
}

struct Member<S: Stream> {
    stream: S,
    flag: Arc<MemberWaker>,
    waker: Waker,
    head: Option<S::Item>,
}

/// Members whose wakers fired, and the task to wake.
#[derive(Default)]
struct ReadyQueue {
    queue: Mutex<VecDeque<MemberId>>,
    task: AtomicWaker,
}

struct MemberWaker {
    id: MemberId,
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl MemberWaker {
    /// Records the member as ready; returns whether it was not already recorded.
    fn enqueue(&self) -> bool {
        let first = !self.queued.swap(true, Ordering::AcqRel);
        if first {
            self.ready.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(self.id);
        }
        first
    }
}

impl Wake for MemberWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.enqueue() {
            self.ready.task.wake();
        }
    }
}

impl<S: Stream + Unpin> OrderedMerge<S> {
    /// An empty merge ordering items by `key`.
    pub(crate) fn new(key: fn(&S::Item) -> u64) -> Self {
        OrderedMerge {
            members: Default::default(),
            heads: BinaryHeap::new(),
            ready: Arc::new(ReadyQueue::default()),
            key,
            next_id: 0,
        }
    }

    /// Adds a stream; it is polled at the next [`OrderedMerge::poll_next`].
    pub(crate) fn insert(&mut self, stream: S) -> MemberId {
        let id = MemberId(self.next_id);
        self.next_id += 1;
        let flag = Arc::new(MemberWaker { id, queued: AtomicBool::new(false), ready: self.ready.clone() });
        flag.enqueue();
        self.members.insert(id, Member { stream, waker: Waker::from(flag.clone()), flag, head: None });
        id
    }

    /// Removes a stream, dropping its head if one was taken.
    pub(crate) fn remove(&mut self, id: MemberId) -> Option<S> {
        let member = self.members.remove(&id)?;
        if member.head.is_some() {
            self.heads.retain(|Reverse((_, member_id))| *member_id != id);
        }
        Some(member.stream)
    }

    /// How many streams are members.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// The next item in key order, with the member it came from. A stream that ends is removed and
    /// reported once as `(id, None)`.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(MemberId, Option<S::Item>)> {
        self.ready.task.register(cx.waker());
        loop {
            let Some(id) = self.ready.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { break };
            if let Some(ended) = self.take_head(id) {
                return Poll::Ready((ended, None));
            }
        }
        let Some(Reverse((_, id))) = self.heads.pop() else { return Poll::Pending };
        let member = self.members.get_mut(&id).expect("a head belongs to a member");
        let item = member.head.take().expect("a heap entry has a head");
        // Take the member's next head now; if it ended, it is reported on the next call.
        self.wake_member(id);
        Poll::Ready((id, Some(item)))
    }

    /// Polls member `id` for a head unless it has one; returns `Some(id)` if it ended.
    fn take_head(&mut self, id: MemberId) -> Option<MemberId> {
        let member = self.members.get_mut(&id)?;
        // Clear the flag before polling, so a wake during or after the poll queues it again.
        member.flag.queued.store(false, Ordering::Release);
        if member.head.is_some() {
            return None;
        }
        match Pin::new(&mut member.stream).poll_next(&mut Context::from_waker(&member.waker)) {
            Poll::Ready(Some(item)) => {
                self.heads.push(Reverse(((self.key)(&item), id)));
                member.head = Some(item);
                None
            }
            Poll::Ready(None) => {
                self.members.remove(&id);
                Some(id)
            }
            Poll::Pending => None,
        }
    }

    /// Queues member `id` to be polled for its next head at the next call, without waking the task
    /// (the caller polls again anyway).
    fn wake_member(&self, id: MemberId) {
        if let Some(member) = self.members.get(&id) {
            member.flag.enqueue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::poll_fn;
    use tokio::sync::mpsc;

    struct ReceiverStream(mpsc::Receiver<u64>);

    impl Stream for ReceiverStream {
        type Item = u64;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u64>> {
            self.0.poll_recv(cx)
        }
    }

    async fn next(merge: &mut OrderedMerge<ReceiverStream>) -> (MemberId, Option<u64>) {
        poll_fn(|cx| merge.poll_next(cx)).await
    }

    #[tokio::test]
    async fn releases_items_in_key_order_across_members() {
        let mut merge = OrderedMerge::new(|n: &u64| *n);
        let (user_tx, user_rx) = mpsc::channel(16);
        let (all_tx, all_rx) = mpsc::channel(16);
        let user = merge.insert(ReceiverStream(user_rx));
        let all = merge.insert(ReceiverStream(all_rx));
        // One producer pushing in global order, as async-nats's connection task does.
        for n in 1..=10u64 {
            if n % 3 == 0 { all_tx.send(n).await.unwrap() } else { user_tx.send(n).await.unwrap() }
        }
        let mut got = Vec::new();
        for _ in 0..10 {
            let (id, item) = next(&mut merge).await;
            let n = item.unwrap();
            assert_eq!(id, if n % 3 == 0 { all } else { user });
            got.push(n);
        }
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_order_with_a_concurrent_producer() {
        let mut merge = OrderedMerge::new(|n: &u64| *n);
        let mut senders = Vec::new();
        for _ in 0..8 {
            let (tx, rx) = mpsc::channel(1024);
            merge.insert(ReceiverStream(rx));
            senders.push(tx);
        }
        let total = 20_000u64;
        let producer = tokio::spawn(async move {
            for n in 1..=total {
                senders[(n * 7 % 8) as usize].send(n).await.unwrap();
            }
        });
        let mut last = 0;
        while last < total {
            // Members end once the producer is done; only items matter here.
            if let (_, Some(n)) = tokio::task::unconstrained(next(&mut merge)).await {
                assert_eq!(n, last + 1);
                last = n;
            }
        }
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn reports_ended_and_removed_members() {
        let mut merge = OrderedMerge::new(|n: &u64| *n);
        let (tx, rx) = mpsc::channel(4);
        let id = merge.insert(ReceiverStream(rx));
        tx.send(1).await.unwrap();
        drop(tx);
        assert_eq!(next(&mut merge).await, (id, Some(1)));
        assert_eq!(next(&mut merge).await, (id, None));
        assert_eq!(merge.len(), 0);
        let (_tx2, rx2) = mpsc::channel(4);
        let id2 = merge.insert(ReceiverStream(rx2));
        assert!(merge.remove(id2).is_some());
        assert_eq!(merge.len(), 0);
    }
}
