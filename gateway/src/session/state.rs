//! The rules that make one connection exact, as a state machine with no sockets, NATS or clocks
//! inside (the connection's task in [`super`] does the I/O and feeds the results back).
//!
//! - `msg`s leave in increasing `seq`, each at most once: `last_sent` only grows, and anything at
//!   or below it is a duplicate.
//! - Live messages come from the session's [`LiveSources`], merged in stream order up to the
//!   router's watermark. While a replay runs, live sources are not read ("held"): they keep what
//!   arrives, and reading resumes after the replay, past what it sent.
//! - Whatever may have been lost on the way, a gap on a subject, a broadcast log that evicted
//!   entries the session had not read, a mailbox that overflowed, the delivery feed reconnecting,
//!   is repaired by a replay from `last_sent`, unless the missing messages are older than one
//!   already sent: then they cannot be delivered in order any more, the loss is noted for the
//!   client's resume and the connection closes with 4008. A gap counts as no loss only where a
//!   replay read its range completely ([`Coverage`]): not merely because something newer was
//!   sent, since a subject's last message can go missing with nothing after it to tell.
//! - Work that needs the stream (the first replay, repairs, topic joins) runs one job at a time,
//!   in the order asked: each job is a sequence of [`Action`]s whose [`Outcome`]s come back.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use herald_shared::frame::{ServerFrame, error_code};
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::subject::Audience;

use super::bounds::Bounds;
use super::coverage::Coverage;
use super::live::{Flow, Found, LiveSources};
use super::replay;
use crate::close::{Close, CloseCode};
use crate::cluster::cursor::LostNote;
use crate::cluster::user::LocalUser;
use crate::codec::{self, Codec};
use crate::delivery::burst::{Burst, Frames};
use crate::delivery::leader::Stored;
use crate::delivery::mailbox::Event;
use crate::delivery::message::{Live, Message};
use crate::delivery::router::{Attaching, LogStart};

/// Bytes queued for the socket above which the session takes no more replayed messages until the
/// writer catches up: their frames are the session's own.
const HIGH_WATER: usize = 64 * 1024;
/// The same for live messages. Their frames are mostly shared (slices of a burst's buffer, a
/// message's encoding made once per gateway), so a longer queue costs mostly references: a session
/// the broadcast outpaced catches up in fewer, larger writes (at 1,000 sockets, 64 KiB here held
/// fan-out to about four fifths of what 256 KiB allows).
const LIVE_HIGH_WATER: usize = 256 * 1024;
/// Auto-acknowledgements waiting for their frames to be taken, at most.
const MAX_AUTO_ACKS: usize = 8;

/// The user's unread personal messages to count: those in `(read, upto]`, but for the `muted` kinds.
pub(crate) struct UnreadQuestion {
    pub(crate) read: u64,
    pub(crate) upto: u64,
    pub(crate) muted: Arc<[Box<str>]>,
}

/// A count of the user's unread personal messages under way, for the client of this connection:
/// those in `(read, upto]` (the connection had sent everything up to `upto` when it asked), and
/// those sent since.
struct ReadCount {
    read: u64,
    upto: u64,
    asked: bool,
    /// The personal messages past `read` sent since the count was asked for (all past `upto`).
    unread_since: u64,
}

impl ReadCount {
    fn sent(&mut self, message: &Message) {
        if matches!(message.audience, Audience::User(_)) && message.seq > self.read {
            self.unread_since += 1;
        }
    }
}
/// Bytes queued for the socket, and jobs waiting, above which the session reads none of the
/// client's frames until they come down: each frame may queue an answer or a job, and a client that
/// sends without reading would otherwise grow them without bound (its sends then wait on TCP).
const INPUT_HIGH_WATER: usize = 2 * LIVE_HIGH_WATER;
const MAX_WAITING_JOBS: usize = 64;

/// What a resume read of the lost-messages note its device's earlier connections may have left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noted {
    Nothing,
    Lost(LostNote),
    /// KV could not be read: anything may have been lost, and the resume cannot say otherwise.
    Unknown,
}

impl Noted {
    /// The first seq that may have been lost: 0 when that is not known.
    fn lost_from(self) -> Option<u64> {
        match self {
            Noted::Nothing => None,
            Noted::Lost(note) => Some(note.first),
            Noted::Unknown => Some(0),
        }
    }
}

/// Where a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Replay what came after `requested` (a `since`, or the device's cursor); `noted`: what the
    /// device's earlier connections noted as lost.
    Resume { requested: u64, noted: Noted },
    /// A new device: replay the user's personal messages after the read position `read` (the
    /// unread ones; muted kinds are left out as always), then live.
    Unread { read: u64 },
    /// Live from the stream's end.
    Live,
}

/// What a session starts with.
pub(crate) struct Params {
    pub(crate) user: Arc<str>,
    pub(crate) local: Arc<LocalUser>,
    pub(crate) codec: Codec,
    pub(crate) sources: LiveSources,
    /// The topics subscribed at connect.
    pub(crate) topics: Vec<String>,
    /// The token's `topics` claim.
    pub(crate) allowed_topics: Vec<String>,
    pub(crate) max_topics: usize,
    /// The stream's per-subject limit (to tell whether a replay may miss trimmed messages).
    pub(crate) per_subject_cap: i64,
    /// Pings between two writes of the kept topics (0: the codec's clients do not recover them).
    pub(crate) keep_topics_every: u16,
    pub(crate) welcome: ServerFrame,
    /// The stream's bounds, read after the session's subscriptions.
    pub(crate) bounds: Bounds,
    pub(crate) start: Start,
}

/// I/O the session needs; its result comes back as an [`Outcome`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Read the stream's bounds on the delivery connection (after every subscription made),
    /// reaching at least `at_least`, a sequence known to be stored (a gap's end; 0 when none is):
    /// a server answering from a stale view is asked again, and bounds that stay behind fail.
    ReadBounds { at_least: u64 },
    /// Read back the stored messages of `audiences` with `since < seq <= upto`, in order.
    Replay { audiences: Vec<Audience>, since: u64, upto: u64 },
    /// Subscribe the session to `topic` (replaying it from a `since`, or live only).
    Attach { topic: String, attaching: Attaching },
    /// Wait until NATS has the subscriptions made so far.
    Flush,
    /// Unsubscribe the session from `topic`.
    Detach { topic: String },
    /// Find, on the stream's leader, the first stored message of `audience` from `from` on.
    FindStored { audience: Audience, from: u64 },
    /// Note for the device's next resume that messages from `first` on were lost.
    NoteLost { first: u64 },
    /// Keep `topics` as the connection's state, for a client that recovers it (Socket.IO's).
    RememberTopics { topics: Vec<String> },
}

/// The result of an [`Action`].
// A replayed message is the large variant (one encoding slot per wire format): outcomes pass one at
// a time, so boxing it would only add an allocation per replayed message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Outcome {
    Bounds(Result<Bounds, String>),
    /// One replayed message, in order.
    Replayed(Box<Message>),
    /// The replay under way learned, per audience, more messages the stream held from where it
    /// was reading on ([`crate::session::replay::Replay::held_ahead`]), before its next message.
    HeldAhead(Vec<u64>),
    /// The replay read everything (or failed): per audience, the most messages the stream held
    /// from where it was reading on ([`crate::session::replay::Replay::held_ahead`]).
    ReplayEnded(Result<Vec<u64>, String>),
    Attached(Result<LogStart, String>),
    /// NATS has the subscriptions (or the feed is down: it re-subscribes and repairs when back).
    Flushed,
    Detached,
    /// The first stored message found, if any.
    Stored(Result<Option<Stored>, String>),
    Noted,
    /// The topics were kept (or could not be: the failure is logged, the recovery will not find them).
    Remembered,
}

/// Counts for the gateway's metrics, taken with [`SessionState::take_tally`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) delivered: u64,
    pub(crate) delivered_bytes: u64,
    pub(crate) replays: u64,
    pub(crate) replayed: u64,
    pub(crate) replays_incomplete: u64,
    pub(crate) repairs: u64,
    pub(crate) unrepairable: u64,
    /// Of those, the ones the stream could not tell about: the loss was assumed.
    pub(crate) losses_assumed: u64,
}

/// Work that needs the stream or the router, run one at a time.
#[derive(Debug, Clone, PartialEq)]
enum Job {
    /// The connection's first replay.
    Resume {
        since: u64,
        requested: u64,
        lost_from: Option<u64>,
    },
    /// Catch up from `last_sent`: messages may not have reached the session.
    Repair,
    /// Messages of `audience` from `first` on never reached the gateway, and something newer
    /// (up to `through`) was sent already: if one of them is stored at or below `through`, it
    /// can no longer go out in order.
    CheckLoss {
        audience: Audience,
        first: u64,
        through: u64,
    },
    /// Messages from `first` on were missed behind newer ones.
    Lost {
        first: u64,
    },
    Subscribe {
        topic: String,
        since: Option<u64>,
    },
    Unsubscribe {
        topic: String,
    },
    /// The topics changed, and the codec's clients recover them: keep them.
    RememberTopics,
    /// The codec dropped messages of `audience` after `since` that it held for want of a
    /// destination: read them again.
    Refill {
        audience: Audience,
        since: u64,
    },
}

impl Job {
    /// Whether live delivery waits for this job from the moment it is queued.
    fn holds_live(&self) -> bool {
        matches!(self, Job::Resume { .. } | Job::Repair | Job::CheckLoss { .. } | Job::Lost { .. } | Job::Refill { .. })
    }
}

/// What the running job waits for.
#[derive(Debug)]
enum Step {
    Bounds(AfterBounds),
    Replay(ReplayRun),
    Attach { topic: String, since: Option<u64> },
    Flush { topic: String },
    Detach { topic: String },
    FindStored { audience: Audience, from: u64, through: u64 },
    NoteLost,
    RememberTopics,
}

/// What reading the bounds is for.
#[derive(Debug, Clone)]
enum AfterBounds {
    Repair,
    TopicReplay { topic: String, requested: u64 },
    Refill { audience: Audience, since: u64 },
}

/// What a replay is for, which decides where its messages go.
#[derive(Debug, Clone)]
enum Purpose {
    /// The first replay: in order, then a `replayed` frame.
    Resume { requested: u64, lost_from: Option<u64> },
    /// In order, silently; incomplete means messages were lost: 4008.
    CatchUp,
    /// A topic joined with `since`: its messages up to `last_sent` go out now as a block of their
    /// own (the others come with the catch-up that follows), then a `replayed` frame with the topic.
    TopicBlock { topic: String, requested: u64 },
    /// Messages of one audience the codec dropped (see [`Job::Refill`]): as a topic's block,
    /// without a `replayed` frame.
    Refill { audience: Audience },
}

#[derive(Debug)]
struct ReplayRun {
    purpose: Purpose,
    audiences: Vec<Audience>,
    since: u64,
    bounds: Bounds,
    /// Messages read per audience, and the most held from where it was reading on (to tell
    /// whether the per-subject limit may have trimmed some).
    per_audience: Vec<u64>,
    held_ahead: Vec<u64>,
    sent: u64,
    last: Option<u64>,
}

impl ReplayRun {
    /// Keeps the most the stream said it held ahead of the replay, per audience.
    fn saw_ahead(&mut self, seen: &[u64]) {
        self.held_ahead.resize(seen.len().max(self.held_ahead.len()), 0);
        for (kept, seen) in self.held_ahead.iter_mut().zip(seen) {
            *kept = (*kept).max(*seen);
        }
    }
}

/// Where a connection resumed, and the revision of the lost-messages note its resume read (0: none).
#[derive(Debug, Clone, Copy)]
struct Resumed {
    since: u64,
    note: u64,
    /// The count of frames taken for the socket once the `replayed` frame that reports the note
    /// is among them: once written, the note can go.
    report_at: Option<u64>,
    /// The same count for the `replayed` frame, whether or not it reports a note.
    answered_at: Option<u64>,
    /// The same count once the messages held until the client's first subscription (STOMP's) are
    /// among them: a STOMP client gets what its replay sent again only once it subscribes. `Some(0)`
    /// for protocols that hold nothing.
    released_at: Option<u64>,
}

/// What live pulling decided about a loss.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Repair,
    /// Messages of `audience` from `first` on are missing, and up to `through` was sent already.
    MaybeLost {
        audience: Audience,
        first: u64,
        through: u64,
    },
}

pub(crate) struct SessionState {
    user: Arc<str>,
    local: Arc<LocalUser>,
    codec: Codec,
    sources: LiveSources,
    /// The highest `seq` sent in order: the connection's resume point as far as the gateway knows.
    last_sent: u64,
    /// The end of a new device's replay of its unread messages once it ended (0 before): nothing
    /// up to there is owed past `last_sent` (broadcasts from before the device's first connection
    /// are not), so its client may acknowledge up to there.
    unread_through: u64,
    /// The sequences whose messages were all sent (or were the client's already).
    coverage: Coverage,
    /// Frames for the socket, in order.
    frames: VecDeque<Bytes>,
    /// How many frames were taken for the socket so far.
    frames_taken: u64,
    /// Where the codec's auto-acknowledged subscriptions stood (`.1`) when the first `.0` frames
    /// were queued, oldest first, until those frames are taken (boxed so that the state keeps a
    /// pointer for them, not a queue's 32 bytes: most connections never keep one).
    #[allow(clippy::box_collection)]
    auto_acks: Option<Box<VecDeque<(u64, u64)>>>,
    /// The user's read position moved: the count of its unread messages to tell the client.
    read_count: Option<Box<ReadCount>>,
    frame_bytes: usize,
    jobs: VecDeque<Job>,
    step: Option<Step>,
    /// The action that starts `step`, until the task takes it.
    action: Option<Action>,
    topics: BTreeSet<String>,
    /// Topics and how far nothing of theirs is owed: what had been routed when joined without
    /// `since` (a gap there is older than the subscription), or what their own replay read.
    owed_after: HashMap<Audience, u64>,
    /// Topics subscribed without `since`: owed only what comes after their `sub`.
    live_only: HashSet<Audience>,
    /// Topics joined with a `since` past what the connection had sent: nothing of theirs up to it.
    unasked: Unasked,
    /// The end of the gaps seen live since the last repair began: stored, so the repair's bounds
    /// reach it.
    gap_end: u64,
    allowed_topics: Vec<String>,
    max_topics: usize,
    per_subject_cap: i64,
    close: Option<Close>,
    /// Where the connection resumed, if it did.
    resumed: Option<Resumed>,
    /// The first replay found messages removed by the stream's limits: from where (its `since +
    /// 1`), and the count of frames taken for the socket once its `replayed` frame, which says
    /// so, is among them. Boxed: most connections never have one.
    untold_gap: Option<Box<(u64, u64)>>,
    /// Refills asked for whose replay has not ended, and the first message any of them owes.
    refills_pending: u32,
    /// Pings between two writes of the kept topics (0: never), and pings since the last.
    keep_topics_every: u16,
    pings_since_kept: u16,
    pending_from: u64,
    /// The first message a refill that ended sent again, and the count of frames taken for the
    /// socket once all it queued is among them: until then, a connection's end owes it.
    refilled: Option<(u64, u64)>,
    tally: Tally,
}

impl SessionState {
    /// A session that has sent nothing yet: `welcome` is queued, then the first replay, if any.
    pub(crate) fn new(params: Params) -> SessionState {
        let Params { user, local, codec, sources, topics, allowed_topics, max_topics, per_subject_cap, .. } = params;
        let keep_topics_every = if codec.remembers_topics() { params.keep_topics_every } else { 0 };
        let mut state = SessionState {
            user,
            local,
            codec,
            sources,
            last_sent: params.bounds.last,
            unread_through: 0,
            coverage: Coverage::through(params.bounds.last),
            frames: VecDeque::new(),
            frames_taken: 0,
            auto_acks: None,
            read_count: None,
            frame_bytes: 0,
            jobs: VecDeque::new(),
            step: None,
            action: None,
            topics: topics.into_iter().collect(),
            owed_after: HashMap::new(),
            live_only: HashSet::new(),
            unasked: Unasked::default(),
            gap_end: 0,
            allowed_topics,
            max_topics,
            per_subject_cap,
            close: None,
            resumed: None,
            untold_gap: None,
            refills_pending: 0,
            keep_topics_every,
            pings_since_kept: 0,
            pending_from: u64::MAX,
            refilled: None,
            tally: Tally::default(),
        };
        state.notice(&params.welcome);
        let (requested, lost_from, audiences) = match params.start {
            Start::Live => return state,
            Start::Resume { requested, noted } => {
                // A protocol that cannot say a resume misses something replays from what was lost
                // instead: the client gets again what it had from there, and nothing is skipped.
                let requested = match noted {
                    Noted::Lost(note) if !state.codec.reports_incomplete_resumes() => {
                        requested.min(note.first.saturating_sub(1))
                    }
                    _ => requested,
                };
                (requested, noted.lost_from(), state.audiences())
            }
            Start::Unread { read } => (read, None, vec![Audience::User(state.user.to_string())]),
        };
        // A client ahead of the stream (a replaced stream, a bogus `since`) gets what comes next.
        let since = requested.min(params.bounds.last);
        if let Start::Resume { noted, .. } = params.start {
            let note = if let Noted::Lost(note) = noted { note.revision } else { 0 };
            let released_at = (!state.codec.awaits_first_subscription()).then_some(0);
            state.resumed = Some(Resumed { since, note, report_at: None, answered_at: None, released_at });
        }
        state.last_sent = since;
        state.coverage = Coverage::through(since);
        state.start_replay(Purpose::Resume { requested, lost_from }, audiences, since, params.bounds);
        state.jobs.push_back(Job::Resume { since, requested, lost_from });
        state
    }

    /// Everything this connection receives: its user, `push.all`, its topics.
    pub(crate) fn audiences(&self) -> Vec<Audience> {
        audiences_of(&self.user, self.topics.iter())
    }

    /// The topics the connection has or is joining now: those a new token must still allow.
    pub(crate) fn topics_held(&self) -> impl Iterator<Item = &String> {
        let joining = match &self.step {
            Some(Step::Attach { topic, .. }) => Some(topic),
            _ => None,
        };
        self.topics.iter().chain(joining.filter(|topic| !self.topics.contains(*topic)))
    }

    /// A topic being joined or left, whose route may be in place although the connection's topics
    /// do not say so: the connection's end detaches it too.
    pub(crate) fn topic_in_flight(&self) -> Option<Audience> {
        match &self.step {
            Some(Step::Attach { topic, .. } | Step::Detach { topic }) if !self.topics.contains(topic) => {
                Some(Audience::Topic(topic.clone()))
            }
            _ => None,
        }
    }

    /// The topics a refreshed token allows: checked for every `sub` from now on (those queued too).
    pub(crate) fn allow_topics(&mut self, allowed: Vec<String>) {
        self.allowed_topics = allowed;
    }

    /// The highest `seq` sent.
    #[cfg(test)]
    pub(crate) fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// The highest `seq` a client may acknowledge: what it was sent, or the end of a new device's
    /// unread replay.
    pub(crate) fn ackable(&self) -> u64 {
        self.last_sent.max(self.unread_through)
    }

    /// Why the connection must close, once it must.
    pub(crate) fn closing(&self) -> Option<&Close> {
        self.close.as_ref()
    }

    /// Closes the connection (the first reason wins); what was not written yet is dropped, the
    /// client resumes from the last `seq` it received.
    pub(crate) fn close(&mut self, close: Close) {
        if self.close.is_none() {
            let answered_at = self.resumed.as_ref().and_then(|resumed| resumed.answered_at);
            if answered_at.is_some_and(|at| self.frames_taken < at) {
                // The frame that answered the resume goes with the queue.
                self.codec.answer_dropped();
            }
            self.close = Some(close);
            self.frames = VecDeque::new();
            self.frame_bytes = 0;
        }
    }

    /// Whether the running job's next outcome may be taken. A job that holds live delivery (a
    /// replay, a repair) waits for the queue to drain below the replay mark, since what it queues
    /// is the session's own. The others (a `sub` without `since`, an `unsub`) answer with a notice
    /// and wait as live messages do: held to the lower mark, they would wait for as long as live
    /// traffic kept the queue between the two.
    pub(crate) fn has_room_for_job(&self) -> bool {
        let mark = if self.holds_live() { HIGH_WATER } else { LIVE_HIGH_WATER };
        self.frame_bytes < mark && self.close.is_none()
    }

    /// Whether the client's next frames may be read.
    pub(crate) fn has_room_for_input(&self) -> bool {
        self.frame_bytes < INPUT_HIGH_WATER && self.jobs.len() < MAX_WAITING_JOBS
    }

    /// Whether there is room for more live frames.
    fn has_live_room(&self) -> bool {
        self.frame_bytes < LIVE_HIGH_WATER && self.close.is_none()
    }

    /// Whether frames wait for the socket.
    pub(crate) fn has_frames(&self) -> bool {
        !self.frames.is_empty()
    }

    /// [`SessionState::take_frames`], and what the codec's auto-acknowledged subscriptions were
    /// sent up to the end of those frames, if further than before: what the client has once it
    /// has the batch, whether or not frames stay queued behind it.
    pub(crate) fn take_frames_acknowledged(
        &mut self,
        batch: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> Option<u64> {
        let queued = self.frames_taken + self.frames.len() as u64;
        let sent = self.take_auto_ack().map(|seq| (queued, seq));
        self.take_frames(batch, max_frames, max_bytes);
        let mut taken = None;
        if let Some(waiting) = self.auto_acks.as_mut() {
            while let Some(&(queued, seq)) = waiting.front()
                && queued <= self.frames_taken
            {
                taken = Some(seq);
                waiting.pop_front();
            }
        }
        match sent {
            // Its frames are all in this batch (and so are those of any before it).
            Some((queued, seq)) if queued <= self.frames_taken => taken = Some(seq),
            Some(sent) => {
                let waiting = self.auto_acks.get_or_insert_default();
                if waiting.len() >= MAX_AUTO_ACKS {
                    // Replaced by a later one: it counts later, never early.
                    waiting.pop_back();
                }
                waiting.push_back(sent);
            }
            None => {}
        }
        if self.auto_acks.as_ref().is_some_and(|waiting| waiting.is_empty()) {
            self.auto_acks = None;
        }
        taken.map(|seq| seq.min(self.auto_ack_bound()))
    }

    /// Where what was sent on auto-acknowledged subscriptions moves the cursor now (within
    /// [`Self::auto_ack_bound`]), if further than before.
    pub(crate) fn take_auto_ack(&mut self) -> Option<u64> {
        let bound = self.auto_ack_bound();
        self.codec.take_auto_ack(bound)
    }

    /// The furthest what was sent on auto-acknowledged subscriptions may move the cursor, once
    /// what was taken for the socket is written: what may be acknowledged, short of what a refill
    /// owes.
    pub(crate) fn auto_ack_bound(&self) -> u64 {
        let owed = self.refill_owed_from(self.frames_taken).map_or(u64::MAX, |first| first.saturating_sub(1));
        self.ackable().min(owed)
    }

    /// Moves up to `max_frames` queued frames (and about `max_bytes`) into `batch`.
    pub(crate) fn take_frames(&mut self, batch: &mut Vec<Bytes>, max_frames: usize, max_bytes: usize) {
        batch.reserve(self.frames.len().min(max_frames));
        let mut bytes = 0;
        while batch.len() < max_frames && bytes < max_bytes {
            let Some(frame) = self.frames.pop_front() else { break };
            self.frames_taken += 1;
            bytes += frame.len();
            self.frame_bytes -= frame.len();
            batch.push(frame);
        }
        if self.frames.is_empty() {
            // An idle session keeps no queue.
            self.frames = VecDeque::new();
        }
    }

    /// Queues a frame the transport made (a pong, a ping).
    pub(crate) fn push_frame(&mut self, frame: Bytes) {
        if self.close.is_none() {
            self.frame_bytes += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// Queues a message in the connection's protocol (unless the protocol holds it back).
    /// Queues a notice in the connection's protocol.
    pub(crate) fn notice(&mut self, notice: &ServerFrame) {
        if let Some(frame) = self.codec.notice(notice) {
            self.push_frame(frame);
        }
        // Frames the notice released (STOMP receipts held behind a topic's answer).
        for frame in self.codec.take_replies() {
            self.push_frame(frame);
        }
        for topic in self.codec.take_topics_to_leave() {
            self.unsubscribe(topic);
        }
        if let Some(close) = self.codec.take_closing() {
            self.close(close);
        }
    }

    pub(crate) fn codec(&self) -> &Codec {
        &self.codec
    }

    pub(crate) fn codec_mut(&mut self) -> &mut Codec {
        &mut self.codec
    }

    /// The counts since the last call.
    pub(crate) fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// A client's `sub`.
    pub(crate) fn subscribe(&mut self, topic: String, since: Option<u64>) {
        self.jobs.push_back(Job::Subscribe { topic, since });
    }

    /// The codec asks for `audience`'s messages after `since` again ([`Job::Refill`]).
    pub(crate) fn refill(&mut self, audience: Audience, since: u64) {
        self.refills_pending += 1;
        self.pending_from = self.pending_from.min(since + 1);
        self.jobs.push_back(Job::Refill { audience, since });
    }

    /// A client's `unsub`.
    pub(crate) fn unsubscribe(&mut self, topic: String) {
        self.jobs.push_back(Job::Unsubscribe { topic });
    }

    /// Handles what the mailbox holds besides messages (events, a close request), then, unless
    /// a job holds live delivery, the live messages up to `watermark`, while there is room.
    pub(crate) fn pull(&mut self, watermark: u64) {
        if self.close.is_some() {
            return;
        }
        let (events, close) = {
            let mut inbox = self.sources.mailbox().inbox();
            (inbox.take_events(), inbox.close_requested())
        };
        if let Some(close) = close {
            self.close(close);
        }
        for event in events {
            match event {
                Event::Repair => self.queue_repair(),
                Event::Notice(notice) => self.notice(&notice),
                Event::StreamReplaced => self.stream_replaced(),
                Event::LossNoted(note) => self.loss_noted_elsewhere(note),
                Event::ReadMoved { read } => self.read_moved(read),
                Event::ReadCounted { read, upto, unread } => self.read_counted(read, upto, unread),
            }
        }
        if self.holds_live() || !self.has_live_room() {
            return;
        }
        let muted = self.local.muted();
        let mut live = LivePull {
            codec: &mut self.codec,
            muted: &muted,
            last_sent: &mut self.last_sent,
            coverage: &self.coverage,
            owed_after: &self.owed_after,
            live_only: &self.live_only,
            unasked: &self.unasked,
            gap_end: &mut self.gap_end,
            frames: &mut self.frames,
            frame_bytes: &mut self.frame_bytes,
            tally: &mut self.tally,
            read_count: self.read_count.as_deref_mut(),
            verdict: None,
            run: None,
        };
        self.sources.pull(watermark, |found| live.take(found));
        live.end_run();
        match live.verdict {
            Some(Verdict::Repair) => self.queue_repair(),
            Some(Verdict::MaybeLost { audience, first, through }) => {
                // Next, after the job that runs (if any).
                self.jobs.insert(usize::from(self.step.is_some()), Job::CheckLoss { audience, first, through });
            }
            None => {}
        }
    }

    /// The user's read position moved to `read`: a protocol that tells its client so counts the
    /// unread messages up to what it sent (`last_sent`), and adds those it sends meanwhile.
    fn read_moved(&mut self, read: u64) {
        if matches!(self.codec, Codec::Herald(_)) {
            let count = ReadCount { read, upto: self.last_sent, asked: false, unread_since: 0 };
            self.read_count = Some(Box::new(count));
        }
    }

    /// The count to ask for, once: the user's unread personal messages in `(read, upto]`, but
    /// for the kinds muted.
    pub(crate) fn take_read_count(&mut self) -> Option<UnreadQuestion> {
        let count = self.read_count.as_mut().filter(|count| !count.asked)?;
        count.asked = true;
        Some(UnreadQuestion { read: count.read, upto: count.upto, muted: self.local.muted() })
    }

    fn read_counted(&mut self, read: u64, upto: u64, unread: Option<u64>) {
        let Some(count) = self.read_count.take_if(|count| (count.read, count.upto) == (read, upto)) else {
            // A newer move of the read position was asked for since.
            return;
        };
        if let Some(unread) = unread {
            self.notice(&ServerFrame::Read { seq: read, unread: unread + count.unread_since });
        }
    }

    /// Asks to be woken when a broadcast log the session reads grows (before the task waits).
    pub(crate) fn park(&mut self) {
        self.sources.park();
    }

    /// The next I/O to do, if any: the current step's, or the first step of the next job.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        if self.close.is_some() {
            return None;
        }
        if let Some(action) = self.action.take() {
            return Some(action);
        }
        while self.step.is_none() {
            let job = self.jobs.front()?.clone();
            self.start(job);
            if self.step.is_none() {
                // Done at once (a refused `sub`, an `unsub` of an unknown topic).
                self.jobs.pop_front();
            }
        }
        self.action.take()
    }

    /// The result of the last action.
    pub(crate) fn on_outcome(&mut self, outcome: Outcome) {
        if self.close.is_some() {
            return;
        }
        let Some(step) = self.step.take() else { return };
        match (step, outcome) {
            (Step::Replay(mut run), Outcome::Replayed(message)) => {
                self.replayed(&mut run, *message);
                self.step = Some(Step::Replay(run));
            }
            (Step::Replay(mut run), Outcome::HeldAhead(seen)) => {
                run.saw_ahead(&seen);
                if !self.cut_short(&run) {
                    self.step = Some(Step::Replay(run));
                }
            }
            (Step::Replay(mut run), Outcome::ReplayEnded(Ok(held_ahead))) => {
                run.saw_ahead(&held_ahead);
                self.replay_ended(run)
            }
            (Step::Replay(run), Outcome::ReplayEnded(Err(error))) => {
                // Kept for the connection's end: what it sent may follow removed messages.
                self.step = Some(Step::Replay(run));
                self.close(Close::new(CloseCode::Unavailable, error));
            }
            (Step::Bounds(after), Outcome::Bounds(Ok(bounds))) => self.bounds_read(after, bounds),
            (Step::Bounds(_), Outcome::Bounds(Err(error))) => self.close(Close::new(CloseCode::Unavailable, error)),
            (Step::Attach { topic, since }, Outcome::Attached(attached)) => self.attached(topic, since, attached),
            (Step::Flush { topic }, Outcome::Flushed) => {
                // A feed that is down re-subscribes and repairs on reconnection: promise delivery.
                self.notice(&ServerFrame::Subscribed { topic });
                self.job_done();
            }
            (Step::Detach { topic }, Outcome::Detached) => {
                self.notice(&ServerFrame::Unsubscribed { topic });
                self.job_done();
            }
            (Step::FindStored { audience, from, through }, Outcome::Stored(found)) => {
                self.loss_checked(found, audience, from, through)
            }
            (Step::RememberTopics, Outcome::Remembered) => self.job_done(),
            (Step::NoteLost, Outcome::Noted) => {
                // Done: the connection's end must not find the loss still owed and note it again.
                self.job_done();
                self.close(Close::slow_consumer("messages missed: reconnect with since"));
            }
            (step, outcome) => {
                debug_assert!(false, "outcome {outcome:?} does not answer {step:?}");
                self.step = Some(step);
            }
        }
    }

    /// After the connection ended: whether a loss check or note was under way or waiting. Those
    /// go on without the connection ([`Self::next_loss_action`]): a loss the client's next resume
    /// is not told of is a silent one.
    pub(crate) fn owes_loss_check(&self) -> bool {
        matches!(self.step, Some(Step::FindStored { .. }))
            || self.jobs.iter().any(|job| matches!(job, Job::CheckLoss { .. } | Job::Lost { .. }))
    }

    /// After the connection ended: looks through what its live sources still hold unread (held
    /// behind a replay, or waiting for room in the queue) for gaps below what was sent, which the
    /// connection would have checked had it read them. Each is queued as a loss check
    /// ([`Self::next_loss_action`] runs them); a gap above what was sent is no loss, since the
    /// client's resume reads it from the stream.
    ///
    /// `unwritten`: how many of the frames taken for the socket were not written yet.
    pub(crate) fn examine_unread(&mut self, unwritten: u64) {
        let replay = self.replay_view();
        let mut checks = Vec::new();
        let unread = UnreadGaps {
            last_sent: self.last_sent,
            coverage: &self.coverage,
            owed_after: &self.owed_after,
            live_only: &self.live_only,
            replay: replay.as_ref(),
        };
        self.sources.pull(u64::MAX, |found| {
            let gap = match found {
                Found::Entry(gap @ Live::Gap { .. }) => Some(gap),
                Found::Evicted { gap: Some(ref gap), .. } => Some(gap),
                _ => None,
            };
            if let Some(Live::Gap { first, last, audience, first_on_route }) = gap
                && let Some(check) = unread.check(*first, *last, audience, *first_on_route)
            {
                checks.push(check);
            }
            Flow::Continue
        });
        self.jobs.extend(checks);
        // What a refill still owed was let go unsent, below what was sent: lost to this
        // connection, so noted (a STOMP resume replays from there).
        let written = self.frames_taken.saturating_sub(unwritten);
        if let Some(first) = self.refill_owed_from(written) {
            self.jobs.push_back(Job::Lost { first });
        }
        if let Some(first) = self.untold_gap(written) {
            self.jobs.push_back(Job::Lost { first });
        }
    }

    /// The start of messages a replay found removed by the stream's limits, if the client may not
    /// have been told: the replay sent messages past them and had not written its `replayed` frame
    /// (a catch-up's close) when the connection ended (or failed). Its client resumes from the last
    /// `seq` it got, past them, and would be told by nobody: noted, its resume reports them.
    fn untold_gap(&self, written: u64) -> Option<u64> {
        // A client that cannot be told (STOMP) would only get again, from the note, what it had.
        if !self.codec.reports_incomplete_resumes() {
            return None;
        }
        if let Some(Step::Replay(run)) = &self.step
            && matches!(run.purpose, Purpose::Resume { .. } | Purpose::CatchUp)
            && run.sent > 0
            && !self.nothing_removed(run)
        {
            return Some(run.since.saturating_add(1));
        }
        let (first, told_at) = **self.untold_gap.as_ref()?;
        (written < told_at).then_some(first)
    }

    /// Whether, as far as the replay read, nothing addressed to the connection after its `since`
    /// can have been removed by the stream's limits (see [`replay::complete`]).
    fn nothing_removed(&self, run: &ReplayRun) -> bool {
        let cap = run.bounds.per_subject_cap.unwrap_or(self.per_subject_cap);
        replay::complete(run.bounds.first, run.since, cap, &run.per_audience, &run.held_ahead)
    }

    /// A catch-up that finds messages removed before it sent any of those after them closes at
    /// once with 4008: its client resumes from where it was, and that replay says what is missing.
    /// (One that sent some first notes the loss when it ends.) Whether it closed.
    fn cut_short(&mut self, run: &ReplayRun) -> bool {
        let cut = matches!(run.purpose, Purpose::CatchUp) && run.sent == 0 && !self.nothing_removed(run);
        if cut {
            self.tally.replays_incomplete += 1;
            self.close(Close::slow_consumer("messages missed: reconnect with since"));
        }
        cut
    }

    /// The first message a refill not ended, or ended but not all `written`, owes, if any (from
    /// its start: what it queued may not be written yet).
    fn refill_owed_from(&self, written: u64) -> Option<u64> {
        let pending = (self.refills_pending > 0).then_some(self.pending_from);
        let unwritten = self.refilled.filter(|(_, written_at)| written < *written_at).map(|(first, _)| first);
        pending.into_iter().chain(unwritten).min().filter(|first| *first <= self.last_sent)
    }

    /// What the replay under way, if any, settled so far (see [`ReplayView`]).
    fn replay_view(&self) -> Option<ReplayView> {
        let Some(Step::Replay(run)) = &self.step else { return None };
        let through = |last: u64| {
            let mut coverage = self.coverage.clone();
            coverage.add(run.since.saturating_add(1), last);
            coverage
        };
        Some(match run.purpose {
            Purpose::Resume { .. } | Purpose::CatchUp => ReplayView {
                audiences: run.audiences.clone(),
                read: through(run.last.unwrap_or(run.since)),
                others: through(run.bounds.last),
                owed_through: 0,
            },
            Purpose::TopicBlock { .. } | Purpose::Refill { .. } => ReplayView {
                audiences: run.audiences.clone(),
                read: self.coverage.clone(),
                others: self.coverage.clone(),
                owed_through: run.bounds.last,
            },
        })
    }

    /// The revision of the lost-messages note the first replay reported, once everything queued
    /// up to its `replayed` frame, and up to what the client's first subscription released, was
    /// written (call it only while the socket has no write under way): the note can be removed. A
    /// connection that closes first leaves it for the device's next resume.
    pub(crate) fn take_reported_note(&mut self) -> Option<u64> {
        let queued = self.frames_taken + self.frames.len() as u64;
        let resumed = self.resumed.as_mut()?;
        // After a refill too: a first subscription may release the held messages' oldest (the lost
        // one among them) only by reading them again.
        if resumed.released_at.is_none() && !self.codec.awaits_first_subscription() && self.refills_pending == 0 {
            resumed.released_at = Some(queued);
        }
        let written = |at: Option<u64>| at.is_some_and(|at| self.frames_taken >= at);
        if !written(resumed.report_at) || !written(resumed.released_at) || self.close.is_some() {
            return None;
        }
        resumed.report_at = None;
        Some(resumed.note)
    }

    /// Whether the action under way is a loss check or note, whose outcome
    /// [`Self::next_loss_action`] takes (a note not started yet starts when its action is polled).
    pub(crate) fn settling_loss(&self) -> bool {
        matches!(self.step, Some(Step::FindStored { .. } | Step::NoteLost))
    }

    /// After the connection ended, the next step of the loss checks it owed: `outcome` answers the
    /// check under way, if one was. Every other job ends with the connection (a client that comes
    /// back resumes from what it received; a note under way finishes in a task of its own), and
    /// every loss found is noted (the note keeps the lowest), as it would have been with the
    /// connection open.
    pub(crate) fn next_loss_action(&mut self, outcome: Option<Outcome>) -> Option<Action> {
        match (self.step.take(), outcome) {
            (Some(Step::FindStored { audience, from, through }), Some(Outcome::Stored(found))) => {
                // A repair it queues never runs, so it is not counted.
                let repairs = self.tally.repairs;
                self.loss_checked(found, audience, from, through);
                self.tally.repairs = repairs;
            }
            (Some(_), _) => {
                self.jobs.pop_front();
            }
            (None, _) => {}
        }
        self.step = None;
        self.action = None;
        loop {
            match self.jobs.front()?.clone() {
                Job::CheckLoss { audience, first, through } => {
                    self.step = Some(Step::FindStored { audience: audience.clone(), from: first, through });
                    return Some(Action::FindStored { audience, from: first });
                }
                Job::Lost { first } => {
                    // The other checks go on after it: the note keeps the lowest loss noted.
                    self.step = Some(Step::NoteLost);
                    return Some(Action::NoteLost { first });
                }
                _ => {
                    self.jobs.pop_front();
                }
            }
        }
    }

    fn holds_live(&self) -> bool {
        matches!(self.step, Some(Step::Bounds(_) | Step::Replay(_) | Step::FindStored { .. } | Step::NoteLost))
            || self.jobs.iter().any(Job::holds_live)
    }

    /// The stream was made again: its sequences start over, so what was sent and what comes next
    /// cannot be told apart. Once the job under way is done, the loss is noted from the stream's
    /// start (the client's resume reports `complete:false`) and the connection closes with 4008.
    fn stream_replaced(&mut self) {
        self.jobs.truncate(usize::from(self.step.is_some()));
        self.jobs.push_back(Job::Lost { first: 1 });
    }

    /// Another connection of the device noted messages from `note.first` on as lost. A resume that
    /// started at or past them without reading that note (it came before the note was written)
    /// reported itself complete: the connection closes with 4008, and the next resume reports it.
    fn loss_noted_elsewhere(&mut self, note: LostNote) {
        if let Some(resumed) = self.resumed
            && resumed.note < note.revision
            && resumed.since >= note.first
        {
            self.close(Close::slow_consumer("messages missed: reconnect with since"));
        }
    }

    fn queue_repair(&mut self) {
        // One waiting repair covers every later reason: it reads the stream's bounds when it starts.
        let waiting = self.jobs.iter().skip(usize::from(self.step.is_some())).any(|job| *job == Job::Repair);
        if !waiting {
            self.tally.repairs += 1;
            self.jobs.push_back(Job::Repair);
        }
    }

    fn start(&mut self, job: Job) {
        match job {
            // Started by `new`.
            Job::Resume { .. } => {}
            Job::Repair => {
                let at_least = std::mem::take(&mut self.gap_end);
                self.begin(Step::Bounds(AfterBounds::Repair), Action::ReadBounds { at_least });
            }
            Job::CheckLoss { audience, first, through } => {
                let step = Step::FindStored { audience: audience.clone(), from: first, through };
                self.begin(step, Action::FindStored { audience, from: first })
            }
            Job::Lost { first } => self.begin(Step::NoteLost, Action::NoteLost { first }),
            Job::Subscribe { topic, since } => self.start_subscribe(topic, since),
            Job::Refill { audience, since } => {
                // Bounds from behind the session would leave out what it let go.
                let at_least = self.last_sent;
                let step = Step::Bounds(AfterBounds::Refill { audience, since });
                self.begin(step, Action::ReadBounds { at_least });
            }
            Job::RememberTopics => {
                let topics = self.topics.iter().cloned().collect();
                self.begin(Step::RememberTopics, Action::RememberTopics { topics });
            }
            Job::Unsubscribe { topic } => {
                if self.topics.remove(&topic) {
                    self.topics_changed();
                    let audience = Audience::Topic(topic.clone());
                    self.sources.remove(&audience);
                    self.owed_after.remove(&audience);
                    self.live_only.remove(&audience);
                    self.unasked.remove(&audience);
                    let action = Action::Detach { topic: topic.clone() };
                    self.begin(Step::Detach { topic }, action);
                } else {
                    self.notice(&ServerFrame::Unsubscribed { topic });
                }
            }
        }
    }

    /// The connection sent the client a ping. Every `keep_topics_every` of them, kept topics are
    /// written again, so that their record outlives a connection cut without a close by its window.
    pub(crate) fn pinged(&mut self) {
        if self.keep_topics_every == 0 {
            return;
        }
        self.pings_since_kept = self.pings_since_kept.saturating_add(1);
        if self.pings_since_kept >= self.keep_topics_every {
            self.pings_since_kept = 0;
            self.topics_changed();
        }
    }

    /// Queues the keeping of the topics, when the codec's clients recover them and no keeping that
    /// has not started yet is queued (it takes the topics as they are when it starts). Called by
    /// the job that changed them, the first of the queue.
    fn topics_changed(&mut self) {
        let queued = self.jobs.iter().skip(1).any(|job| *job == Job::RememberTopics);
        if self.codec.remembers_topics() && !queued {
            self.jobs.push_back(Job::RememberTopics);
        }
    }

    fn begin(&mut self, step: Step, action: Action) {
        self.step = Some(step);
        self.action = Some(action);
    }

    fn job_done(&mut self) {
        self.step = None;
        self.jobs.pop_front();
    }

    /// A missing message of `audience` was looked for from `from`: stored at or below what was
    /// sent already (`through`), it is lost (noted, then 4008), unless it was not owed (a replay
    /// sent it, its kind is muted): then the next one is looked for. Otherwise every missing
    /// message is newer, and a repair brings them in order. When the stream cannot tell, the loss
    /// is assumed.
    fn loss_checked(&mut self, found: Result<Option<Stored>, String>, audience: Audience, from: u64, through: u64) {
        self.job_done();
        let lost = match found {
            Ok(Some(stored)) if stored.seq <= through => {
                let muted = stored.is_muted(&self.local.muted());
                let owed_from = if muted { stored.seq.saturating_add(1) } else { stored.seq };
                match first_owed(&self.coverage, &self.owed_after, &audience, owed_from, through) {
                    Some(missing) if missing == stored.seq => Some(stored.seq),
                    Some(missing) => {
                        self.jobs.push_front(Job::CheckLoss { audience, first: missing, through });
                        return;
                    }
                    None => None,
                }
            }
            Ok(_) => None,
            Err(_) => {
                self.tally.losses_assumed += 1;
                Some(from)
            }
        };
        match lost {
            Some(first) => {
                self.tally.unrepairable += 1;
                self.jobs.push_front(Job::Lost { first });
            }
            None => self.queue_repair_first(),
        }
    }

    /// A repair before anything else queued.
    fn queue_repair_first(&mut self) {
        self.tally.repairs += 1;
        self.jobs.push_front(Job::Repair);
    }

    fn start_subscribe(&mut self, topic: String, since: Option<u64>) {
        let refuse = |code: &str, message: String| ServerFrame::topic_error(code, message, &topic);
        let refusal = if let Err(error) = check_id(IdKind::Topic, &topic) {
            Some(refuse(error_code::BAD_REQUEST, error.to_string()))
        } else if !topic_allowed(&self.allowed_topics, &topic) {
            Some(refuse(error_code::FORBIDDEN, format!("the token does not allow topic {topic}")))
        } else if !self.topics.contains(&topic) && self.topics.len() >= self.max_topics {
            Some(refuse(error_code::BAD_REQUEST, format!("at most {} topics per connection", self.max_topics)))
        } else {
            None
        };
        match refusal {
            Some(notice) => self.notice(&notice),
            None => {
                let attaching = if since.is_some() { Attaching::Replaying } else { Attaching::Live };
                let action = Action::Attach { topic: topic.clone(), attaching };
                self.begin(Step::Attach { topic, since }, action);
            }
        }
    }

    fn attached(&mut self, topic: String, since: Option<u64>, attached: Result<LogStart, String>) {
        let start = match attached {
            Ok(start) => start,
            Err(error) => {
                self.notice(&ServerFrame::topic_error(error_code::UNAVAILABLE, error, &topic));
                return self.job_done();
            }
        };
        if since.is_some() {
            // What it asks for from `since` is owed now.
            self.owed_after.remove(&start.audience);
            self.live_only.remove(&start.audience);
        }
        if !self.topics.contains(&topic) {
            if since.is_none() {
                self.owed_after.insert(start.audience.clone(), start.routed);
                self.live_only.insert(start.audience.clone());
            }
            self.sources.add(start);
            self.topics.insert(topic.clone());
            self.topics_changed();
        }
        match since {
            // `subscribed` promises live delivery: the subscription must be on the server first.
            None => self.begin(Step::Flush { topic }, Action::Flush),
            Some(requested) => {
                // Reading the bounds below puts the subscription on the server first.
                self.notice(&ServerFrame::Subscribed { topic: topic.clone() });
                let action = Action::ReadBounds { at_least: 0 };
                self.begin(Step::Bounds(AfterBounds::TopicReplay { topic, requested }), action);
            }
        }
    }

    fn bounds_read(&mut self, after: AfterBounds, bounds: Bounds) {
        match after {
            AfterBounds::Repair => self.start_replay(Purpose::CatchUp, self.audiences(), self.last_sent, bounds),
            AfterBounds::TopicReplay { topic, requested } => {
                let audiences = vec![Audience::Topic(topic.clone())];
                let since = requested.min(bounds.last);
                self.unasked.set(Audience::Topic(topic.clone()), since, self.last_sent);
                self.start_replay(Purpose::TopicBlock { topic, requested }, audiences, since, bounds);
            }
            AfterBounds::Refill { audience, since } => {
                self.codec.refill_started(&audience);
                let purpose = Purpose::Refill { audience: audience.clone() };
                self.start_replay(purpose, vec![audience], since.min(bounds.last), bounds);
            }
        }
    }

    fn start_replay(&mut self, purpose: Purpose, audiences: Vec<Audience>, since: u64, bounds: Bounds) {
        let action = Action::Replay { audiences: audiences.clone(), since, upto: bounds.last };
        let per_audience = vec![0; audiences.len()];
        let run =
            ReplayRun { purpose, audiences, since, bounds, per_audience, held_ahead: Vec::new(), sent: 0, last: None };
        // A catch-up with nothing stored past what was sent has nothing to read (a repair for a
        // reason that brought nothing new, e.g. a feed reconnection on a quiet stream).
        if matches!(run.purpose, Purpose::CatchUp) && since >= run.bounds.last {
            return self.replay_ended(run);
        }
        self.tally.replays += 1;
        if self.cut_short(&run) {
            return;
        }
        self.begin(Step::Replay(run), action);
    }

    fn replayed(&mut self, run: &mut ReplayRun, message: Message) {
        if let Some(index) = run.audiences.iter().position(|audience| *audience == message.audience) {
            run.per_audience[index] += 1;
        }
        if message.is_muted(&self.local.muted()) {
            return;
        }
        match run.purpose {
            Purpose::Resume { .. } | Purpose::CatchUp => {
                if message.seq <= self.last_sent || self.unasked.holds(&message) {
                    return;
                }
                self.last_sent = message.seq;
                if let Some(count) = self.read_count.as_deref_mut() {
                    count.sent(&message);
                }
                self.frame_bytes += self.codec.queue_message(&message, &mut self.frames);
            }
            Purpose::TopicBlock { .. } | Purpose::Refill { .. } => {
                // Newer ones come with the catch-up, in order.
                if message.seq <= self.last_sent {
                    self.frame_bytes += self.codec.queue_message(&message, &mut self.frames);
                }
            }
        }
        run.sent += 1;
        run.last = Some(message.seq);
    }

    fn replay_ended(&mut self, run: ReplayRun) {
        self.tally.replayed += run.sent;
        let upto = run.bounds.last;
        let nothing_removed = self.nothing_removed(&run);
        let mut complete = nothing_removed;
        let report = |complete: bool, topic: Option<String>| ServerFrame::Replayed {
            from: run.since + 1,
            to: run.last.unwrap_or(run.since),
            count: run.sent,
            complete,
            topic,
        };
        match run.purpose {
            Purpose::Resume { requested, lost_from } => {
                // Messages the previous connection missed before `since` are not in this replay.
                complete &= requested <= upto && lost_from.is_none_or(|first| first > run.since);
                self.caught_up(run.since, upto);
                let new_device = self.resumed.is_none();
                if new_device {
                    // A new device's replay (a resume's read every audience: `last_sent` says it all).
                    self.unread_through = upto;
                }
                self.notice(&report(complete, None));
                if new_device {
                    self.codec.new_device_caught_up(upto);
                }
                let queued = self.frames_taken + self.frames.len() as u64;
                if let Some(resumed) = self.resumed.as_mut() {
                    resumed.answered_at = Some(queued);
                    resumed.report_at = (resumed.note > 0).then_some(queued);
                }
                if !nothing_removed && run.sent > 0 {
                    self.untold_gap = Some(Box::new((run.since.saturating_add(1), queued)));
                }
                self.job_done();
            }
            Purpose::CatchUp if complete => {
                self.caught_up(run.since, upto);
                self.job_done();
            }
            Purpose::CatchUp if run.sent > 0 && self.codec.reports_incomplete_resumes() => {
                // Its client got messages past the removed ones, and resumes from there: noted, that
                // resume reports them; then 4008.
                self.job_done();
                self.jobs.push_front(Job::Lost { first: run.since.saturating_add(1) });
            }
            Purpose::CatchUp => self.close(Close::slow_consumer("messages missed: reconnect with since")),
            Purpose::TopicBlock { topic, requested } => {
                complete &= requested <= upto;
                // Its catch-up, next, reads the rest up to `upto`.
                let owed_after = self.owed_after.entry(Audience::Topic(topic.clone())).or_default();
                *owed_after = (*owed_after).max(upto);
                self.notice(&report(complete, Some(topic)));
                self.start_replay(Purpose::CatchUp, self.audiences(), self.last_sent, run.bounds);
            }
            Purpose::Refill { audience } => {
                let queued = self.frames_taken + self.frames.len() as u64;
                // Another refill may still be pending: its start is owed until it ends.
                let still_unwritten = self.refilled.filter(|(_, written_at)| self.frames_taken < *written_at);
                let first = still_unwritten.map_or(u64::MAX, |(first, _)| first).min(run.since + 1);
                self.refilled = Some((first, queued));
                self.refills_pending -= 1;
                if self.refills_pending == 0 {
                    self.pending_from = u64::MAX;
                }
                let owed_after = self.owed_after.entry(audience).or_default();
                *owed_after = (*owed_after).max(upto);
                self.start_replay(Purpose::CatchUp, self.audiences(), self.last_sent, run.bounds);
            }
        }
        self.tally.replays_incomplete += u64::from(!complete);
    }

    /// A replay read everything addressed to the connection after `since` up to `upto`.
    /// `last_sent` stays at the last message sent: a message up to `upto` that the replay did not
    /// find (a replica that answered from behind the stream's leader) still goes out when it comes
    /// live.
    fn caught_up(&mut self, since: u64, upto: u64) {
        self.coverage.add(since.saturating_add(1), upto);
    }
}

/// The lowest sequence from `from` to `to` owed to the connection on `audience` that no replay
/// read, if any.
fn first_owed(
    coverage: &Coverage,
    owed_after: &HashMap<Audience, u64>,
    audience: &Audience,
    from: u64,
    to: u64,
) -> Option<u64> {
    let owed_from = owed_after.get(audience).map_or(0, |seq| seq.saturating_add(1));
    coverage.first_missing(from.max(owed_from), to)
}

/// What decides whether a gap a connection left unread may be a loss.
struct UnreadGaps<'a> {
    last_sent: u64,
    coverage: &'a Coverage,
    owed_after: &'a HashMap<Audience, u64>,
    live_only: &'a HashSet<Audience>,
    replay: Option<&'a ReplayView>,
}

/// What a replay under way settled so far, for gaps a connection that ended during it left unread:
/// of its audiences, what it read (every stored message up to the last one it sent); of the
/// others, what its end would have counted as complete without reading them (a new device's first
/// replay reads only its user's messages); and for a topic's block, how far its topic owes nothing.
struct ReplayView {
    audiences: Vec<Audience>,
    read: Coverage,
    others: Coverage,
    owed_through: u64,
}

impl UnreadGaps<'_> {
    /// The loss check for the gap `first..=last` of `audience`, if a message of it may be owed and
    /// older than one sent (as [`LivePull`] decides for a gap it reads).
    fn check(&self, first: u64, last: u64, audience: &Audience, first_on_route: bool) -> Option<Job> {
        if first_on_route && self.live_only.contains(audience) {
            return None;
        }
        let (coverage, owed_through) = match self.replay {
            Some(view) if view.audiences.contains(audience) => (&view.read, view.owed_through),
            Some(view) => (&view.others, 0),
            None => (self.coverage, 0),
        };
        let from = first.max(owed_through.saturating_add(1));
        let through = self.last_sent.min(last);
        let first = first_owed(coverage, self.owed_after, audience, from, through)?;
        Some(Job::CheckLoss { audience: audience.clone(), first, through })
    }
}

/// Topics joined with a `since` past the last message the connection had sent: the client asked
/// for what comes after `since`, so their messages up to it are not sent, though the catch-up that
/// follows the topic's block reads from the connection's last message and a message up to it may
/// still be on its way to the gateway's log.
#[derive(Debug, Default)]
struct Unasked {
    through: HashMap<Audience, u64>,
    /// The highest of `through`'s values ever: above it, nothing needs looking up.
    highest: u64,
}

impl Unasked {
    /// `audience` joined from `since` when the connection had sent up to `last_sent`.
    fn set(&mut self, audience: Audience, since: u64, last_sent: u64) {
        if since > last_sent {
            self.highest = self.highest.max(since);
            self.through.insert(audience, since);
        } else {
            self.through.remove(&audience);
        }
    }

    fn remove(&mut self, audience: &Audience) {
        self.through.remove(audience);
    }

    fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether `message` is one its client did not ask for.
    fn holds(&self, message: &Message) -> bool {
        message.seq <= self.highest
            && self.through.get(&message.audience).is_some_and(|&through| message.seq <= through)
    }
}

/// Everything a connection of `user` subscribed to `topics` receives.
pub(crate) fn audiences_of<'a>(user: &str, topics: impl Iterator<Item = &'a String>) -> Vec<Audience> {
    let mut audiences = vec![Audience::User(user.to_string()), Audience::All];
    audiences.extend(topics.cloned().map(Audience::Topic));
    audiences
}

/// Taking live entries into the session's frames.
struct LivePull<'a> {
    codec: &'a mut Codec,
    muted: &'a [Box<str>],
    last_sent: &'a mut u64,
    coverage: &'a Coverage,
    owed_after: &'a HashMap<Audience, u64>,
    live_only: &'a HashSet<Audience>,
    unasked: &'a Unasked,
    gap_end: &'a mut u64,
    frames: &'a mut VecDeque<Bytes>,
    frame_bytes: &'a mut usize,
    tally: &'a mut Tally,
    read_count: Option<&'a mut ReadCount>,
    verdict: Option<Verdict>,
    /// Messages taken in a row whose frames are adjacent in one burst buffer: queued as one slice.
    run: Option<Run>,
}

/// Adjacent frames of one burst's buffer.
struct Run {
    /// The whole buffer, cut to the run's frames when the run ends.
    buffer: Bytes,
    /// Where the burst is (identifies it).
    burst_at: usize,
    /// The index in the burst of the message that would extend the run.
    next: usize,
    start: usize,
    end: usize,
}

impl Run {
    /// Queues `run`, if any, as one slice.
    fn end(run: &mut Option<Run>, frames: &mut VecDeque<Bytes>) {
        if let Some(Run { mut buffer, start, end, .. }) = run.take() {
            // In place: the buffer's slices are cut without another reference count.
            buffer.truncate(end);
            buffer.advance(start);
            frames.push_back(buffer);
        }
    }
}

impl LivePull<'_> {
    fn take(&mut self, found: Found<'_>) -> Flow {
        match found {
            Found::Entry(Live::Message(message)) => {
                if message.seq <= *self.last_sent || self.unasked.holds(message) || message.is_muted(self.muted) {
                    return Flow::Continue;
                }
                let len = self.queue(message);
                if let Some(count) = self.read_count.as_deref_mut() {
                    count.sent(message);
                }
                self.delivered(message.seq, 1, len)
            }
            Found::Burst { first, last, count } => self.take_burst(first, last, count),
            Found::Entry(Live::Gap { first, last, audience, first_on_route }) => {
                self.gap(*first, *last, audience, *first_on_route)
            }
            Found::Evicted { last_evicted, gap } => {
                // A gap among the evicted entries is looked into first (a catch-up may not reach it).
                if let Some(Live::Gap { first, last, audience, first_on_route }) = &gap
                    && self.gap(*first, *last, audience, *first_on_route) == Flow::Stop
                {
                    return Flow::Stop;
                }
                if last_evicted <= *self.last_sent { Flow::Continue } else { self.decide(Verdict::Repair) }
            }
            Found::Overflowed => self.decide(Verdict::Repair),
        }
    }

    /// Takes the messages `first` to `last` of one burst (`count` of them) as one slice of its
    /// buffer, when every one of them goes out alike (none sent already, none muted, none held back
    /// by the codec) and they fit under the high-water mark.
    fn take_burst(&mut self, first: &Message, last: &Message, count: usize) -> Flow {
        if first.seq <= (*self.last_sent).max(self.unasked.highest()) || !self.muted.is_empty() {
            return Flow::OneByOne;
        }
        let Some((burst, index)) = first.burst() else { return Flow::OneByOne };
        let Some(frames) = self.codec.run_key(last).and_then(|key| burst.frames(&key)) else {
            return Flow::OneByOne;
        };
        let last_index = index + count - 1;
        if *self.frame_bytes + (frames.range(last_index).end - frames.range(index).start) > LIVE_HIGH_WATER {
            // One by one, so that the queue stops at the mark as it does for single messages.
            return Flow::OneByOne;
        }
        self.codec.note_run_sent(last);
        let len = self.add_to_run(burst, frames, index, last_index);
        self.delivered(last.seq, count as u64, len)
    }

    /// Counts `count` messages up to `seq` taken, `len` bytes; stops once the frames fill up.
    fn delivered(&mut self, seq: u64, count: u64, len: usize) -> Flow {
        *self.last_sent = seq;
        *self.frame_bytes += len;
        self.tally.delivered += count;
        self.tally.delivered_bytes += len as u64;
        if *self.frame_bytes >= LIVE_HIGH_WATER { Flow::Stop } else { Flow::Continue }
    }

    /// Queues the frame of `message`, joining it to the run of frames before it when they are
    /// adjacent in one burst buffer; returns its length.
    fn queue(&mut self, message: &Message) -> usize {
        let Some((burst, index)) = message.burst().filter(|_| !self.codec.sends_copies(message)) else {
            self.end_run();
            return self.codec.queue_message(message, self.frames);
        };
        let Some(key) = self.codec.shared_key(message) else {
            return 0;
        };
        match burst.frames(&key) {
            Some(frames) => self.add_to_run(burst, frames, index, index),
            None => {
                let mut frame = Vec::new();
                codec::append_frame(&key, message, &mut frame, &mut Vec::new());
                let len = frame.len();
                self.end_run();
                self.frames.push_back(Bytes::from(frame));
                len
            }
        }
    }

    /// Adds the frames of the burst's messages `first..=last` to the run, or starts a new run
    /// with them; returns their length.
    fn add_to_run(&mut self, burst: &Arc<Burst>, frames: &Frames, first: usize, last: usize) -> usize {
        let (start, end) = (frames.range(first).start, frames.range(last).end);
        let burst_at = Arc::as_ptr(burst) as usize;
        // Within one pull, a connection's key for the messages of one burst (one log) is the same.
        match &mut self.run {
            Some(run) if run.burst_at == burst_at && run.next == first => {
                run.end = end;
                run.next = last + 1;
            }
            _ => {
                self.end_run();
                let buffer = frames.buffer().clone();
                self.run = Some(Run { buffer, burst_at, next: last + 1, start, end });
            }
        }
        end - start
    }

    /// Queues the run of frames taken so far as one slice.
    fn end_run(&mut self) {
        Run::end(&mut self.run, self.frames);
    }

    /// Messages of one subject between `first` and `last` never reached the gateway. Those a
    /// replay covered are no loss, nor, to a topic subscribed without `since`, those before its
    /// route's first message; the others are repaired, unless something newer was sent already:
    /// then whether one of them is older than that is looked up.
    fn gap(&mut self, first: u64, last: u64, audience: &Audience, first_on_route: bool) -> Flow {
        if first_on_route && self.live_only.contains(audience) {
            return Flow::Continue;
        }
        let Some(uncovered) = first_owed(self.coverage, self.owed_after, audience, first, last) else {
            return Flow::Continue;
        };
        *self.gap_end = (*self.gap_end).max(last);
        if *self.last_sent >= uncovered {
            let through = (*self.last_sent).min(last);
            self.decide(Verdict::MaybeLost { audience: audience.clone(), first: uncovered, through })
        } else {
            self.decide(Verdict::Repair)
        }
    }

    fn decide(&mut self, verdict: Verdict) -> Flow {
        self.verdict = Some(verdict);
        Flow::Stop
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
