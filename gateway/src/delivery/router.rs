//! The router: one task that owns this gateway's delivery subscriptions and sends each message it
//! reads from the [`Feed`] where its sessions will find it.
//!
//! - One subscription per audience (a user, a topic, `all`), taken when its first local session
//!   attaches and dropped after its last one leaves; all of them on the delivery feed, whose
//!   messages arrive in stream order.
//! - A user's own messages go to the mailbox of each of the user's sessions (a user has few).
//!   `push.all` and topic messages are appended once to the audience's broadcast [`Log`], which
//!   every interested session reads at its own position: no work per socket here.
//! - After each burst of messages the router publishes the [`Watermark`] (every message up to it
//!   has been routed) and wakes the sessions waiting for more. Sessions merge their sources in
//!   stream order up to the watermark.
//! - A message lost between the stream and this gateway becomes a gap entry in the same place
//!   (a subject's `Nats-Last-Sequence` names a predecessor that never came, or the stream's new
//!   leader stores a message of a subject past what was routed: see [`super::leader`]); a
//!   reconnection of the feed asks every session to catch up from the stream.
//! - Sessions attach and detach through commands, so the routing tables need no lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_shared::subject::Audience;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::feed::{Delivered, Feed, FeedEvent};
use super::log::{Log, LogLimits};
use super::mailbox::{Event, Mailbox};
use super::message::{self, Live, Message};
use crate::cluster::user::LocalUser;
use crate::http::metrics::Metrics;

/// Messages routed before the sessions they fed are woken, at most (see `finish_burst`).
const BURST: u32 = 32;
/// How long live delivery waits for a new leader of the stream to say what it stores (the
/// watermark is held meanwhile); the leader is still asked after it, without holding.
const CHECK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// How many times a leader that could not answer is asked again (a moment apart, the stream may
/// be electing another one), before every session catches up instead: a catch-up cannot find what
/// the old leader stored behind messages already sent, only the question can.
const CHECK_RETRIES: u32 = 3;
const CHECK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a question asked without holding live delivery waits for its answer.
const UNHELD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// How far sessions may read their sources: every message up to it is in them. It is the highest
/// sequence routed, except while a leader check holds it lower; `routed` is that highest sequence
/// all the same, for what must know what this gateway has seen (a stream's bounds read behind it
/// are stale).
#[derive(Debug, Default)]
pub(crate) struct Watermark {
    visible: AtomicU64,
    routed: AtomicU64,
}

impl Watermark {
    pub(crate) fn get(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// The highest sequence routed, held or not.
    pub(crate) fn routed(&self) -> u64 {
        self.routed.load(Ordering::Acquire)
    }

    /// Back to nothing routed: the stream was made again.
    fn reset(&self) {
        self.routed.store(0, Ordering::Release);
        self.visible.store(0, Ordering::Release);
    }

    fn raise(&self, visible: u64, routed: u64) {
        self.routed.fetch_max(routed, Ordering::AcqRel);
        self.visible.fetch_max(visible, Ordering::AcqRel);
    }
}

/// A broadcast log a session reads, and where it starts.
pub(crate) struct LogStart {
    pub(crate) audience: Audience,
    pub(crate) log: Arc<Log>,
    pub(crate) position: u64,
    /// What had been routed when the session started reading: the log brings what comes after,
    /// so a gap at or below it is older than the session's subscription.
    pub(crate) routed: u64,
}

impl std::fmt::Debug for LogStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStart").field("audience", &self.audience).field("position", &self.position).finish()
    }
}

/// What attaching gave a session.
pub(crate) struct Attached {
    /// The session is its user's first on this gateway (load the user's preferences).
    pub(crate) first_of_user: bool,
    /// The user's state on this gateway, shared by their sessions.
    pub(crate) user: Arc<LocalUser>,
    /// The broadcast logs of the broadcast audiences attached, at their current end.
    pub(crate) logs: Vec<LogStart>,
}

/// The session could not be attached (the router stopped).
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe: the router stopped")]
pub(crate) struct AttachError;

/// How a session attaches: what a route made for it may take for granted before its first
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attaching {
    /// The session replays up to bounds read after subscribing (a join, a `sub` with `since`), so
    /// at least up to the watermark of the moment. A new route's first message naming a
    /// predecessor past that is a gap (the bounds were stale, or the predecessor was lost on the
    /// way).
    Replaying,
    /// A `sub` without `since`, which promises only what comes after it: a gap found by the
    /// route's first message is not owed to its session (a message stored before the `sub` took
    /// effect on the server would be a false loss for it). Alone on a route, it is not checked.
    Live,
}

enum Command {
    Attach {
        key: u64,
        user: Arc<str>,
        mailbox: Arc<Mailbox>,
        audiences: Vec<Audience>,
        attaching: Attaching,
        done: oneshot::Sender<Attached>,
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
    /// After a leader change: routed subjects whose last stored sequence is past what was routed.
    /// `stream`: the [`RouterTask::stream`] it was asked about.
    StoredPast {
        behind: Vec<(Audience, u64)>,
        stream: u64,
    },
    /// See [`Router::check_stored`].
    CheckStored,
    /// The new leader could not say what it stores, for `why`: every session catches up.
    CheckFailed {
        why: String,
        stream: u64,
    },
    /// The stream was made again: its sequences start over.
    StreamReplaced,
}

/// A cheap handle to the router task.
#[derive(Clone)]
pub(crate) struct Router {
    commands: mpsc::Sender<Command>,
    next_key: Arc<AtomicU64>,
    watermark: Arc<Watermark>,
}

impl Router {
    /// Starts the router task, subscribing on `feed` and routing what `events` brings.
    pub(crate) fn start(
        feed: Feed,
        events: mpsc::Receiver<FeedEvent>,
        limits: LogLimits,
        metrics: Arc<Metrics>,
    ) -> Router {
        let (commands, receiver) = mpsc::channel(1024);
        let task = RouterTask::new(feed, events, (commands.downgrade(), receiver), limits, metrics);
        let watermark = task.watermark.clone();
        tokio::spawn(task.run());
        Router { commands, next_key: Arc::new(AtomicU64::new(1)), watermark }
    }

    /// A fresh session key.
    pub(crate) fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// The highest sequence routed so far.
    pub(crate) fn watermark(&self) -> &Watermark {
        &self.watermark
    }

    /// Routes the messages of `audiences` to session `key` from now on, subscribing where needed.
    /// Returns once the subscriptions are queued on the feed, so that a request sent on the feed
    /// afterwards reaches the server after them.
    pub(crate) async fn attach(
        &self,
        key: u64,
        user: Arc<str>,
        mailbox: Arc<Mailbox>,
        audiences: Vec<Audience>,
        attaching: Attaching,
    ) -> Result<Attached, AttachError> {
        let (done, attached) = oneshot::channel();
        self.send(Command::Attach { key, user, mailbox, audiences, attaching, done }).await;
        attached.await.map_err(|_| AttachError)
    }

    /// Stops routing `audiences` to session `key`; unsubscribes what no session needs any more.
    /// With `forget`, the session is gone for good (not just leaving a topic).
    pub(crate) async fn detach(&self, key: u64, audiences: Vec<Audience>, forget: bool) {
        self.send(Command::Detach { key, audiences, forget }).await;
    }

    /// Sets the kinds `user` muted, as of KV `revision` (older revisions are ignored).
    pub(crate) async fn set_muted(&self, user: Arc<str>, kinds: Vec<String>, revision: u64) {
        self.send(Command::SetMuted { user, kinds, revision }).await;
    }

    /// The stream was deleted and made again (NATS lost its store, say): every session ends, its
    /// loss noted, and routing starts over with the new stream's sequences.
    pub(crate) async fn stream_replaced(&self) {
        self.send(Command::StreamReplaced).await;
    }

    /// Asks the stream's leader which routed subjects have messages stored past what was routed,
    /// as after a leader change: their sessions catch up.
    pub(crate) async fn check_stored(&self) {
        self.send(Command::CheckStored).await;
    }

    async fn send(&self, command: Command) {
        // Fails only when the router is gone, i.e. the gateway is stopping.
        let _ = self.commands.send(command).await;
    }
}

struct Route {
    /// The route's subscription on the feed.
    sid: u64,
    /// The last sequence routed on this subject, to spot a gap with `Nats-Last-Sequence`.
    last_seq: u64,
    /// The watermark when the route was made: its sessions' joins replay the subject's messages up
    /// to it (and further), so it accounts for them as `last_seq` does for routed ones.
    made_at: u64,
    /// How far a leader check put a gap on this subject (what it covers needs no other gap).
    gap_through: u64,
    /// A replaying session attached before its first message: that message is checked against
    /// `made_at` (a gap found so is owed only to replaying sessions).
    joined: bool,
    target: Target,
}

impl Route {
    /// The last sequence of the subject a message's predecessor must not be past; none before
    /// the first message of a route made by a `sub`.
    fn predecessor_floor(&self) -> Option<u64> {
        let routed = match (self.last_seq, self.joined) {
            (0, false) => return None,
            (0, true) => self.made_at,
            (last, _) => last,
        };
        Some(routed.max(self.gap_through))
    }

    /// The last sequence of the subject the route accounts for.
    fn accounted(&self) -> u64 {
        self.last_seq.max(self.made_at).max(self.gap_through)
    }
}

/// Where a route's messages go.
enum Target {
    /// A user's messages: the mailbox of each of the user's sessions.
    Personal { mailboxes: Vec<(u64, Arc<Mailbox>)> },
    /// `push.all` or a topic: one log, read by the sessions in `readers`.
    Broadcast { log: Arc<Log>, readers: HashSet<u64> },
}

impl Target {
    fn is_empty(&self) -> bool {
        match self {
            Target::Personal { mailboxes, .. } => mailboxes.is_empty(),
            Target::Broadcast { readers, .. } => readers.is_empty(),
        }
    }
}

/// What a burst of messages touched: the sessions to wake at its end, and the entries for each
/// broadcast log, appended (and their readers woken) at its end.
#[derive(Default)]
struct Burst {
    mailboxes: Vec<Arc<Mailbox>>,
    logs: Vec<(Arc<Log>, Vec<Live>)>,
    /// The highest sequence routed in the burst.
    max_seq: u64,
}

struct RouterTask {
    commands: mpsc::Receiver<Command>,
    /// For answers of the router's own background work (it must not keep its channel open).
    own_commands: mpsc::WeakSender<Command>,
    events: mpsc::Receiver<FeedEvent>,
    feed: Feed,
    limits: LogLimits,
    routes: HashMap<Audience, Route>,
    by_sid: HashMap<u64, Audience>,
    /// Every attached session's mailbox.
    sessions: HashMap<u64, Arc<Mailbox>>,
    /// Users with a session here.
    users: HashMap<Arc<str>, Arc<LocalUser>>,
    /// The feed connected once already: its next connection is a reconnection.
    connected_before: bool,
    burst: Burst,
    /// The highest sequence routed (or gap placed); the watermark, unless a leader check holds it.
    routed: u64,
    /// Leader checks under way (see [`RouterTask::check_stored_past`]).
    checking: Option<Checking>,
    /// How many times the stream was made again: an answer about an earlier one is ignored.
    stream: u64,
    watermark: Arc<Watermark>,
    metrics: Arc<Metrics>,
}

/// While the stream's new leader is asked what it stores, sessions send nothing past what was
/// routed before: a message the old leader stored but never republished then still goes out
/// before anything newer (the gaps the answer brings come first).
struct Checking {
    /// The watermark held meanwhile.
    at: u64,
    /// The stream changed leader again meanwhile.
    again: bool,
    /// When the first check began: asking again never holds past [`CHECK_PATIENCE`] from it.
    started: tokio::time::Instant,
    /// Whether the watermark is held (until [`CHECK_PATIENCE`] from `started`).
    holds: bool,
    /// Questions in a row that got no answer.
    failures: u32,
}

impl RouterTask {
    fn new(
        feed: Feed,
        events: mpsc::Receiver<FeedEvent>,
        (own_commands, commands): (mpsc::WeakSender<Command>, mpsc::Receiver<Command>),
        limits: LogLimits,
        metrics: Arc<Metrics>,
    ) -> RouterTask {
        RouterTask {
            commands,
            own_commands,
            events,
            feed,
            limits,
            routes: HashMap::new(),
            by_sid: HashMap::new(),
            sessions: HashMap::new(),
            users: HashMap::new(),
            connected_before: false,
            burst: Burst::default(),
            routed: 0,
            checking: None,
            stream: 0,
            watermark: Arc::new(Watermark::default()),
            metrics,
        }
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    self.handle(command);
                }
                event = self.events.recv() => {
                    let Some(event) = event else { break };
                    self.on_event(event);
                    // The rest of the burst the feed already queued, then the wake-ups.
                    for _ in 1..BURST {
                        let Ok(event) = self.events.try_recv() else { break };
                        self.on_event(event);
                    }
                    self.finish_burst();
                }
            }
        }
        self.finish_burst();
        debug!("router stopped");
    }

    /// Appends the burst's broadcast messages to their logs (each log's tied into one
    /// [`Burst`](super::burst::Burst)), publishes the watermark, then wakes every session and log
    /// the burst touched. Waking once per burst rather than per message lets a busy session send a burst in one write.
    fn finish_burst(&mut self) {
        let logs = std::mem::take(&mut self.burst.logs);
        for (log, entries) in &logs {
            let messages: Vec<&Arc<Message>> = entries
                .iter()
                .filter_map(|entry| match entry {
                    Live::Message(message) => Some(message),
                    Live::Gap { .. } => None,
                })
                .collect();
            super::burst::Burst::tie(&messages);
            log.append_all(entries.iter().cloned());
        }
        self.routed = self.routed.max(self.burst.max_seq);
        let held = self.checking.as_ref().filter(|checking| checking.holds);
        self.watermark.raise(held.map_or(self.routed, |checking| checking.at), self.routed);
        for mailbox in self.burst.mailboxes.drain(..) {
            mailbox.wake();
        }
        for (log, _) in logs {
            log.wake_parked();
        }
    }

    fn on_event(&mut self, event: FeedEvent) {
        match event {
            FeedEvent::Message(delivered) => self.route(delivered),
            FeedEvent::Connected => {
                // What was published while the feed was away never reached this gateway.
                if std::mem::replace(&mut self.connected_before, true) {
                    self.repair_all("the delivery feed reconnected to NATS");
                }
            }
            FeedEvent::LeaderElected => self.check_stored_past(),
            // Repaired at the next `Connected`; the router sends no request of its own to lose.
            FeedEvent::Lost { .. } => {}
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Attach { key, user, mailbox, audiences, attaching, done } => {
                let attached = self.attach(key, user, mailbox, audiences, attaching);
                let _ = done.send(attached);
            }
            Command::Detach { key, audiences, forget } => {
                for audience in audiences {
                    self.detach(&audience, key);
                }
                if forget {
                    self.sessions.remove(&key);
                }
            }
            Command::SetMuted { user, kinds, revision } => {
                // Only users with a socket here matter; the others load theirs when they connect.
                if let Some(local) = self.users.get(&user) {
                    local.set_muted(&kinds, revision);
                }
            }
            Command::StoredPast { stream, .. } | Command::CheckFailed { stream, .. } if stream != self.stream => {}
            Command::StoredPast { behind, .. } => self.stored_past(behind),
            Command::CheckFailed { why, .. } => self.check_failed(&why),
            Command::StreamReplaced => self.stream_replaced(),
            Command::CheckStored => self.check_stored_past(),
        }
    }

    /// Asks the stream's new leader, in the background, which routed subjects have messages
    /// stored past what was routed (see [`super::leader`]), holding the watermark meanwhile; the
    /// answer comes back as [`Command::StoredPast`], or, when the leader cannot say in time, as
    /// [`Command::CheckFailed`].
    fn check_stored_past(&mut self) {
        if let Some(routed) = self.begin_check() {
            self.ask(routed, CHECK_PATIENCE, std::time::Duration::ZERO);
        }
    }

    /// Asks the stream's leader, in the background, after `pause` and for `patience` at most in
    /// all, where each route's subject has messages stored past what it accounts for (`routed`).
    fn ask(&self, routed: Vec<(Audience, u64)>, patience: std::time::Duration, pause: std::time::Duration) {
        let (feed, commands, stream) = (self.feed.clone(), self.own_commands.clone(), self.stream);
        tokio::spawn(async move {
            let question = async {
                tokio::time::sleep(pause).await;
                super::leader::stored_past(&feed, routed).await
            };
            let asked = tokio::time::timeout(patience, question).await;
            let command = match asked {
                Ok(Ok(behind)) => Command::StoredPast { behind, stream },
                Ok(Err(error)) => Command::CheckFailed {
                    why: format!("the stream's new leader could not say what it stores ({error})"),
                    stream,
                },
                Err(_) => Command::CheckFailed {
                    why: "the stream's new leader did not say in time what it stores".into(),
                    stream,
                },
            };
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(command).await;
            }
        });
    }

    /// Holds the watermark for a leader check; what each route accounts for, to ask about. One
    /// check at a time: a leader change during a check asks again once it is answered, within the
    /// first check's patience (see [`RouterTask::end_check`]), so that a flapping leader cannot
    /// hold delivery for long.
    fn begin_check(&mut self) -> Option<Vec<(Audience, u64)>> {
        if self.routes.is_empty() {
            return None;
        }
        if let Some(checking) = &mut self.checking {
            checking.again = true;
            return None;
        }
        let started = tokio::time::Instant::now();
        self.checking = Some(Checking { at: self.routed, again: false, started, holds: true, failures: 0 });
        Some(self.accounted())
    }

    fn accounted(&self) -> Vec<(Audience, u64)> {
        self.routes.iter().map(|(audience, route)| (audience.clone(), route.accounted())).collect()
    }

    /// The leader check answered. A leader that changed again meanwhile is asked too; otherwise,
    /// or once past [`CHECK_PATIENCE`], the watermark goes on and every session looks at what
    /// came meanwhile.
    fn end_check(&mut self) {
        let Some(checking) = self.checking.take() else { return };
        if checking.again {
            self.ask_again(Checking { again: false, failures: 0, ..checking }, std::time::Duration::ZERO);
        }
        self.release_if(checking.holds);
    }

    /// The leader could not answer: it is asked again, a moment later, or, after
    /// [`CHECK_RETRIES`] failures, every session catches up.
    fn check_failed(&mut self, why: &str) {
        let Some(checking) = self.checking.take() else { return };
        if checking.failures < CHECK_RETRIES {
            warn!(why, "asking the stream's leader again what it stores");
            let failures = checking.failures + 1;
            self.ask_again(Checking { again: false, failures, ..checking }, CHECK_RETRY_PAUSE);
        } else {
            self.repair_all(why);
        }
        self.release_if(checking.holds);
    }

    /// Asks the stream's leader again, holding the watermark only within the first question's
    /// patience.
    fn ask_again(&mut self, checking: Checking, pause: std::time::Duration) {
        let left = CHECK_PATIENCE.saturating_sub(checking.started.elapsed());
        let holds = checking.holds && left > pause;
        // Without holding, a slow answer (many routed subjects) is waited for longer rather than
        // asked again from the start.
        let patience = if holds { left } else { UNHELD_PATIENCE + pause };
        self.checking = Some(Checking { holds, ..checking });
        self.ask(self.accounted(), patience, pause);
    }

    /// Releases the watermark if it was held (`held`) and is no longer: every session looks at
    /// what came meanwhile.
    fn release_if(&mut self, held: bool) {
        if !held || self.checking.as_ref().is_some_and(|checking| checking.holds) {
            return;
        }
        self.burst.mailboxes.extend(self.sessions.values().cloned());
        for route in self.routes.values() {
            if let Target::Broadcast { log, .. } = &route.target
                && !self.burst.logs.iter().any(|(touched, _)| Arc::ptr_eq(touched, log))
            {
                self.burst.logs.push((log.clone(), Vec::new()));
            }
        }
        self.finish_burst();
    }

    /// A gap in each route whose subject has messages stored past what was routed (unless they
    /// arrived meanwhile): the sessions reading it catch up, or learn what they lost.
    fn stored_past(&mut self, behind: Vec<(Audience, u64)>) {
        for (audience, last) in behind {
            let Some(route) = self.routes.get_mut(&audience) else { continue };
            let first = route.accounted() + 1;
            if first > last {
                continue;
            }
            let subject = audience.push_subject();
            if route.last_seq > 0 {
                self.metrics.delivery_gaps.inc();
                warn!(subject, first, last, "messages the stream stored never reached this gateway");
            } else {
                // Nothing routed on it yet: its sessions' joins replayed up to their own bounds,
                // which the gap is checked against; most likely nothing is missing.
                debug!(subject, first, last, "a new route may have missed what the stream's previous leader stored");
            }
            // Not past what was routed: a message of the subject still on its way is routed when it
            // comes (sessions that caught up meanwhile skip it).
            route.last_seq = route.last_seq.max(last.min(self.routed));
            route.gap_through = last;
            // Sessions read entries up to the watermark: the gap must be under it once the check
            // ends. `first` is at most one past what was routed, so nothing routed later can come
            // before it.
            self.burst.max_seq = self.burst.max_seq.max(first);
            let gap = Live::Gap { first, last, audience: audience.clone(), first_on_route: false };
            place(&mut self.burst, &route.target, vec![gap]);
        }
        self.end_check();
        self.finish_burst();
    }

    /// The stream was made again: nothing routed so far says anything of its sequences. Every
    /// session ends with its loss noted (its resume reports `complete:false`); every route, log and
    /// the watermark start over, and a leader check under way is forgotten.
    fn stream_replaced(&mut self) {
        warn!(sessions = self.sessions.len(), "the stream was made again: every session ends, its loss noted");
        self.metrics.streams_replaced.inc();
        for mailbox in self.sessions.values() {
            mailbox.push_event(Event::StreamReplaced);
        }
        for route in self.routes.values_mut() {
            (route.last_seq, route.made_at, route.gap_through, route.joined) = (0, 0, 0, false);
            // Sessions that come now read a new log; the old one goes with the sessions ending.
            if let Target::Broadcast { log, .. } = &mut route.target {
                *log = Arc::new(Log::new(self.limits));
            }
        }
        self.stream += 1;
        self.checking = None;
        self.burst = Burst::default();
        self.routed = 0;
        self.watermark.reset();
    }

    fn repair_all(&mut self, why: &str) {
        if self.sessions.is_empty() {
            return;
        }
        warn!(sessions = self.sessions.len(), why, "every session catches up from the stream");
        for mailbox in self.sessions.values() {
            mailbox.push_event(Event::Repair);
        }
    }

    fn attach(
        &mut self,
        key: u64,
        user: Arc<str>,
        mailbox: Arc<Mailbox>,
        audiences: Vec<Audience>,
        attaching: Attaching,
    ) -> Attached {
        let first_of_user = !self.users.contains_key(&user);
        let local = self.users.entry(user).or_default().clone();
        self.sessions.insert(key, mailbox.clone());
        let mut logs = Vec::new();
        let made_at = self.watermark.get();
        for audience in audiences {
            let route = self.routes.entry(audience.clone()).or_insert_with(|| {
                let sid = self.feed.next_sid();
                self.feed.subscribe(sid, audience.deliver_subject());
                self.by_sid.insert(sid, audience.clone());
                let target = match &audience {
                    // Sized for one: a user rarely has two connections on one gateway.
                    Audience::User(_) => Target::Personal { mailboxes: Vec::with_capacity(1) },
                    _ => Target::Broadcast { log: Arc::new(Log::new(self.limits)), readers: HashSet::new() },
                };
                Route { sid, last_seq: 0, made_at, gap_through: 0, joined: attaching == Attaching::Replaying, target }
            });
            route.joined |= attaching == Attaching::Replaying;
            match &mut route.target {
                Target::Personal { mailboxes, .. } => {
                    if !mailboxes.iter().any(|(known, _)| *known == key) {
                        mailboxes.push((key, mailbox.clone()));
                    }
                }
                Target::Broadcast { log, readers } => {
                    readers.insert(key);
                    logs.push(LogStart { audience, log: log.clone(), position: log.end(), routed: self.routed });
                }
            }
        }
        self.metrics.subscriptions.set(self.routes.len() as i64);
        Attached { first_of_user, user: local, logs }
    }

    fn detach(&mut self, audience: &Audience, key: u64) {
        let Some(route) = self.routes.get_mut(audience) else { return };
        match &mut route.target {
            Target::Personal { mailboxes, .. } => mailboxes.retain(|(known, _)| *known != key),
            Target::Broadcast { readers, .. } => {
                readers.remove(&key);
            }
        }
        if route.target.is_empty() {
            let sid = route.sid;
            self.routes.remove(audience);
            if let Audience::User(user) = audience {
                self.users.remove(user.as_str());
            }
            self.by_sid.remove(&sid);
            self.feed.unsubscribe(sid);
            self.metrics.subscriptions.set(self.routes.len() as i64);
        }
    }

    fn route(&mut self, delivered: Delivered) {
        // A message for a subscription just dropped: nobody here wants it any more.
        let Some(audience) = self.by_sid.get(&delivered.sid) else { return };
        let Some(route) = self.routes.get_mut(audience) else { return };
        let Some(republished) = message::from_live(&delivered, audience) else {
            warn!(subject = %String::from_utf8_lossy(&delivered.subject), "message without a stream sequence ignored");
            return;
        };
        let seq = republished.message.seq;
        let mut entries = Vec::with_capacity(2);
        if let Some(previous) = republished.previous_on_subject
            && let Some(known) = route.predecessor_floor()
            && previous > known
        {
            if route.last_seq == 0 {
                // Most often the joins' replays read it: they tell.
                debug!(first = known + 1, last = previous, "a new route's first message follows one not routed");
            } else {
                self.metrics.delivery_gaps.inc();
                warn!(first_missing = known + 1, last_missing = previous, "gap on a delivery subject");
            }
            let first_on_route = route.last_seq == 0;
            entries.push(Live::Gap { first: known + 1, last: previous, audience: audience.clone(), first_on_route });
        }
        if seq <= route.last_seq {
            // Sent again (a redelivery after a reconnection): sessions have it already.
            return;
        }
        route.last_seq = seq;
        self.metrics.messages_in.inc();
        entries.push(Live::Message(Arc::new(republished.message)));
        self.burst.max_seq = self.burst.max_seq.max(seq);
        place(&mut self.burst, &route.target, entries);
    }
}

/// Puts `entries` where `target`'s sessions read them: their mailboxes now, or its log at the
/// burst's end.
fn place(burst: &mut Burst, target: &Target, entries: Vec<Live>) {
    match target {
        Target::Personal { mailboxes, .. } => {
            for (_, mailbox) in mailboxes {
                for entry in &entries {
                    if mailbox.push(entry.clone()) {
                        burst.mailboxes.push(mailbox.clone());
                    }
                }
            }
        }
        Target::Broadcast { log, .. } => match burst.logs.iter_mut().find(|(touched, _)| Arc::ptr_eq(touched, log)) {
            Some((_, pending)) => pending.extend(entries),
            None => burst.logs.push((log.clone(), entries)),
        },
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use herald_shared::nats::NatsSettings;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::session::live::{Flow, Found, LiveSources};

    /// A router whose feed dials nowhere: the test hands it what NATS would deliver.
    fn router(shutdown: &CancellationToken) -> RouterTask {
        let settings = NatsSettings { nats_url: "nats://127.0.0.1:1".into(), ..NatsSettings::default() };
        let (events_sender, events) = mpsc::channel(8);
        let feed = Feed::start(&settings, "test".into(), events_sender, true, shutdown.clone());
        let (commands_sender, commands) = mpsc::channel(8);
        let limits = LogLimits { entries: 100, bytes: 1 << 20 };
        RouterTask::new(feed, events, (commands_sender.downgrade(), commands), limits, Arc::new(Metrics::new()))
    }

    /// What the republish of message `seq` on `audience`'s route looks like.
    fn republished(router: &RouterTask, audience: &Audience, seq: u64) -> Delivered {
        let headers = format!("NATS/1.0\r\nNats-Sequence: {seq}\r\nNats-Time-Stamp: t\r\n\r\n");
        let sid = router.routes[audience].sid;
        Delivered { sid, subject: Bytes::from_static(b"x"), headers: Bytes::from(headers), payload: Bytes::from("1") }
    }

    /// The republish of message `seq` on `audience`'s route whose subject's previous message is
    /// `previous`.
    fn republished_after(router: &RouterTask, audience: &Audience, seq: u64, previous: u64) -> Delivered {
        let mut delivered = republished(router, audience, seq);
        let headers = format!("NATS/1.0\r\nNats-Sequence: {seq}\r\nNats-Last-Sequence: {previous}\r\n\r\n");
        delivered.headers = Bytes::from(headers);
        delivered
    }

    #[tokio::test]
    async fn a_stream_made_again_ends_every_session_and_routes_its_sequences_afresh() {
        let shutdown = CancellationToken::new();
        let mut router = router(&shutdown);
        let old = Arc::new(Mailbox::new(1 << 20));
        router.attach(1, "u".into(), old.clone(), vec![Audience::All], Attaching::Replaying);
        for seq in 1..=5 {
            router.route(republished(&router, &Audience::All, seq));
        }
        router.finish_burst();
        assert_eq!((router.watermark.get(), router.watermark.routed()), (5, 5));
        router.handle(Command::StreamReplaced);
        assert!(matches!(old.inbox().take_events().as_slice(), [Event::StreamReplaced]));
        assert_eq!((router.watermark.get(), router.watermark.routed()), (0, 0));
        // A session that comes before the old one has left reads the new stream from its start.
        let new = Arc::new(Mailbox::new(1 << 20));
        let attached = router.attach(2, "v".into(), new.clone(), vec![Audience::All], Attaching::Replaying);
        let mut sources = LiveSources::new(new, attached.logs);
        router.route(republished(&router, &Audience::All, 1));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["1"]);
        assert_eq!(router.watermark.get(), 1);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_first_message_whose_predecessor_a_join_did_not_replay_is_a_gap_unless_only_subs_share_the_route() {
        let shutdown = CancellationToken::new();
        let mut router = router(&shutdown);
        let (user, topic) = (Audience::User("u".into()), Audience::Topic("t".into()));
        let all = Arc::new(Mailbox::new(1 << 20));
        router.attach(9, "v".into(), all.clone(), vec![Audience::All], Attaching::Replaying);
        router.route(republished(&router, &Audience::All, 7));
        router.finish_burst();
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let attached = router.attach(1, "u".into(), mailbox.clone(), vec![user.clone()], Attaching::Replaying);
        let mut sources = LiveSources::new(mailbox.clone(), attached.logs);
        // The join replayed up to bounds read after subscribing (7 at least); the user's first
        // live message names 9 as its predecessor, which never came live.
        router.route(republished_after(&router, &user, 10, 9));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["first gap 8-9", "10"]);
        // A predecessor the join's replay read is no gap.
        router.attach(1, "u".into(), mailbox.clone(), vec![Audience::User("w".into())], Attaching::Replaying);
        router.route(republished_after(&router, &Audience::User("w".into()), 11, 6));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["11"]);
        // A `sub` sharing a route a join made leaves it checked: the gap is the join's, and the
        // `sub`'s session knows it is not owed to it.
        let attached = router.attach(1, "u".into(), mailbox.clone(), vec![topic.clone()], Attaching::Replaying);
        let live = router.attach(2, "v".into(), Arc::new(Mailbox::new(1 << 20)), vec![topic.clone()], Attaching::Live);
        let mut sources = LiveSources::new(Arc::new(Mailbox::new(1 << 20)), attached.logs);
        let mut live = LiveSources::new(Arc::new(Mailbox::new(1 << 20)), live.logs);
        router.route(republished_after(&router, &topic, 13, 12));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["first gap 12-12", "13"]);
        assert_eq!(visited(&router, &mut live), ["first gap 12-12", "13"]);
        // A route only `sub`s share is not checked.
        let attached = router.attach(1, "u".into(), mailbox, vec![Audience::Topic("s".into())], Attaching::Live);
        let mut sources = LiveSources::new(Arc::new(Mailbox::new(1 << 20)), attached.logs);
        router.route(republished_after(&router, &Audience::Topic("s".into()), 15, 14));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["15"]);
        shutdown.cancel();
    }

    /// What a session reading `sources` visits, up to the router's watermark.
    fn visited(router: &RouterTask, sources: &mut LiveSources) -> Vec<String> {
        let mut seen = Vec::new();
        sources.pull(router.watermark.get(), |found| {
            seen.push(match found {
                Found::Entry(Live::Message(message)) => message.seq.to_string(),
                Found::Entry(Live::Gap { first, last, first_on_route: false, .. }) => format!("gap {first}-{last}"),
                Found::Entry(Live::Gap { first, last, first_on_route: true, .. }) => {
                    format!("first gap {first}-{last}")
                }
                other => panic!("unexpected {}", matches!(other, Found::Burst { .. })),
            });
            Flow::Continue
        });
        seen
    }

    #[tokio::test]
    async fn a_leader_check_holds_the_watermark_so_its_gap_comes_before_anything_newer() {
        let shutdown = CancellationToken::new();
        let mut router = router(&shutdown);
        let user = Audience::User("u".into());
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let attached =
            router.attach(1, "u".into(), mailbox.clone(), vec![user.clone(), Audience::All], Attaching::Replaying);
        let mut sources = LiveSources::new(mailbox, attached.logs);
        router.route(republished(&router, &user, 10));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["10"]);

        // The stream changes leader; what the router accounts for is asked about.
        let asked = router.begin_check().unwrap();
        assert!(asked.contains(&(user.clone(), 10)) && asked.contains(&(Audience::All, 0)), "{asked:?}");
        // The new leader's first message reaches the gateway before the answer: it waits.
        router.route(republished(&router, &Audience::All, 12));
        router.finish_burst();
        assert_eq!(router.watermark.get(), 10, "held");
        assert!(visited(&router, &mut sources).is_empty());
        // The answer: the user's subject holds 11, which never came (its old leader failed).
        router.stored_past(vec![(user.clone(), 11)]);
        assert_eq!(router.watermark.get(), 12);
        assert_eq!(visited(&router, &mut sources), ["gap 11-11", "12"]);
        assert_eq!(router.routes[&user].last_seq, 11);
        // A message past what was routed may still be on its way: the route does not skip it.
        router.begin_check().unwrap();
        router.stored_past(vec![(user.clone(), 14)]);
        assert_eq!(router.routes[&user].last_seq, 12);
        router.route(republished(&router, &user, 14));
        router.finish_burst();
        assert_eq!(visited(&router, &mut sources), ["gap 12-14", "14"]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_leader_that_cannot_answer_is_asked_again_then_every_session_catches_up() {
        let shutdown = CancellationToken::new();
        let mut router = router(&shutdown);
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        router.attach(1, "u".into(), mailbox.clone(), vec![Audience::All], Attaching::Replaying);
        router.begin_check().unwrap();
        router.route(republished(&router, &Audience::All, 5));
        router.finish_burst();
        assert_eq!(router.watermark.get(), 0, "held");
        for _ in 0..CHECK_RETRIES {
            router.handle(Command::CheckFailed { why: "test".into(), stream: 0 });
            assert_eq!(router.watermark.get(), 0, "held while asking again within the patience");
            assert!(mailbox.inbox().take_events().is_empty());
        }
        router.handle(Command::CheckFailed { why: "test".into(), stream: 0 });
        assert_eq!(router.watermark.get(), 5);
        assert!(router.checking.is_none());
        assert!(matches!(mailbox.inbox().take_events().as_slice(), [Event::Repair]));
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_change_during_a_check_asks_again_within_the_first_checks_patience() {
        let shutdown = CancellationToken::new();
        let mut router = router(&shutdown);
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        router.attach(1, "u".into(), mailbox.clone(), vec![Audience::All], Attaching::Replaying);
        router.begin_check().unwrap();
        assert!(router.begin_check().is_none(), "one check at a time");
        router.route(republished(&router, &Audience::All, 5));
        router.finish_burst();
        // The first answer: the leader changed meanwhile, so the newest one is asked, still held.
        router.stored_past(Vec::new());
        assert_eq!((router.watermark.get(), router.watermark.routed()), (0, 5), "held");
        assert!(mailbox.inbox().take_events().is_empty());
        // Past the first check's patience, a change meanwhile is asked about without holding: a
        // message it reveals then is behind newer ones, and its sessions are told (not repaired
        // blind, which would hide it).
        assert!(router.begin_check().is_none());
        tokio::time::advance(CHECK_PATIENCE).await;
        router.stored_past(Vec::new());
        assert_eq!(router.watermark.get(), 5, "released");
        assert!(router.checking.as_ref().is_some_and(|checking| !checking.holds), "asked again");
        assert!(mailbox.inbox().take_events().is_empty());
        // That question fails: asked again, still without holding and without a blind repair.
        router.handle(Command::CheckFailed { why: "test".into(), stream: 0 });
        router.route(republished(&router, &Audience::All, 6));
        router.finish_burst();
        assert_eq!(router.watermark.get(), 6, "not held");
        assert!(router.checking.as_ref().is_some_and(|checking| !checking.holds && checking.failures == 1));
        assert!(mailbox.inbox().take_events().is_empty());
        router.stored_past(Vec::new());
        assert!(router.checking.is_none());
        shutdown.cancel();
    }
}
