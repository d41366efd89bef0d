//! The dispatcher: one task that owns this gateway's delivery subscriptions and the map from each
//! of them to the local sessions it feeds.
//!
//! - One subscription per audience (a user, a topic, `all`), taken when its first local session
//!   attaches and dropped after its last one leaves; all of them on the delivery [`Feed`], whose
//!   messages arrive in stream order.
//! - Each message is encoded once into a frame and queued on every session of its audience without
//!   waiting on any socket.
//! - Sessions attach and detach through commands, so the routing tables need no lock.
//! - A message lost between the stream and this gateway is repaired from the stream: a gap in a
//!   subject's `Nats-Last-Sequence` chain, or a reconnection of the feed, puts the sessions
//!   concerned on hold and asks them to replay from their last `seq`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use herald_shared::subject::Audience;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::delivery::feed::{Feed, FeedEvent};
use crate::delivery::message::{self, Delivery};
use crate::delivery::outbox::Outbox;
use crate::http::metrics::Metrics;

/// Messages delivered before the writers they fed are woken, at most (see `wake_writers`).
const WAKE_EVERY: u32 = 32;

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
    /// Up to which seq a replay under way (the join, a repair) will bring the session everything:
    /// `u64::MAX` while it has not read the stream's bounds yet (it will cover anything stored by
    /// then), 0 when none is under way. A gap it covers is no loss.
    replay_covers: AtomicU64,
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
            // A new session joins: its first replay is under way.
            replay_covers: AtomicU64::new(u64::MAX),
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
        self.replay_covers.store(u64::MAX, Ordering::Release);
        if !self.repair_pending.swap(true, Ordering::AcqRel) {
            self.outbox.hold();
            self.repair.notify_one();
        }
    }

    /// Called by the session as its repair starts: a later gap asks for another one.
    pub(crate) fn repair_started(&self) {
        self.repair_pending.store(false, Ordering::Release);
    }

    /// The replay under way read the stream's bounds: it covers everything up to `last`, unless
    /// another repair was asked for meanwhile.
    pub(crate) fn replay_reads_through(&self, last: u64) {
        if !self.repair_pending.load(Ordering::Acquire) {
            let _ = self.replay_covers.compare_exchange(u64::MAX, last, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The replay under way is over (its coverage now shows in the outbox's `complete_through`).
    pub(crate) fn replay_done(&self) {
        if !self.repair_pending.load(Ordering::Acquire) {
            self.replay_covers.store(0, Ordering::Release);
        }
    }
}

/// What attaching did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The session is its user's first on this gateway (load the user's preferences).
    pub(crate) first_of_user: bool,
}

/// The session could not be attached (the dispatcher stopped).
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
}

/// A cheap handle to the dispatcher task.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    commands: mpsc::Sender<Command>,
    next_key: Arc<AtomicU64>,
}

impl Dispatcher {
    /// Starts the dispatcher task, subscribing on `feed` and delivering what `events` brings.
    pub(crate) fn start(feed: Feed, events: mpsc::Receiver<FeedEvent>, metrics: Arc<Metrics>) -> Dispatcher {
        let (commands, receiver) = mpsc::channel(1024);
        let task = DispatchTask {
            commands: receiver,
            events,
            feed,
            routes: HashMap::new(),
            by_sid: HashMap::new(),
            sessions: HashMap::new(),
            muted: HashMap::new(),
            connected_before: false,
            to_wake: Vec::new(),
            metrics,
        };
        tokio::spawn(task.run());
        Dispatcher { commands, next_key: Arc::new(AtomicU64::new(1)) }
    }

    /// A fresh session key.
    pub(crate) fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Feeds `session` from the subscriptions of `audiences`, subscribing where needed. Returns once
    /// the subscriptions are queued on the feed, so a request sent on the feed afterwards reaches
    /// the server after them.
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

    async fn send(&self, command: Command) {
        // Fails only when the dispatcher is gone, i.e. the gateway is stopping.
        let _ = self.commands.send(command).await;
    }
}

struct Route {
    /// The route's subscription on the feed.
    sid: u64,
    sessions: SessionList,
    /// The last sequence delivered on this subject, to spot a gap with `Nats-Last-Sequence`.
    last_seq: u64,
}

struct DispatchTask {
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<FeedEvent>,
    feed: Feed,
    routes: HashMap<Audience, Route>,
    by_sid: HashMap<u64, Audience>,
    /// Every attached session.
    sessions: HashMap<u64, Arc<SessionEntry>>,
    /// Muted kinds of local users who muted any, with the KV revision they came from.
    muted: HashMap<Arc<str>, (u64, Vec<String>)>,
    /// The feed connected once already: its next connection is a reconnection.
    connected_before: bool,
    /// Outboxes given frames since the writers were last woken (see [`DispatchTask::wake_writers`]).
    to_wake: Vec<Arc<Outbox>>,
    metrics: Arc<Metrics>,
}

impl DispatchTask {
    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    // A command may wait: the frames queued so far go out meanwhile.
                    self.wake_writers();
                    self.handle(command).await;
                }
                event = self.events.recv() => {
                    let Some(event) = event else { break };
                    self.on_event(event);
                    // The rest of the burst the feed already queued, then the writers.
                    for _ in 1..WAKE_EVERY {
                        let Ok(event) = self.events.try_recv() else { break };
                        self.on_event(event);
                    }
                    self.wake_writers();
                }
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

    fn on_event(&mut self, event: FeedEvent) {
        match event {
            FeedEvent::Message(message) => self.deliver(message),
            FeedEvent::Connected => {
                // What was published while the feed was away never reached this gateway.
                if std::mem::replace(&mut self.connected_before, true) {
                    self.repair_all("the delivery feed reconnected to NATS");
                }
            }
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
            let route = self.routes.entry(audience.clone()).or_insert_with(|| {
                let sid = self.feed.next_sid();
                self.feed.subscribe(sid, audience.deliver_subject());
                self.by_sid.insert(sid, audience.clone());
                Route { sid, sessions: SessionList::default(), last_seq: 0 }
            });
            route.sessions.insert(session.clone());
        }
        self.metrics.subscriptions.set(self.routes.len() as i64);
        Ok(Attached { first_of_user })
    }

    fn remove_from_route(&mut self, audience: &Audience, key: u64) {
        let Some(route) = self.routes.get_mut(audience) else { return };
        route.sessions.remove(key);
        if route.sessions.is_empty() {
            let sid = route.sid;
            self.routes.remove(audience);
            if let Audience::User(user) = audience {
                self.muted.remove(user.as_str());
            }
            self.by_sid.remove(&sid);
            self.feed.unsubscribe(sid);
            self.metrics.subscriptions.set(self.routes.len() as i64);
        }
    }

    fn deliver(&mut self, message: crate::delivery::feed::Delivered) {
        // A message for a subscription just dropped: nobody here wants it any more.
        let Some(audience) = self.by_sid.get(&message.sid) else { return };
        let Some(route) = self.routes.get_mut(audience) else { return };
        let Some(delivery) = message::from_live(&message, audience) else {
            warn!(subject = %String::from_utf8_lossy(&message.subject), "message without a stream sequence ignored");
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
        let covered = complete_through.max(session.replay_covers.load(Ordering::Acquire));
        let uncovered = first_missing.max(covered.saturating_add(1));
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
        if outbox.push_live(delivery.seq, &delivery.frame, &delivery.kind) {
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
