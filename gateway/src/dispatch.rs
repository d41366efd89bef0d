//! The dispatcher: one task that owns this gateway's NATS delivery subscriptions and the map from
//! each of them to the local sessions it feeds.
//!
//! - One subscription per audience (a user, a topic, `all`), taken when its first local session
//!   attaches and dropped after its last one leaves.
//! - Messages are read in stream order across all subscriptions ([`OrderedMerge`]), each encoded
//!   once into a frame, and queued on every session of its audience without waiting on any socket.
//! - Sessions attach and detach through commands, so the routing tables need no lock.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use async_nats::{Client, Subscriber};
use herald_shared::subject::Audience;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::delivery::{self, Delivery};
use crate::merge::{MemberId, OrderedMerge};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// A local session as the dispatcher sees it.
pub(crate) struct SessionEntry {
    /// Unique within this gateway.
    pub(crate) key: u64,
    pub(crate) user: Arc<str>,
    pub(crate) outbox: Arc<Outbox>,
}

/// Messages per subscription and their sessions could not be set up (NATS is closed).
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe: {0}")]
pub(crate) struct AttachError(String);

enum Command {
    Attach { session: Arc<SessionEntry>, audiences: Vec<Audience>, done: oneshot::Sender<Result<(), AttachError>> },
    Detach { key: u64, audiences: Vec<Audience> },
    SetMuted { user: Arc<str>, kinds: Vec<String> },
}

/// A cheap handle to the dispatcher task.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    commands: mpsc::Sender<Command>,
    next_key: Arc<AtomicU64>,
}

impl Dispatcher {
    /// Starts the dispatcher task on `client`.
    pub(crate) fn start(client: Client, metrics: Arc<Metrics>) -> Dispatcher {
        let (commands, receiver) = mpsc::channel(1024);
        let task = DispatchTask {
            client,
            commands: receiver,
            merge: OrderedMerge::new(delivery::live_seq),
            routes: HashMap::new(),
            by_member: HashMap::new(),
            muted: HashMap::new(),
            metrics,
        };
        tokio::spawn(tokio::task::unconstrained(task.run()));
        Dispatcher { commands, next_key: Arc::new(AtomicU64::new(1)) }
    }

    /// A fresh session key.
    pub(crate) fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Feeds `session` from the subscriptions of `audiences`, subscribing where needed. Returns once
    /// the subscriptions are queued on the NATS connection, so any request sent afterwards on the
    /// same connection reaches the server after them.
    pub(crate) async fn attach(&self, session: Arc<SessionEntry>, audiences: Vec<Audience>) -> Result<(), AttachError> {
        let (done, result) = oneshot::channel();
        self.send(Command::Attach { session, audiences, done }).await;
        result.await.unwrap_or_else(|_| Err(AttachError("the dispatcher stopped".into())))
    }

    /// Stops feeding session `key` from `audiences`; unsubscribes what no session needs any more.
    pub(crate) async fn detach(&self, key: u64, audiences: Vec<Audience>) {
        self.send(Command::Detach { key, audiences }).await;
    }

    /// Sets the kinds `user` muted: `msg` frames of these kinds are not delivered to the user.
    pub(crate) async fn set_muted(&self, user: Arc<str>, kinds: Vec<String>) {
        self.send(Command::SetMuted { user, kinds }).await;
    }

    async fn send(&self, command: Command) {
        // Fails only when the dispatcher is gone, i.e. the gateway is stopping.
        let _ = self.commands.send(command).await;
    }
}

struct Route {
    member: MemberId,
    sessions: SessionList,
    /// The last sequence delivered on this subject, to spot a gap with `Nats-Last-Sequence`.
    last_seq: u64,
}

struct DispatchTask {
    client: Client,
    commands: mpsc::Receiver<Command>,
    merge: OrderedMerge<Subscriber>,
    routes: HashMap<Audience, Route>,
    by_member: HashMap<MemberId, Audience>,
    /// Muted kinds of local users who muted any.
    muted: HashMap<Arc<str>, Vec<String>>,
    metrics: Arc<Metrics>,
}

enum Step {
    Command(Option<Command>),
    Message(MemberId, Option<async_nats::Message>),
}

impl DispatchTask {
    async fn run(mut self) {
        let mut since_yield = 0u32;
        loop {
            let step = poll_fn(|cx| {
                if let Poll::Ready(command) = self.commands.poll_recv(cx) {
                    return Poll::Ready(Step::Command(command));
                }
                self.merge.poll_next(cx).map(|(member, message)| Step::Message(member, message))
            })
            .await;
            match step {
                Step::Command(None) => break,
                Step::Command(Some(command)) => self.handle(command).await,
                Step::Message(member, message) => self.deliver(member, message),
            }
            // Outside tokio's budget, so give the worker thread back now and then.
            since_yield += 1;
            if since_yield == 256 {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        debug!("dispatcher stopped");
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Attach { session, audiences, done } => {
                let result = self.attach(session, audiences).await;
                let _ = done.send(result);
            }
            Command::Detach { key, audiences } => {
                for audience in audiences {
                    self.remove_from_route(&audience, key);
                }
            }
            Command::SetMuted { user, kinds } => {
                if kinds.is_empty() {
                    self.muted.remove(&user);
                } else {
                    self.muted.insert(user, kinds);
                }
            }
        }
    }

    async fn attach(&mut self, session: Arc<SessionEntry>, audiences: Vec<Audience>) -> Result<(), AttachError> {
        for audience in audiences {
            if !self.routes.contains_key(&audience) {
                let subscriber =
                    self.client.subscribe(audience.deliver_subject()).await.map_err(|e| AttachError(e.to_string()))?;
                let member = self.merge.insert(subscriber);
                self.by_member.insert(member, audience.clone());
                self.routes.insert(audience.clone(), Route { member, sessions: SessionList::default(), last_seq: 0 });
                self.metrics.subscriptions.set(self.routes.len() as i64);
            }
            if let Some(route) = self.routes.get_mut(&audience) {
                route.sessions.insert(session.clone());
            }
        }
        Ok(())
    }

    fn remove_from_route(&mut self, audience: &Audience, key: u64) {
        let Some(route) = self.routes.get_mut(audience) else { return };
        route.sessions.remove(key);
        if route.sessions.is_empty() {
            let member = route.member;
            self.routes.remove(audience);
            self.by_member.remove(&member);
            // Dropping the subscriber unsubscribes it.
            self.merge.remove(member);
            self.metrics.subscriptions.set(self.routes.len() as i64);
        }
    }

    fn deliver(&mut self, member: MemberId, message: Option<async_nats::Message>) {
        let Some(audience) = self.by_member.get(&member) else { return };
        let Some(route) = self.routes.get_mut(audience) else { return };
        let Some(message) = message else {
            warn!(subject = %audience.deliver_subject(), "delivery subscription ended");
            return;
        };
        let Some(delivery) = delivery::from_live(&message, audience) else {
            warn!(subject = %message.subject, "message without a stream sequence ignored");
            return;
        };
        if let Some(previous) = delivery.previous_on_subject {
            if route.last_seq != 0 && previous > route.last_seq {
                self.metrics.delivery_gaps.inc();
                warn!(subject = %message.subject, after = route.last_seq, before = delivery.seq, "gap on subject");
            }
        }
        route.last_seq = route.last_seq.max(delivery.seq);
        self.metrics.messages_in.inc();
        fan_out(&route.sessions, &delivery, &self.muted, &self.metrics);
    }
}

fn fan_out(sessions: &SessionList, delivery: &Delivery, muted: &HashMap<Arc<str>, Vec<String>>, metrics: &Metrics) {
    let check_muted = !delivery.kind.is_empty() && !muted.is_empty();
    let mut sent = 0u64;
    for session in sessions.iter() {
        if check_muted && muted.get(&session.user).is_some_and(|kinds| kinds.contains(&delivery.kind)) {
            continue;
        }
        session.outbox.push_live(delivery.seq, &delivery.frame);
        sent += 1;
    }
    metrics.messages_out.inc_by(sent);
    metrics.bytes_out.inc_by(sent * delivery.frame.len() as u64);
}

/// Sessions of one route: a vector to iterate fast, with an index to remove in O(1).
#[derive(Default)]
struct SessionList {
    sessions: Vec<Arc<SessionEntry>>,
    position: HashMap<u64, usize>,
}

impl SessionList {
    fn insert(&mut self, session: Arc<SessionEntry>) {
        if self.position.contains_key(&session.key) {
            return;
        }
        self.position.insert(session.key, self.sessions.len());
        self.sessions.push(session);
    }

    fn remove(&mut self, key: u64) {
        let Some(index) = self.position.remove(&key) else { return };
        self.sessions.swap_remove(index);
        if let Some(moved) = self.sessions.get(index) {
            self.position.insert(moved.key, index);
        }
    }

    fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<SessionEntry>> {
        self.sessions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: u64) -> Arc<SessionEntry> {
        Arc::new(SessionEntry { key, user: "u".into(), outbox: Arc::new(Outbox::new(1024)) })
    }

    #[test]
    fn session_list_removes_in_place() {
        let mut list = SessionList::default();
        for key in 1..=4 {
            list.insert(entry(key));
        }
        list.insert(entry(2));
        list.remove(1);
        list.remove(9);
        let mut keys: Vec<u64> = list.iter().map(|s| s.key).collect();
        keys.sort();
        assert_eq!(keys, vec![2, 3, 4]);
        list.remove(4);
        list.remove(2);
        list.remove(3);
        assert!(list.is_empty());
    }
}
