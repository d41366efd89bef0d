//! The dispatcher: one task that owns this gateway's NATS delivery subscriptions and the map from
//! each of them to the local sessions it feeds.
//!
//! - One subscription per audience (a user, a topic, `all`), taken when its first local session
//!   attaches and dropped after its last one leaves.
//! - Messages are read in stream order across all subscriptions ([`OrderedMerge`]), each encoded
//!   once into a frame, and queued on every session of its audience without waiting on any socket.
//! - Sessions attach and detach through commands, so the routing tables need no lock.
//! - A message lost between the stream and this gateway is repaired from the stream: a gap in a
//!   subject's `Nats-Last-Sequence` chain, a reconnection to NATS, or a subscription buffer that
//!   overflowed puts the sessions concerned on hold and asks them to replay from their last `seq`.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use async_nats::{Client, Subscriber};
use herald_shared::subject::Audience;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::delivery::{self, Delivery};
use crate::merge::{MemberId, OrderedMerge};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Messages delivered before the writers they fed are woken, at most (see `wake_writers`).
const WAKE_EVERY: u32 = 32;
/// Messages handled before the dispatcher gives its worker thread back.
const YIELD_EVERY: u32 = 256;

/// A local session as the dispatcher sees it.
pub(crate) struct SessionEntry {
    /// Unique within this gateway.
    pub(crate) key: u64,
    pub(crate) user: Arc<str>,
    pub(crate) outbox: Arc<Outbox>,
    /// Notified when the session must replay from its last `seq` (its outbox is then on hold).
    pub(crate) repair: Notify,
    /// A repair was asked for and has not started yet.
    repair_pending: AtomicBool,
    /// The first seq of messages this session missed and can no longer get in order (0: none):
    /// its next repair closes it, leaving a note so that its resume reports `complete: false`.
    lost_from: AtomicU64,
}

impl SessionEntry {
    pub(crate) fn new(key: u64, user: Arc<str>, outbox: Arc<Outbox>) -> SessionEntry {
        SessionEntry {
            key,
            user,
            outbox,
            repair: Notify::new(),
            repair_pending: AtomicBool::new(false),
            lost_from: AtomicU64::new(0),
        }
    }

    /// Records that messages from `seq` on were missed behind newer ones, and asks for the repair
    /// that ends the session.
    fn mark_lost(&self, seq: u64) {
        let _ = self
            .lost_from
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |known| (known == 0 || seq < known).then_some(seq));
        self.request_repair();
    }

    /// The first seq marked lost, if any, clearing the mark.
    pub(crate) fn take_lost(&self) -> Option<u64> {
        Some(self.lost_from.swap(0, Ordering::AcqRel)).filter(|&seq| seq != 0)
    }

    /// Holds live delivery and asks the session to repair, once until the repair starts.
    pub(crate) fn request_repair(&self) {
        if !self.repair_pending.swap(true, Ordering::AcqRel) {
            self.outbox.hold();
            self.repair.notify_one();
        }
    }

    /// Called by the session as its repair starts: a later gap asks for another one.
    pub(crate) fn repair_started(&self) {
        self.repair_pending.store(false, Ordering::Release);
    }
}

/// What attaching did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The session is its user's first on this gateway (load the user's preferences).
    pub(crate) first_of_user: bool,
}

/// Messages per subscription and their sessions could not be set up (NATS is closed).
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe: {0}")]
pub(crate) struct AttachError(String);

enum Command {
    Attach {
        session: Arc<SessionEntry>,
        audiences: Vec<Audience>,
        done: oneshot::Sender<Result<Attached, AttachError>>,
    },
    Detach {
        key: u64,
        audiences: Vec<Audience>,
        forget: bool,
    },
    SetMuted {
        user: Arc<str>,
        kinds: Vec<String>,
        revision: u64,
    },
    Muted {
        user: Arc<str>,
        reply: oneshot::Sender<Vec<String>>,
    },
    RepairAll {
        why: &'static str,
    },
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
            commands: receiver,
            merge: OrderedMerge::new(delivery::live_seq),
            routes: HashMap::new(),
            by_member: HashMap::new(),
            sessions: HashMap::new(),
            muted: HashMap::new(),
            connects: client_connects(&client),
            to_wake: Vec::new(),
            client,
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
    pub(crate) async fn attach(
        &self,
        session: Arc<SessionEntry>,
        audiences: Vec<Audience>,
    ) -> Result<Attached, AttachError> {
        let (done, result) = oneshot::channel();
        self.send(Command::Attach { session, audiences, done }).await;
        result.await.unwrap_or_else(|_| Err(AttachError("the dispatcher stopped".into())))
    }

    /// Stops feeding session `key` from `audiences`; unsubscribes what no session needs any more.
    /// With `forget`, the session is gone for good (not just leaving a topic).
    pub(crate) async fn detach(&self, key: u64, audiences: Vec<Audience>, forget: bool) {
        self.send(Command::Detach { key, audiences, forget }).await;
    }

    /// Sets the kinds `user` muted, as of KV `revision` (older revisions are ignored): `msg` frames
    /// of these kinds are not delivered to the user.
    pub(crate) async fn set_muted(&self, user: Arc<str>, kinds: Vec<String>, revision: u64) {
        self.send(Command::SetMuted { user, kinds, revision }).await;
    }

    /// The kinds `user` muted (for replays).
    pub(crate) async fn muted(&self, user: Arc<str>) -> Vec<String> {
        let (reply, result) = oneshot::channel();
        self.send(Command::Muted { user, reply }).await;
        result.await.unwrap_or_default()
    }

    /// Asks every session to repair from the stream (messages may have been lost on the way here).
    pub(crate) async fn repair_all(&self, why: &'static str) {
        self.send(Command::RepairAll { why }).await;
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
    /// Every attached session.
    sessions: HashMap<u64, Arc<SessionEntry>>,
    /// Muted kinds of local users who muted any, with the KV revision they came from.
    muted: HashMap<Arc<str>, (u64, Vec<String>)>,
    /// NATS connections made so far; a change means a reconnection, and messages may be lost.
    connects: u64,
    /// Outboxes given frames since the writers were last woken (see [`DispatchTask::wake_writers`]).
    to_wake: Vec<Arc<Outbox>>,
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
                let next = self.merge.poll_next(cx).map(|(member, message)| Step::Message(member, message));
                if next.is_pending() {
                    // Nothing more for now: the burst is over.
                    self.wake_writers();
                }
                next
            })
            .await;
            match step {
                Step::Command(None) => break,
                Step::Command(Some(command)) => {
                    // A command may wait on NATS: the frames queued so far go out meanwhile.
                    self.wake_writers();
                    self.handle(command).await
                }
                Step::Message(member, message) => self.deliver(member, message),
            }
            since_yield += 1;
            if since_yield.is_multiple_of(WAKE_EVERY) {
                self.wake_writers();
            }
            // Outside tokio's budget, so give the worker thread back now and then.
            if since_yield == YIELD_EVERY {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        self.wake_writers();
        debug!("dispatcher stopped");
    }

    /// Wakes the writers of every outbox that got frames in this burst. Waking once per burst
    /// rather than once per frame lets a writer send a burst's frames to its socket in one write:
    /// under load, far fewer system calls per delivery; when idle, a burst is one message and
    /// nothing waits.
    fn wake_writers(&mut self) {
        for outbox in self.to_wake.drain(..) {
            outbox.wake_writer();
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Attach { session, audiences, done } => {
                let result = self.attach(session, audiences).await;
                let _ = done.send(result);
            }
            Command::Detach { key, audiences, forget } => {
                for audience in audiences {
                    self.remove_from_route(&audience, key);
                }
                if forget {
                    self.sessions.remove(&key);
                }
            }
            Command::SetMuted { user, kinds, revision } => self.set_muted(user, kinds, revision),
            Command::Muted { user, reply } => {
                let _ = reply.send(self.muted.get(&user).map(|(_, kinds)| kinds.clone()).unwrap_or_default());
            }
            Command::RepairAll { why } => self.repair_all(why),
        }
    }

    fn set_muted(&mut self, user: Arc<str>, kinds: Vec<String>, revision: u64) {
        // Only users with a socket here matter; the others load theirs when they connect.
        if !self.routes.contains_key(&Audience::User(user.to_string())) {
            return;
        }
        if self.muted.get(&user).is_some_and(|(known, _)| *known > revision) {
            return;
        }
        self.muted.insert(user, (revision, kinds));
    }

    fn repair_all(&mut self, why: &str) {
        if self.sessions.is_empty() {
            return;
        }
        warn!(sessions = self.sessions.len(), why, "repairing every session from the stream");
        for session in self.sessions.values() {
            session.request_repair();
            self.metrics.repairs.inc();
        }
    }

    async fn attach(&mut self, session: Arc<SessionEntry>, audiences: Vec<Audience>) -> Result<Attached, AttachError> {
        let first_of_user = !self.routes.contains_key(&Audience::User(session.user.to_string()));
        self.sessions.insert(session.key, session.clone());
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
        Ok(Attached { first_of_user })
    }

    fn remove_from_route(&mut self, audience: &Audience, key: u64) {
        let Some(route) = self.routes.get_mut(audience) else { return };
        route.sessions.remove(key);
        if route.sessions.is_empty() {
            let member = route.member;
            self.routes.remove(audience);
            if let Audience::User(user) = audience {
                self.muted.remove(user.as_str());
            }
            self.by_member.remove(&member);
            // Dropping the subscriber unsubscribes it.
            self.merge.remove(member);
            self.metrics.subscriptions.set(self.routes.len() as i64);
        }
    }

    fn deliver(&mut self, member: MemberId, message: Option<async_nats::Message>) {
        self.notice_reconnection();
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
        if let Some(previous) = delivery.previous_on_subject
            && route.last_seq != 0
            && previous > route.last_seq
        {
            repair_gap(route, previous, &self.metrics);
        }
        route.last_seq = route.last_seq.max(delivery.seq);
        self.metrics.messages_in.inc();
        fan_out(&route.sessions, &delivery, &self.muted, &self.metrics, &mut self.to_wake);
    }

    /// A message from a new NATS connection: what was published while disconnected never reached
    /// this gateway, so every session repairs before it gets anything newer.
    fn notice_reconnection(&mut self) {
        let connects = client_connects(&self.client);
        if connects != self.connects {
            // The first connection is no reconnection: no session opened before it.
            let reconnected = self.connects != 0;
            self.connects = connects;
            if reconnected {
                self.repair_all("reconnected to NATS");
            }
        }
    }
}

fn client_connects(client: &Client) -> u64 {
    client.statistics().connects.load(Ordering::Acquire)
}

/// Messages in `(route.last_seq, previous]` on this subject never arrived. For each session, those a
/// replay already covered are fine; if others remain, the session repairs from the stream, unless
/// it has been sent something newer than one of them (from another subject): then they cannot be
/// delivered in order any more, so it is closed with 4008 and its resume says `complete: false`.
fn repair_gap(route: &Route, previous: u64, metrics: &Metrics) {
    metrics.delivery_gaps.inc();
    let first_missing = route.last_seq + 1;
    warn!(first_missing, last_missing = previous, "gap on a delivery subject");
    for session in route.sessions.iter() {
        let (last_seq, complete_through) = session.outbox.positions();
        let uncovered = first_missing.max(complete_through + 1);
        if uncovered > previous {
            continue;
        }
        if last_seq >= uncovered {
            error!(user = %session.user, uncovered, "gap behind newer messages: closing for a resume");
            metrics.unrepairable_gaps.inc();
            session.mark_lost(uncovered);
        } else {
            session.request_repair();
            metrics.repairs.inc();
        }
    }
}

/// Queues `delivery` on every session of the route but those muting its kind; the outboxes whose
/// writers need waking go to `to_wake`.
fn fan_out(
    sessions: &SessionList,
    delivery: &Delivery,
    muted: &HashMap<Arc<str>, (u64, Vec<String>)>,
    metrics: &Metrics,
    to_wake: &mut Vec<Arc<Outbox>>,
) {
    let check_muted = !delivery.kind.is_empty() && !muted.is_empty();
    let mut sent = 0u64;
    for (outbox, session) in sessions.outboxes.iter().zip(&sessions.sessions) {
        if check_muted && muted.get(&session.user).is_some_and(|(_, kinds)| kinds.contains(&delivery.kind)) {
            continue;
        }
        if outbox.push_live(delivery.seq, &delivery.frame) {
            to_wake.push(outbox.clone());
        }
        sent += 1;
    }
    metrics.messages_out.inc_by(sent);
    metrics.bytes_out.inc_by(sent * delivery.frame.len() as u64);
}

/// Sessions of one route: vectors to iterate fast, with an index to remove in O(1). The outboxes
/// are kept apart from the sessions so that a fan-out to thousands of sockets follows one pointer
/// per socket to its queue (profiled at 10,000 sockets: the fan-out loop's share of the samples fell
/// by a third).
#[derive(Default)]
struct SessionList {
    sessions: Vec<Arc<SessionEntry>>,
    /// `sessions[i].outbox`, for every `i`.
    outboxes: Vec<Arc<Outbox>>,
    position: HashMap<u64, usize>,
}

impl SessionList {
    fn insert(&mut self, session: Arc<SessionEntry>) {
        if self.position.contains_key(&session.key) {
            return;
        }
        self.position.insert(session.key, self.sessions.len());
        self.outboxes.push(session.outbox.clone());
        self.sessions.push(session);
    }

    fn remove(&mut self, key: u64) {
        let Some(index) = self.position.remove(&key) else { return };
        self.sessions.swap_remove(index);
        self.outboxes.swap_remove(index);
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
        Arc::new(SessionEntry::new(key, "u".into(), Arc::new(Outbox::new(1024))))
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
