//! The session state machine, case by case, with in-memory sources and no I/O: what it sends, in
//! which order, and what it asks of the stream.

use std::sync::Arc;

use bytes::Bytes;
use herald_shared::frame::ServerFrame;
use herald_shared::subject::Audience;

use super::*;
use crate::codec::HeraldCodec;
use crate::delivery::log::{Log, LogLimits};
use crate::delivery::mailbox::Mailbox;

const USER: &str = "u";

/// A session and the sources it reads, as the router would feed them.
struct Harness {
    state: SessionState,
    mailbox: Arc<Mailbox>,
    all: Arc<Log>,
    /// The router's watermark.
    watermark: u64,
}

fn message(seq: u64, audience: Audience, kind: &str) -> Message {
    Message::new(seq, audience, kind, "", "t", Bytes::from(seq.to_string()))
}

fn user_message(seq: u64) -> Live {
    Live::Message(Arc::new(message(seq, Audience::User(USER.into()), "")))
}

fn all_message(seq: u64) -> Live {
    Live::Message(Arc::new(message(seq, Audience::All, "")))
}

fn bounds(first: u64, last: u64) -> Bounds {
    Bounds { first, last, epoch: 0, per_subject_cap: None }
}

impl Harness {
    fn new(start: Start, last: u64) -> Harness {
        Harness::with(start, last, 100, |_| {})
    }

    fn with(start: Start, last: u64, log_entries: usize, adjust: impl FnOnce(&mut Params)) -> Harness {
        let mut harness = Harness::build(start, last, log_entries, adjust);
        assert_eq!(harness.frames(), ["pong"], "the welcome (a stand-in here) goes first");
        harness
    }

    /// A harness whose codec `adjust` may replace (its frames are not read as Herald's).
    fn build(start: Start, last: u64, log_entries: usize, adjust: impl FnOnce(&mut Params)) -> Harness {
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let all = Arc::new(Log::new(LogLimits { entries: log_entries, bytes: 1 << 20 }));
        let start_all = LogStart { audience: Audience::All, log: all.clone(), position: all.end(), routed: 0 };
        let mut params = Params {
            user: USER.into(),
            local: Arc::new(LocalUser::default()),
            codec: Codec::Herald(HeraldCodec),
            sources: LiveSources::new(mailbox.clone(), vec![start_all]),
            topics: Vec::new(),
            allowed_topics: vec!["news".into()],
            max_topics: 2,
            per_subject_cap: 1000,
            keep_topics_every: 2,
            welcome: ServerFrame::Pong,
            bounds: bounds(1, last),
            start,
        };
        adjust(&mut params);
        Harness { state: SessionState::new(params), mailbox, all, watermark: last }
    }

    /// The router routes `entry` to the user's mailbox.
    fn personal(&mut self, entry: Live) {
        self.watermark = self.watermark.max(entry.key());
        let _ = self.mailbox.push(entry);
    }

    /// The router appends `entry` to `push.all`'s log.
    fn broadcast(&mut self, entry: Live) {
        self.watermark = self.watermark.max(entry.key());
        self.all.append(entry);
    }

    /// What the session sends now, each frame as `seq` for a `msg` or its type otherwise.
    fn frames(&mut self) -> Vec<String> {
        self.buffers().concat()
    }

    /// What the session sends now, buffer by buffer (adjacent frames may share one).
    fn buffers(&mut self) -> Vec<Vec<String>> {
        self.state.pull(self.watermark);
        let mut batch = Vec::new();
        self.state.take_frames(&mut batch, usize::MAX, usize::MAX);
        batch.iter().map(|buffer| split(buffer).into_iter().map(describe).collect()).collect()
    }

    fn action(&mut self) -> Option<Action> {
        self.state.pull(self.watermark);
        self.state.poll_action()
    }

    /// Answers a replay with `messages`, then its end.
    fn replay(&mut self, messages: Vec<Message>) {
        self.replay_then(messages, Vec::new());
    }

    /// Answers a replay with `messages`, then its end with the most messages the stream held from
    /// where it was reading on, per audience.
    fn replay_then(&mut self, messages: Vec<Message>, held_ahead: Vec<u64>) {
        for message in messages {
            self.state.on_outcome(Outcome::Replayed(Box::new(message)));
        }
        self.state.on_outcome(Outcome::ReplayEnded(Ok(held_ahead)));
    }

    fn closed_with(&self) -> Option<u16> {
        self.state.closing().map(Close::number)
    }
}

/// The WebSocket frames in `buffer`.
fn split(mut buffer: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while !buffer.is_empty() {
        let (head, len) = match buffer[1] & 0x7f {
            126 => (4, u16::from_be_bytes([buffer[2], buffer[3]]) as usize),
            127 => (10, u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize),
            short => (2, short as usize),
        };
        frames.push(&buffer[..head + len]);
        buffer = &buffer[head + len..];
    }
    frames
}

/// A frame as `seq` (a `msg`), `replayed:<from>-<to>/<count>/<complete>[/topic]` or its type.
fn describe(frame: &[u8]) -> String {
    let payload = match frame[1] & 0x7f {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    };
    match serde_json::from_slice::<ServerFrame>(payload).expect("a JSON frame") {
        ServerFrame::Msg(msg) => msg.seq.to_string(),
        ServerFrame::Replayed { from, to, count, complete, topic } => {
            let topic = topic.map(|t| format!("/{t}")).unwrap_or_default();
            format!("replayed:{from}-{to}/{count}/{complete}{topic}")
        }
        ServerFrame::Subscribed { topic } => format!("subscribed:{topic}"),
        ServerFrame::Unsubscribed { topic } => format!("unsubscribed:{topic}"),
        ServerFrame::Error { code, topic, .. } => format!("error:{code}:{}", topic.unwrap_or_default()),
        ServerFrame::Read { seq, unread } => format!("read:{seq}/{unread}"),
        other => other.to_json().split('"').nth(3).unwrap_or("?").to_string(),
    }
}

/// The stream's answer to a search for a stored message: `seq`, of no kind.
fn found(seq: u64) -> Outcome {
    Outcome::Stored(Ok(Some(Stored { seq, kind: String::new() })))
}

fn replay_of(audiences: Vec<Audience>, since: u64, upto: u64) -> Option<Action> {
    Some(Action::Replay { audiences, since, upto })
}

fn everything() -> Vec<Audience> {
    vec![Audience::User(USER.into()), Audience::All]
}

#[test]
fn a_live_session_sends_personal_and_broadcast_messages_merged_in_order_once_each() {
    let mut h = Harness::new(Start::Live, 10);
    assert_eq!(h.action(), None);
    h.personal(user_message(12));
    h.broadcast(all_message(11));
    h.broadcast(all_message(13));
    h.personal(user_message(13)); // a duplicate: the stream never sends a seq twice, a router might
    assert_eq!(h.frames(), ["11", "12", "13"]);
    // A message at or below the stream's end when the session started was not addressed to it.
    h.broadcast(all_message(14));
    assert_eq!(h.frames(), ["14"]);
    assert_eq!(h.state.last_sent(), 14);
}

#[test]
fn nothing_is_sent_past_the_watermark_before_what_the_router_has_not_routed_yet() {
    let mut h = Harness::new(Start::Live, 10);
    h.all.append(all_message(12)); // appended, but the router has not finished its burst
    assert!(h.frames().is_empty());
    h.personal(user_message(11));
    h.watermark = 12;
    assert_eq!(h.frames(), ["11", "12"]);
}

#[test]
fn a_resume_replays_first_holding_live_messages_then_sends_only_newer_ones() {
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Nothing }, 9);
    assert_eq!(h.action(), replay_of(everything(), 5, 9));
    // Live messages that arrive meanwhile wait; one of them (9) is in the replay too.
    h.broadcast(all_message(9));
    h.personal(user_message(10));
    assert!(h.frames().is_empty(), "live waits for the replay");
    h.replay(vec![message(6, Audience::User(USER.into()), ""), message(9, Audience::All, "")]);
    assert_eq!(h.frames(), ["6", "9", "replayed:6-9/2/true", "10"]);
    assert_eq!(h.action(), None);
}

#[test]
fn a_resume_from_beyond_the_stream_after_a_noted_loss_or_unsure_of_one_is_incomplete() {
    let mut h = Harness::new(Start::Resume { requested: 50, noted: Noted::Nothing }, 9);
    assert_eq!(h.action(), replay_of(everything(), 9, 9));
    h.replay(Vec::new());
    assert_eq!(h.frames(), ["replayed:10-9/0/false"]);

    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Lost(LostNote { first: 4, revision: 1 }) }, 9);
    h.action();
    h.replay(Vec::new());
    assert_eq!(h.frames(), ["replayed:6-5/0/false"]);

    // Messages noted lost after `since` are in this replay: nothing is missing.
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Lost(LostNote { first: 7, revision: 1 }) }, 9);
    h.action();
    h.replay(Vec::new());
    assert_eq!(h.frames(), ["replayed:6-5/0/true"]);

    // The note could not be read: anything may be missing.
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Unknown }, 9);
    h.action();
    h.replay(Vec::new());
    assert_eq!(h.frames(), ["replayed:6-5/0/false"]);
}

/// STOMP cannot say a resume is incomplete: it replays from a noted loss instead, but never from the
/// stream's start when the note could not be read (the join refuses such a resume).
#[test]
fn a_stomp_resume_replays_from_a_noted_loss_and_not_from_an_unknown_one() {
    let lost = Noted::Lost(LostNote { first: 4, revision: 1 });
    let mut h = Harness::build(Start::Resume { requested: 5, noted: lost }, 9, 100, |p| p.codec = stomp());
    assert_eq!(h.action(), replay_of(everything(), 3, 9));
    let mut h = Harness::build(Start::Resume { requested: 5, noted: Noted::Unknown }, 9, 100, |p| p.codec = stomp());
    assert_eq!(h.action(), replay_of(everything(), 5, 9));
}

/// STOMP holds what its replay sends again until the client subscribes: the note goes only once
/// what the first subscription released was written, or a client that leaves before subscribing
/// would never get the lost message.
#[test]
fn a_stomp_resumes_note_is_forgotten_once_what_its_first_subscription_released_was_written() {
    let lost = Noted::Lost(LostNote { first: 4, revision: 7 });
    let mut h = Harness::build(Start::Resume { requested: 5, noted: lost }, 9, 100, |p| p.codec = stomp());
    h.action();
    h.replay(vec![message(4, Audience::User(USER.into()), "")]);
    write_all(&mut h);
    assert_eq!(h.state.take_reported_note(), None, "the lost message waits for a subscription");

    let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/updates\n\n\0";
    h.state.codec_mut().decode(subscribe);
    queue_replies(&mut h);
    assert_eq!(h.state.take_reported_note(), None, "released, not written yet");
    assert!(write_all(&mut h).contains("message-id:4\n"));
    assert_eq!(h.state.take_reported_note(), Some(7));
}

/// When the held messages overflowed, the first subscription gets the oldest (the lost one among
/// them) from a refill: the note waits for it.
#[test]
fn a_stomp_resumes_note_waits_for_the_refill_of_what_overflowed() {
    let user = || Audience::User(USER.into());
    let lost = Noted::Lost(LostNote { first: 4, revision: 7 });
    let mut h = Harness::build(Start::Resume { requested: 5, noted: lost }, 1030, 100, |p| p.codec = stomp());
    h.action();
    // More than the codec holds: the oldest, 4 to 6, are let go.
    h.replay((4..=1030).map(|seq| message(seq, user(), "")).collect());
    write_all(&mut h);
    let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/updates\n\n\0";
    let decoded = h.state.codec_mut().decode(subscribe);
    let [Ok(crate::codec::Command::Refill { audience, since: 3 })] = &decoded[..] else { panic!("{decoded:?}") };
    h.state.refill(audience.clone(), 3);
    queue_replies(&mut h);
    write_all(&mut h);
    assert_eq!(h.state.take_reported_note(), None, "the lost message is still to be read again");
    assert!(matches!(h.action(), Some(Action::ReadBounds { .. })), "the refill's bounds");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 1030))));
    assert!(matches!(h.action(), Some(Action::Replay { .. })), "the refill's replay");
    h.replay((4..=6).map(|seq| message(seq, user(), "")).collect());
    assert_eq!(h.state.take_reported_note(), None, "refilled, not written yet");
    assert!(write_all(&mut h).contains("message-id:4\n"));
    assert_eq!(h.state.take_reported_note(), Some(7));
}

/// What auto-acknowledged subscriptions were sent moves the cursor once a refill that held it back
/// is sent: the held-back position was used up, and the cursor stayed below the refill until the
/// next live message.
#[test]
fn an_auto_acknowledged_cursor_held_back_by_a_refill_moves_once_the_refill_is_sent() {
    let user = || Audience::User(USER.into());
    let mut h = Harness::build(Start::Resume { requested: 3, noted: Noted::Nothing }, 1035, 100, |p| p.codec = stomp());
    h.action();
    // More than the codec holds for the inbox (4 to 6 are let go), then broadcasts.
    let mut backlog: Vec<_> = (4..=1030).map(|seq| message(seq, user(), "")).collect();
    backlog.extend((1031..=1035).map(|seq| message(seq, Audience::All, "")));
    h.replay(backlog);
    write_all(&mut h);
    let decoded = h.state.codec_mut().decode(b"SUBSCRIBE\nid:q\ndestination:/user/queue/updates\n\n\0");
    let [Ok(crate::codec::Command::Refill { audience, since: 3 })] = &decoded[..] else { panic!("{decoded:?}") };
    h.state.refill(audience.clone(), 3);
    let decoded = h.state.codec_mut().decode(b"SUBSCRIBE\nid:all\ndestination:/topic/all\n\n\0");
    assert!(matches!(&decoded[..], [Ok(crate::codec::Command::Nothing)]), "{decoded:?}");
    queue_replies(&mut h);
    assert!(write_all(&mut h).contains("message-id:1035\n"));
    assert_eq!(h.state.take_auto_ack(), Some(3), "the refill owes 4");
    assert!(matches!(h.action(), Some(Action::ReadBounds { .. })), "the refill's bounds");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 1035))));
    assert!(matches!(h.action(), Some(Action::Replay { .. })), "the refill's replay");
    h.replay((4..=1030).map(|seq| message(seq, user(), "")).collect());
    assert!(write_all(&mut h).contains("message-id:1030\n"));
    assert_eq!(h.state.take_auto_ack(), Some(1035));
}

/// Queues what the codec answered the client's frames with, as the session's inbound handling does.
fn queue_replies(h: &mut Harness) {
    for frame in h.state.codec_mut().take_replies() {
        h.state.push_frame(frame);
    }
}

/// Takes every queued frame, as the socket writes them; returns them as text.
fn write_all(h: &mut Harness) -> String {
    let mut batch = Vec::new();
    h.state.take_frames(&mut batch, usize::MAX, usize::MAX);
    batch.iter().map(|frame| String::from_utf8_lossy(frame)).collect()
}

fn stomp() -> Codec {
    let connected = crate::codec::stomp::Connected {
        version: crate::codec::stomp::Version::V12,
        client_sends: std::time::Duration::ZERO,
        client_wants: std::time::Duration::ZERO,
        allowed_topics: Vec::new(),
    };
    let transport = crate::codec::stomp::Transport::WebSocket;
    Codec::Stomp(Box::new(crate::codec::StompCodec::new(connected, std::time::Duration::ZERO, transport, 1024)))
}

/// A session resumed at `requested` (the stream's last is 9), having read `lost`, its replay done.
fn resumed(requested: u64, lost: Option<LostNote>) -> Harness {
    let mut h = Harness::new(Start::Resume { requested, noted: lost.map_or(Noted::Nothing, Noted::Lost) }, 9);
    h.action();
    h.replay(Vec::new());
    h.frames();
    h
}

/// Whether the session closes when another connection of its device notes messages from `first` on
/// as lost, at `revision`.
fn closes_when_told(h: &mut Harness, first: u64, revision: u64) -> bool {
    h.mailbox.push_event(Event::LossNoted(LostNote { first, revision }));
    h.state.pull(h.watermark);
    h.closed_with() == Some(4008)
}

#[test]
fn a_resume_that_came_before_a_loss_was_noted_past_it_closes_when_told() {
    assert!(closes_when_told(&mut resumed(5, None), 4, 3), "resumed past 4 with no note read");
    assert!(closes_when_told(&mut resumed(5, None), 5, 3), "5 itself was not replayed");
    let read_older = Some(LostNote { first: 2, revision: 2 });
    assert!(closes_when_told(&mut resumed(5, read_older), 4, 3), "a newer note than the one it read");
}

#[test]
fn a_resume_that_read_the_note_or_replayed_the_lost_messages_stays_when_told() {
    let read_it = Some(LostNote { first: 4, revision: 3 });
    assert!(!closes_when_told(&mut resumed(5, read_it), 4, 3), "its replay reported this loss");
    assert!(!closes_when_told(&mut resumed(5, None), 6, 3), "its replay had 6 on");
    assert!(!closes_when_told(&mut Harness::new(Start::Live, 9), 4, 3), "a live start owes nothing older");
}

#[test]
fn a_replay_that_may_miss_trimmed_messages_is_incomplete() {
    let mut h = Harness::with(Start::Resume { requested: 5, noted: Noted::Nothing }, 9, 100, |p| p.per_subject_cap = 2);
    h.action();
    h.replay(vec![message(6, Audience::All, ""), message(7, Audience::All, "")]);
    assert_eq!(h.frames(), ["6", "7", "replayed:6-7/2/false"]);
    // One read, while the stream held as many as the cap from where the replay was reading: its
    // trimming had reached the replay, and may have taken one the replay had yet to read.
    for (held_ahead, complete) in [(2, false), (1, true)] {
        let start = Start::Resume { requested: 5, noted: Noted::Nothing };
        let mut h = Harness::with(start, 9, 100, |p| p.per_subject_cap = 2);
        h.action();
        h.replay_then(vec![message(7, Audience::All, "")], vec![held_ahead; 4]);
        assert_eq!(h.frames(), ["7", &format!("replayed:6-7/1/{complete}")]);
    }
}

#[test]
fn muted_kinds_are_neither_replayed_nor_sent_live() {
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Nothing }, 9);
    h.state.local.set_muted(&["ads".into()], 1);
    h.action();
    h.replay(vec![message(6, Audience::All, "ads"), message(7, Audience::All, "mail")]);
    assert_eq!(h.frames(), ["7", "replayed:6-7/1/true"]);
    h.broadcast(Live::Message(Arc::new(message(10, Audience::All, "ads"))));
    h.personal(Live::Message(Arc::new(message(11, Audience::User(USER.into()), "mail"))));
    assert_eq!(h.frames(), ["11"]);
    // Muting applies at read time: messages already waiting when the user mutes are skipped.
    h.broadcast(Live::Message(Arc::new(message(12, Audience::All, "mail"))));
    h.state.local.set_muted(&["mail".into()], 2);
    assert!(h.frames().is_empty());
}

#[test]
fn a_gap_is_repaired_from_the_stream_before_anything_newer_is_sent() {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    h.broadcast(Live::Gap { first: 12, last: 12, audience: Audience::All, first_on_route: false });
    h.broadcast(all_message(13));
    h.personal(user_message(14));
    assert_eq!(h.frames(), ["11"], "nothing after the gap before the repair");
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 12 }), "bounds that reach the gap, stored");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 13))));
    assert_eq!(h.action(), replay_of(everything(), 11, 13));
    h.replay(vec![message(12, Audience::All, ""), message(13, Audience::All, "")]);
    assert_eq!(h.frames(), ["12", "13", "14"], "repaired, then live goes on past what was replayed");
    assert_eq!(h.state.take_tally().repairs, 1);
}

#[test]
fn a_gap_a_replay_covered_is_no_loss() {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(Live::Gap { first: 9, last: 10, audience: Audience::All, first_on_route: false });
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    assert_eq!(h.action(), None);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }), "a gap that was no loss sets no floor");
}

/// A session that sent 11 and 12, whose user's next message (14) names a predecessor that never
/// came (12 < missing <= 13): is one of the missing messages older than 12, already sent? The
/// stream's leader is asked.
fn checking_a_loss() -> Harness {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    h.broadcast(all_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.personal(Live::Gap { first: 12, last: 13, audience: Audience::User(USER.into()), first_on_route: false });
    h.personal(user_message(14));
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::FindStored { audience: Audience::User(USER.into()), from: 12 }));
    h
}

#[test]
fn a_gap_behind_a_newer_message_already_sent_is_noted_and_closes_with_4008() {
    let mut h = checking_a_loss();
    // A message of the user's at or below what was sent (here: 12): lost.
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
    assert_eq!(h.closed_with(), None, "the note is written first");
    h.state.on_outcome(Outcome::Noted);
    assert_eq!(h.closed_with(), Some(4008));
    assert!(!h.state.owes_loss_check(), "noted once: the connection's end does not note it again");
    let tally = h.state.take_tally();
    assert_eq!((tally.unrepairable, tally.losses_assumed), (1, 0));
}

#[test]
fn a_gap_behind_a_newer_message_whose_missing_messages_are_all_newer_is_repaired() {
    let mut h = checking_a_loss();
    // The only missing one is 13, newer than anything sent: a repair brings it in order.
    h.state.on_outcome(found(13));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 13 }));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 14))));
    assert_eq!(h.action(), replay_of(everything(), 12, 14));
    h.replay(vec![message(13, Audience::User(USER.into()), ""), message(14, Audience::User(USER.into()), "")]);
    assert_eq!(h.frames(), ["13", "14"]);
    assert_eq!(h.closed_with(), None);
    let tally = h.state.take_tally();
    assert_eq!((tally.unrepairable, tally.repairs), (0, 1));
}

#[test]
fn a_message_missed_behind_newer_ones_before_a_catch_up_is_still_found_lost_after_it() {
    let mut h = Harness::new(Start::Live, 10);
    let user = Audience::User(USER.into());
    h.broadcast(all_message(11));
    h.broadcast(all_message(13));
    assert_eq!(h.frames(), ["11", "13"]);
    // The user's 12 never reached the gateway and nothing came after it on its subject yet; the
    // feed reconnects (or a stream leader cannot say what it stores): every session catches up.
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 15))));
    assert_eq!(h.action(), replay_of(everything(), 13, 15));
    h.replay(vec![message(14, user.clone(), ""), message(15, Audience::All, "")]);
    assert_eq!(h.frames(), ["14", "15"]);
    // Then 12 shows: the catch-up read only past 13, so it covers nothing of 12.
    h.personal(Live::Gap { first: 12, last: 12, audience: user.clone(), first_on_route: false });
    h.personal(user_message(16));
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 12 }));
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
    h.state.on_outcome(Outcome::Noted);
    assert_eq!(h.closed_with(), Some(4008));
}

#[test]
fn a_missing_message_a_catch_up_sent_is_no_loss_and_the_next_one_is_looked_for() {
    let mut h = Harness::new(Start::Live, 10);
    let user = Audience::User(USER.into());
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    h.mailbox.push_event(Event::Repair);
    h.action();
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 13))));
    h.action();
    h.replay(vec![message(12, user.clone(), ""), message(13, Audience::All, "")]);
    h.broadcast(all_message(14));
    assert_eq!(h.frames(), ["12", "13", "14"]);
    // The user's subject misses 11..=15 as far as the router knows: 12 was the catch-up's.
    h.personal(Live::Gap { first: 11, last: 15, audience: user.clone(), first_on_route: false });
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::FindStored { audience: user.clone(), from: 11 }));
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::FindStored { audience: user.clone(), from: 14 }), "past the catch-up");
    // The next one is 15, newer than anything sent: repaired in order.
    h.state.on_outcome(found(15));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 15 }));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 15))));
    assert_eq!(h.action(), replay_of(everything(), 14, 15));
    h.replay(vec![message(15, user, "")]);
    assert_eq!(h.frames(), ["15"]);
    assert_eq!(h.closed_with(), None);
}

#[test]
fn a_missing_message_of_a_muted_kind_is_no_loss() {
    let mut h = Harness::new(Start::Live, 10);
    h.state.local.set_muted(&["ads".into()], 1);
    let user = Audience::User(USER.into());
    h.broadcast(all_message(11));
    h.broadcast(all_message(13));
    assert_eq!(h.frames(), ["11", "13"]);
    h.personal(Live::Gap { first: 12, last: 12, audience: user.clone(), first_on_route: false });
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 12 }));
    // The user's 12 is an ad: never owed to this user.
    h.state.on_outcome(Outcome::Stored(Ok(Some(Stored { seq: 12, kind: "ads".into() }))));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 12 }));
    assert_eq!(h.closed_with(), None);
}

#[test]
fn a_missing_message_a_topic_block_sent_while_its_check_waited_is_no_loss() {
    let mut h = Harness::new(Start::Live, 10);
    let news = Audience::Topic("news".into());
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = || LogStart { audience: Audience::Topic("news".into()), log: log.clone(), position: 0, routed: 10 };
    h.state.subscribe("news".into(), None);
    h.action();
    h.state.on_outcome(Outcome::Attached(Ok(start())));
    h.action();
    h.state.on_outcome(Outcome::Flushed);
    h.broadcast(all_message(11));
    log.append(Live::Message(Arc::new(message(13, news.clone(), ""))));
    h.watermark = 13;
    assert_eq!(h.frames(), ["subscribed:news", "11", "13"]);
    // The client asks for the topic from 10; meanwhile news's 12 shows missing behind 13.
    h.state.subscribe("news".into(), Some(10));
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Replaying }));
    log.append(Live::Gap { first: 12, last: 12, audience: news.clone(), first_on_route: false });
    assert!(h.frames().is_empty());
    h.state.on_outcome(Outcome::Attached(Ok(start())));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 13))));
    assert_eq!(h.action(), replay_of(vec![news.clone()], 10, 13));
    h.replay(vec![message(12, news.clone(), ""), message(13, news.clone(), "")]);
    assert_eq!(h.frames(), ["subscribed:news", "12", "13", "replayed:11-13/2/true/news"]);
    // The check that waited finds 12, which the block sent.
    assert_eq!(h.action(), Some(Action::FindStored { audience: news, from: 12 }));
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 12 }));
    assert_eq!(h.closed_with(), None);
}

#[test]
fn a_stream_that_cannot_say_whether_a_message_is_lost_notes_the_loss_from_the_first_missing_one() {
    let mut h = Harness::new(Start::Live, 10);
    let user = Audience::User(USER.into());
    h.broadcast(all_message(11));
    h.broadcast(all_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.personal(Live::Gap { first: 12, last: 13, audience: user.clone(), first_on_route: false });
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 12 }));
    h.state.on_outcome(Outcome::Stored(Err("timed out".into())));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
    let tally = h.state.take_tally();
    assert_eq!((tally.unrepairable, tally.losses_assumed), (1, 1));
}

#[test]
fn falling_out_of_a_log_window_is_repaired_not_lost() {
    let mut h = Harness::with(Start::Live, 10, 4, |_| {});
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    for seq in 12..=20 {
        h.broadcast(all_message(seq));
    }
    // 12..=16 were evicted unread: catch up from the stream.
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 18))));
    assert_eq!(h.action(), replay_of(everything(), 11, 18));
    h.replay((12..=18).map(|seq| message(seq, Audience::All, "")).collect());
    assert_eq!(h.frames(), ["12", "13", "14", "15", "16", "17", "18", "19", "20"]);
    assert_eq!(h.closed_with(), None);
}

#[test]
fn a_gap_evicted_unread_from_a_log_is_still_looked_into() {
    let mut h = Harness::with(Start::Live, 10, 4, |_| {});
    h.broadcast(all_message(11));
    h.personal(user_message(13));
    assert_eq!(h.frames(), ["11", "13"]);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    // While the catch-up holds live delivery, the log learns that all's 12 never came, and then
    // evicts that news unread.
    h.broadcast(Live::Gap { first: 12, last: 12, audience: Audience::All, first_on_route: false });
    for seq in 14..=20 {
        h.broadcast(all_message(seq));
    }
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 20))));
    assert_eq!(h.action(), replay_of(everything(), 13, 20));
    h.replay((14..=20).map(|seq| message(seq, Audience::All, "")).collect());
    assert_eq!(h.frames(), ["14", "15", "16", "17", "18", "19", "20"]);
    assert_eq!(h.action(), Some(Action::FindStored { audience: Audience::All, from: 12 }));
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
}

#[test]
fn a_gap_queued_when_the_mailbox_overflows_is_still_looked_into() {
    let mut h = Harness::new(Start::Live, 10);
    let user = Audience::User(USER.into());
    h.broadcast(all_message(11));
    h.broadcast(all_message(13));
    assert_eq!(h.frames(), ["11", "13"]);
    h.personal(Live::Gap { first: 12, last: 12, audience: user.clone(), first_on_route: false });
    // More of the user's messages than the mailbox holds, before the session looks.
    let overflowing = (1 << 20) / 160 + 1;
    for seq in 14..14 + overflowing {
        h.personal(user_message(seq));
    }
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }), "the overflow: a catch-up first");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 13))));
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 12 }), "then the gap it kept");
}

#[test]
fn evictions_of_what_was_already_sent_need_no_repair() {
    let mut h = Harness::with(Start::Live, 10, 2, |_| {});
    for seq in 11..=12 {
        h.broadcast(all_message(seq));
    }
    assert_eq!(h.frames(), ["11", "12"]);
    // Sent by a repair meanwhile, say: the session is past what the log evicts.
    h.state.last_sent = 13;
    for seq in [13, 14] {
        h.broadcast(all_message(seq));
    }
    assert_eq!(h.frames(), ["14"]);
    assert_eq!(h.action(), None);
}

#[test]
fn an_overflowing_mailbox_and_a_reconnected_feed_are_repaired_once_each() {
    let mut h = Harness::new(Start::Live, 10);
    h.mailbox.push_event(Event::Repair);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    // A reason that comes while the repair is under way needs another one.
    h.mailbox.push_event(Event::Repair);
    h.state.pull(h.watermark);
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 10))));
    // Nothing stored past what was sent: no replay, and the second repair starts.
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    assert_eq!(h.state.take_tally().repairs, 2);
}

#[test]
fn a_repair_with_nothing_stored_past_what_was_sent_reads_no_replay_and_live_goes_on() {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    h.broadcast(all_message(12));
    assert!(h.frames().is_empty(), "live messages wait for the repair");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 11))));
    assert_eq!(h.action(), None);
    assert_eq!(h.frames(), ["12"]);
    let tally = h.state.take_tally();
    assert_eq!((tally.repairs, tally.replays), (1, 0));
}

#[test]
fn a_repair_that_finds_messages_gone_closes_with_4008_before_sending_what_follows_them() {
    let mut h = Harness::new(Start::Live, 10);
    h.mailbox.push_event(Event::Repair);
    h.action();
    // The stream now starts after messages the session never got: nothing is read.
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(15, 20))));
    assert_eq!(h.closed_with(), Some(4008));
    assert_eq!(h.action(), None);

    // The per-subject limit trimmed messages ahead of the catch-up: said before its first message.
    let mut h = Harness::with(Start::Live, 10, 100, |p| p.per_subject_cap = 2);
    h.mailbox.push_event(Event::Repair);
    h.action();
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 20))));
    assert_eq!(h.action(), replay_of(everything(), 10, 20));
    h.state.on_outcome(Outcome::HeldAhead(vec![0, 2]));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(19, Audience::All, ""))));
    assert_eq!(h.closed_with(), Some(4008));
    assert!(h.frames().is_empty(), "nothing past the removed messages");
    // Its client resumes from 10, and that replay reports them: nothing to note.
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
}

/// A catch-up that learns of removed messages only after it sent some that follow them (the limit
/// trimmed while it read) notes the loss, then closes with 4008: its client resumes past them.
#[test]
fn a_repair_that_sent_messages_past_removed_ones_notes_the_loss_then_closes() {
    let mut h = Harness::with(Start::Live, 10, 100, |p| p.per_subject_cap = 2);
    h.mailbox.push_event(Event::Repair);
    h.action();
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 20))));
    h.action();
    h.state.on_outcome(Outcome::Replayed(Box::new(message(12, Audience::All, ""))));
    assert_eq!(h.frames(), ["12"]);
    h.replay_then(vec![message(19, Audience::All, "")], vec![0, 2]);
    assert_eq!(h.action(), Some(Action::NoteLost { first: 11 }));
    h.state.on_outcome(Outcome::Noted);
    assert_eq!(h.closed_with(), Some(4008));
}

/// A connection that ends while its first replay sends messages past some the stream's limits
/// removed, or before its `replayed` frame saying so was written, notes the loss: its client
/// resumes from the last `seq` it got, and that resume reports it.
#[test]
fn a_resume_cut_short_after_messages_past_removed_ones_notes_the_loss() {
    let start = || Start::Resume { requested: 5, noted: Noted::Nothing };
    // Mid-replay.
    let mut h = Harness::with(start(), 9, 100, |p| p.per_subject_cap = 2);
    assert_eq!(h.action(), replay_of(everything(), 5, 9));
    h.state.on_outcome(Outcome::HeldAhead(vec![0, 2]));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(8, Audience::All, ""))));
    assert_eq!(h.frames(), ["8"]);
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(None), Some(Action::NoteLost { first: 6 }));
    // Nothing sent yet, or nothing removed: nothing to note.
    for (held_ahead, sent) in [(2, false), (1, true)] {
        let mut h = Harness::with(start(), 9, 100, |p| p.per_subject_cap = 2);
        h.action();
        h.state.on_outcome(Outcome::HeldAhead(vec![0, held_ahead]));
        if sent {
            h.state.on_outcome(Outcome::Replayed(Box::new(message(8, Audience::All, ""))));
        }
        h.state.examine_unread(0);
        assert!(!h.state.owes_loss_check(), "held ahead {held_ahead}");
    }
    // Failed (the stream unavailable for too long) after sending past them: 1013, and noted.
    let mut h = Harness::with(start(), 9, 100, |p| p.per_subject_cap = 2);
    h.action();
    h.state.on_outcome(Outcome::HeldAhead(vec![0, 2]));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(8, Audience::All, ""))));
    h.state.on_outcome(Outcome::ReplayEnded(Err("no leader".into())));
    assert_eq!(h.closed_with(), Some(1013));
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(None), Some(Action::NoteLost { first: 6 }));
    // STOMP cannot be told: a note would only send again, from it, what the client had.
    let mut h = Harness::build(start(), 9, 100, |p| (p.per_subject_cap, p.codec) = (2, stomp()));
    h.action();
    h.state.on_outcome(Outcome::HeldAhead(vec![0, 2]));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(8, Audience::All, ""))));
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
    // Ended, its `replayed` frame queued, taken but not written, or written.
    for (take, unwritten, noted) in [(false, 0, true), (true, 1, true), (true, 0, false)] {
        let mut h = Harness::with(start(), 9, 100, |p| p.per_subject_cap = 2);
        h.action();
        h.replay_then(vec![message(8, Audience::All, "")], vec![0, 2]);
        if take {
            assert_eq!(h.frames(), ["8", "replayed:6-8/1/false"]);
        }
        h.state.examine_unread(unwritten);
        let expected = noted.then_some(Action::NoteLost { first: 6 });
        assert_eq!(h.state.owes_loss_check().then(|| h.state.next_loss_action(None)).flatten(), expected);
    }
}

#[test]
fn a_failed_replay_closes_with_1013() {
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Nothing }, 9);
    h.action();
    h.state.on_outcome(Outcome::ReplayEnded(Err("timed out".into())));
    assert_eq!(h.closed_with(), Some(1013));
    assert_eq!(h.action(), None);
}

/// A live session that sent 11 (`push.all`) and `personal` (its user's), joining topic `news` with
/// `since` 5: attached to the returned log, it reads the stream's bounds next.
fn joining_news_since_5(personal: u64) -> (Harness, Arc<Log>) {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    h.personal(user_message(personal));
    assert_eq!(h.frames(), ["11".to_string(), personal.to_string()]);
    h.state.subscribe("news".into(), Some(5));
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Replaying }));
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = LogStart { audience: Audience::Topic("news".into()), log: log.clone(), position: 0, routed: 0 };
    h.state.on_outcome(Outcome::Attached(Ok(start)));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    (h, log)
}

#[test]
fn a_topic_joined_with_since_sends_older_messages_as_a_block_then_catches_up_in_order() {
    let (mut h, log) = joining_news_since_5(12);
    let news = Audience::Topic("news".into());
    // Live messages while the topic replays wait, the topic's own among them.
    h.personal(user_message(15));
    log.append(Live::Message(Arc::new(message(16, news.clone(), ""))));
    h.watermark = 16;
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 14))));
    assert_eq!(h.action(), replay_of(vec![news.clone()], 5, 14));
    h.replay(vec![message(7, news.clone(), ""), message(13, news.clone(), "")]);
    assert_eq!(h.action(), replay_of(vec![Audience::User(USER.into()), Audience::All, news.clone()], 12, 14));
    h.replay(vec![message(13, news.clone(), "")]);
    assert_eq!(h.frames(), ["subscribed:news", "7", "replayed:6-13/2/true/news", "13", "15", "16"]);
    assert_eq!(h.state.audiences().len(), 3);
    // What the topic's block read is no loss, though the session had sent newer messages then.
    log.append(Live::Gap { first: 6, last: 14, audience: news.clone(), first_on_route: false });
    log.append(Live::Message(Arc::new(message(17, news, ""))));
    h.watermark = 17;
    assert_eq!(h.frames(), ["17"]);
    assert_eq!(h.action(), None);
}

/// A live session that sent 11 (`push.all`) and 12 (its user's), joining topic `news` from 14,
/// past them: attached to the returned log, it reads the stream's bounds next.
fn joining_news_since_14() -> (Harness, Arc<Log>) {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    h.personal(user_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.state.subscribe("news".into(), Some(14));
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Replaying }));
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = LogStart { audience: news(), log: log.clone(), position: 0, routed: 0 };
    h.state.on_outcome(Outcome::Attached(Ok(start)));
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    (h, log)
}

fn news() -> Audience {
    Audience::Topic("news".into())
}

fn news_message(seq: u64) -> Message {
    message(seq, news(), "")
}

#[test]
fn a_topic_joined_since_past_what_was_sent_catches_up_without_the_topics_messages_up_to_it() {
    let (mut h, log) = joining_news_since_14();
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 15))));
    assert_eq!(h.action(), replay_of(vec![news()], 14, 15));
    h.replay(vec![news_message(15)]);
    // The catch-up reads from what the session sent (12): the topic's 13 and 14 come up again.
    let mut audiences = everything();
    audiences.push(news());
    assert_eq!(h.action(), replay_of(audiences, 12, 15));
    h.replay((13..=15).map(news_message).collect());
    assert_eq!(h.frames(), ["subscribed:news", "replayed:15-15/1/true/news", "15"]);
    log.append(Live::Message(Arc::new(news_message(16))));
    h.watermark = 16;
    assert_eq!(h.frames(), ["16"]);
}

#[test]
fn a_topic_joined_since_past_what_was_sent_takes_nothing_up_to_it_that_comes_live() {
    let (mut h, log) = joining_news_since_14();
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 14))));
    h.replay(Vec::new());
    h.replay(vec![news_message(13), news_message(14)]);
    assert_eq!(h.frames(), ["subscribed:news", "replayed:15-14/0/true/news"]);
    // 14, stored before the bounds were read, reaches the gateway's log only now.
    log.append(Live::Message(Arc::new(news_message(14))));
    log.append(Live::Message(Arc::new(news_message(15))));
    h.watermark = 15;
    assert_eq!(h.frames(), ["15"]);
}

#[test]
fn a_refill_sends_again_what_was_taken_as_a_block_then_catches_up_in_order() {
    let mut h = Harness::new(Start::Live, 10);
    let user = Audience::User(USER.into());
    h.personal(user_message(11));
    h.personal(user_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    // (A STOMP codec asks for this when it dropped messages it held for a destination.)
    h.state.refill(user.clone(), 10);
    // Live messages wait from the moment the refill is asked for.
    h.personal(user_message(14));
    assert_eq!(h.frames(), Vec::<String>::new());
    // Bounds from behind what was sent would leave some out.
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 12 }));
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 13))));
    assert_eq!(h.action(), replay_of(vec![user.clone()], 10, 13));
    h.replay(vec![message(11, user.clone(), ""), message(12, user.clone(), ""), message(13, user.clone(), "")]);
    assert_eq!(h.action(), replay_of(everything(), 12, 13));
    h.replay(vec![message(13, user, "")]);
    assert_eq!(h.frames(), ["11", "12", "13", "14"]);
    assert_eq!(h.action(), None);
}

/// How far a refill got before the connection ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RefillEnd {
    ReadingBounds,
    Replaying,
    EndedUnwritten,
    /// Taken for the socket, still in flight.
    EndedTaken,
    EndedWritten,
}

#[test]
fn what_a_refill_had_not_written_when_the_connection_ended_is_noted_lost_from_its_start() {
    use RefillEnd::*;
    let user = Audience::User(USER.into());
    for end in [ReadingBounds, Replaying, EndedUnwritten, EndedTaken, EndedWritten] {
        let mut h = Harness::new(Start::Live, 10);
        h.personal(user_message(11));
        h.personal(user_message(12));
        assert_eq!(h.frames(), ["11", "12"]);
        h.state.refill(user.clone(), 10);
        assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 12 }));
        if end != ReadingBounds {
            h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 12))));
            assert_eq!(h.action(), replay_of(vec![user.clone()], 10, 12));
            h.state.on_outcome(Outcome::Replayed(Box::new(message(11, user.clone(), ""))));
        }
        if matches!(end, EndedUnwritten | EndedTaken | EndedWritten) {
            h.state.on_outcome(Outcome::Replayed(Box::new(message(12, user.clone(), ""))));
            h.state.on_outcome(Outcome::ReplayEnded(Ok(Vec::new())));
            // Nothing stored past what was sent: its catch-up reads nothing.
            assert_eq!(h.action(), None);
        }
        if matches!(end, EndedTaken | EndedWritten) {
            assert_eq!(h.frames(), ["11", "12"]);
        }
        h.state.examine_unread(if end == EndedTaken { 2 } else { 0 });
        let noted = h.state.owes_loss_check().then(|| h.state.next_loss_action(None));
        let expected = (end != EndedWritten).then_some(Some(Action::NoteLost { first: 11 }));
        assert_eq!(noted, expected, "{end:?}");
    }
}

#[test]
fn a_refill_written_whole_owes_nothing_when_a_later_one_is_cut_short() {
    let user = Audience::User(USER.into());
    let mut h = Harness::new(Start::Live, 10);
    let refill = |h: &mut Harness, since: u64, last: u64| {
        h.state.refill(user.clone(), since);
        assert_eq!(h.action(), Some(Action::ReadBounds { at_least: last }));
        h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, last))));
        assert_eq!(h.action(), replay_of(vec![user.clone()], since, last));
        h.replay(vec![message(last, user.clone(), "")]);
    };
    h.personal(user_message(11));
    assert_eq!(h.frames(), ["11"]);
    refill(&mut h, 10, 11);
    assert_eq!(h.frames(), ["11"]);
    h.personal(user_message(51));
    assert_eq!(h.frames(), ["51"]);
    // The second refill's frame is still queued when the connection ends: owed from its own start.
    refill(&mut h, 50, 51);
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(None), Some(Action::NoteLost { first: 51 }));
}

#[test]
fn a_topic_joined_without_since_is_subscribed_once_nats_has_it() {
    let mut h = Harness::new(Start::Live, 10);
    h.state.subscribe("news".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Live }));
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = LogStart { audience: Audience::Topic("news".into()), log: log.clone(), position: 0, routed: 0 };
    h.state.on_outcome(Outcome::Attached(Ok(start)));
    assert_eq!(h.action(), Some(Action::Flush));
    // Live goes on meanwhile.
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    h.state.on_outcome(Outcome::Flushed);
    log.append(Live::Message(Arc::new(message(12, Audience::Topic("news".into()), ""))));
    h.watermark = 12;
    assert_eq!(h.frames(), ["subscribed:news", "12"]);
    h.state.unsubscribe("news".into());
    assert_eq!(h.action(), Some(Action::Detach { topic: "news".into() }));
    log.append(Live::Message(Arc::new(message(13, Audience::Topic("news".into()), ""))));
    h.watermark = 13;
    h.state.on_outcome(Outcome::Detached);
    assert_eq!(h.frames(), ["unsubscribed:news"], "nothing of the topic after unsub");
}

#[test]
fn a_gap_older_than_a_topic_joined_without_since_is_not_owed() {
    let mut h = Harness::new(Start::Live, 3);
    for seq in 4..=12 {
        h.broadcast(all_message(seq));
    }
    assert_eq!(h.frames().len(), 9);
    let news = Audience::Topic("news".into());
    h.state.subscribe("news".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Live }));
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = LogStart { audience: news.clone(), log: log.clone(), position: 0, routed: 12 };
    h.state.on_outcome(Outcome::Attached(Ok(start)));
    assert_eq!(h.action(), Some(Action::Flush));
    h.state.on_outcome(Outcome::Flushed);
    // A leader check found news's 5..=9 stored and never routed: from before the subscription.
    log.append(Live::Gap { first: 5, last: 9, audience: news.clone(), first_on_route: false });
    log.append(Live::Message(Arc::new(message(13, news.clone(), ""))));
    h.watermark = 13;
    assert_eq!(h.frames(), ["subscribed:news", "13"]);
    assert_eq!(h.action(), None);
    assert_eq!(h.closed_with(), None);
    // After it, what is past the subscription is owed again: 14 may be lost (13 was sent).
    log.append(Live::Gap { first: 10, last: 14, audience: news.clone(), first_on_route: false });
    h.watermark = 14;
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::FindStored { audience: news, from: 13 }));
}

#[test]
fn a_gap_before_a_new_routes_first_message_is_owed_to_a_join_not_to_a_sub_without_since() {
    let mut h = Harness::new(Start::Live, 12);
    let news = Audience::Topic("news".into());
    h.state.subscribe("news".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Live }));
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = LogStart { audience: news.clone(), log: log.clone(), position: 0, routed: 12 };
    h.state.on_outcome(Outcome::Attached(Ok(start)));
    assert_eq!(h.action(), Some(Action::Flush));
    h.state.on_outcome(Outcome::Flushed);
    h.broadcast(all_message(14));
    assert_eq!(h.frames(), ["subscribed:news", "14"]);
    // The route's first message names 13, stored before the `sub` took effect on the server.
    log.append(Live::Gap { first: 13, last: 13, audience: news.clone(), first_on_route: true });
    log.append(Live::Message(Arc::new(message(15, news, ""))));
    h.watermark = 15;
    assert_eq!(h.frames(), ["15"]);
    assert_eq!(h.action(), None);
    // On a subject the session joined, the same gap is owed: its replay did not read 13.
    let user = Audience::User(USER.into());
    h.personal(Live::Gap { first: 13, last: 13, audience: user.clone(), first_on_route: true });
    h.personal(user_message(16));
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 13 }));
}

#[test]
fn a_stream_made_again_notes_the_loss_from_its_start_after_the_job_under_way_and_closes_with_4008() {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    assert_eq!(h.frames(), ["11"]);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    h.state.subscribe("news".into(), None);
    h.mailbox.push_event(Event::StreamReplaced);
    h.personal(user_message(1));
    assert!(h.frames().is_empty(), "nothing of the new stream goes out");
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 1))));
    // The catch-up under way ends (nothing past 11 in its bounds); the `sub` waiting is dropped.
    assert_eq!(h.action(), Some(Action::NoteLost { first: 1 }));
    h.state.on_outcome(Outcome::Noted);
    assert_eq!(h.closed_with(), Some(4008));
}

#[test]
fn refused_subscriptions_answer_an_error_and_the_connection_stays() {
    let mut h = Harness::with(Start::Live, 10, 100, |p| p.max_topics = 0);
    h.state.subscribe("secret".into(), None);
    h.state.subscribe("a.b".into(), None);
    h.state.subscribe("news".into(), None);
    h.state.unsubscribe("never".into());
    assert_eq!(h.action(), None);
    assert_eq!(
        h.frames(),
        ["error:forbidden:secret", "error:bad_request:a.b", "error:bad_request:news", "unsubscribed:never"]
    );
}

#[test]
fn a_full_queue_stops_taking_live_messages_until_the_socket_catches_up() {
    let mut h = Harness::new(Start::Live, 0);
    // Frames of a little over a quarter of the live mark: the fourth passes it.
    let payload = Bytes::from(format!("\"{}\"", "x".repeat(LIVE_HIGH_WATER / 4)));
    let big = |seq| Live::Message(Arc::new(Message::new(seq, Audience::All, "", "", "t", payload.clone())));
    for seq in 1..=6 {
        h.broadcast(big(seq));
    }
    h.state.pull(h.watermark);
    assert!(!h.state.has_live_room());
    let mut batch = Vec::new();
    h.state.take_frames(&mut batch, usize::MAX, usize::MAX);
    assert_eq!(batch.len(), 4, "taking stops at the high-water mark");
    assert_eq!(h.frames(), ["5", "6"]);
}

#[test]
fn live_traffic_between_the_two_marks_holds_back_a_replay_but_not_a_subs_answer() {
    let mut h = Harness::new(Start::Live, 10);
    // Live frames fill the queue past the replay mark, short of the live one.
    let payload = Bytes::from(format!("\"{}\"", "x".repeat(HIGH_WATER)));
    h.broadcast(Live::Message(Arc::new(Message::new(11, Audience::All, "", "", "t", payload.clone()))));
    h.state.pull(h.watermark);
    assert!(h.state.has_live_room(), "live goes on");
    h.state.subscribe("news".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Live }));
    assert!(h.state.has_room_for_job(), "a sub's answer does not wait for the queue to drain");
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    let start = || LogStart { audience: Audience::Topic("news".into()), log: log.clone(), position: 0, routed: 11 };
    h.state.on_outcome(Outcome::Attached(Ok(start())));
    assert_eq!(h.action(), Some(Action::Flush));
    h.state.on_outcome(Outcome::Flushed);
    // A sub with `since` replays: its outcomes wait until the queue is under the replay mark.
    h.state.subscribe("news".into(), Some(5));
    h.action();
    h.state.on_outcome(Outcome::Attached(Ok(start())));
    assert!(!h.state.has_room_for_job());
    assert_eq!(h.frames(), ["11", "subscribed:news", "subscribed:news"]);
    assert!(h.state.has_room_for_job());
}

#[test]
fn a_close_request_wins_and_drops_what_was_queued() {
    let mut h = Harness::new(Start::Live, 10);
    h.broadcast(all_message(11));
    h.state.pull(h.watermark);
    h.mailbox.close(Close::new(CloseCode::Replaced, "newer"));
    assert!(h.frames().is_empty());
    assert_eq!(h.closed_with(), Some(4009));
}

#[test]
fn messages_of_one_burst_taken_in_a_row_go_out_as_one_buffer() {
    let mut h = Harness::new(Start::Live, 10);
    h.state.local.set_muted(&["ads".into()], 1);
    let burst: Vec<Arc<Message>> = [(11, ""), (12, ""), (13, ""), (15, "ads"), (16, ""), (17, "")]
        .into_iter()
        .map(|(seq, kind)| Arc::new(message(seq, Audience::All, kind)))
        .collect();
    crate::delivery::burst::Burst::tie(&burst.iter().collect::<Vec<_>>());
    for message in &burst {
        h.broadcast(Live::Message(message.clone()));
    }
    h.personal(user_message(14));
    // A personal message in between and a muted one split the runs.
    assert_eq!(h.buffers(), [vec!["11", "12", "13"], vec!["14"], vec!["16", "17"]]);
}

#[test]
fn stomp_connections_with_the_same_subscription_head_share_a_burst_buffer() {
    let stomp = |id: &str, transport: crate::codec::stomp::Transport| {
        let connected = crate::codec::stomp::Connected {
            version: crate::codec::stomp::Version::V12,
            client_sends: std::time::Duration::ZERO,
            client_wants: std::time::Duration::ZERO,
            allowed_topics: Vec::new(),
        };
        let mut codec = Codec::Stomp(Box::new(crate::codec::StompCodec::new(
            connected,
            std::time::Duration::ZERO,
            transport,
            64 * 1024,
        )));
        let mut subscribe = format!("SUBSCRIBE\nid:{id}\ndestination:/topic/all\n\n\0");
        if transport == crate::codec::stomp::Transport::SockJs {
            subscribe = serde_json::json!([subscribe]).to_string();
        }
        assert_eq!(codec.decode(subscribe.as_bytes()), [Ok(crate::codec::Command::Nothing)]);
        let mut harness = Harness::build(Start::Live, 10, 100, |params| params.codec = codec);
        harness.state.take_frames(&mut Vec::new(), usize::MAX, usize::MAX);
        harness
    };
    let burst: Vec<Arc<Message>> = (11..=13).map(|seq| Arc::new(message(seq, Audience::All, ""))).collect();
    crate::delivery::burst::Burst::tie(&burst.iter().collect::<Vec<_>>());
    let sent = |harness: &mut Harness| {
        for message in &burst {
            harness.broadcast(Live::Message(message.clone()));
        }
        harness.state.pull(harness.watermark);
        let mut batch = Vec::new();
        harness.state.take_frames(&mut batch, usize::MAX, usize::MAX);
        batch
    };
    use crate::codec::stomp::Transport::{SockJs, WebSocket};
    let (first, second) = (sent(&mut stomp("sub-0", WebSocket)), sent(&mut stomp("sub-0", WebSocket)));
    let (other, sockjs) = (sent(&mut stomp("x", WebSocket)), sent(&mut stomp("sub-0", SockJs)));
    assert_eq!((first.len(), second.len(), other.len(), sockjs.len()), (1, 1, 1, 1), "three frames in one buffer each");
    assert_ne!(first[0].as_ptr(), sockjs[0].as_ptr(), "SockJS's frames are its own");
    // Over SockJS: three WebSocket frames, each one message frame holding the whole MESSAGE.
    let mut rest = &sockjs[0][..];
    for seq in 11..=13 {
        let (len, header) =
            if rest[1] == 126 { (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4) } else { (rest[1] as usize, 2) };
        let messages: Vec<String> = serde_json::from_slice(&rest[header + 1..header + len]).unwrap();
        assert!(
            messages[0]
                .starts_with(&format!("MESSAGE\nsubscription:sub-0\ndestination:/topic/all\nmessage-id:{seq}\n"))
        );
        rest = &rest[header + len..];
    }
    assert!(rest.is_empty());
    assert_eq!(first[0].as_ptr(), second[0].as_ptr(), "the same head shares the buffer");
    assert_ne!(first[0].as_ptr(), other[0].as_ptr());
    let text = String::from_utf8_lossy(&other[0]);
    assert_eq!(text.matches("MESSAGE\nsubscription:x\ndestination:/topic/all\nmessage-id:").count(), 3);
    for seq in 11..=13 {
        assert!(text.contains(&format!("message-id:{seq}\n")), "{text}");
    }
}

/// Ties `seqs` (of `push.all`) into one burst and appends them to the log.
fn broadcast_burst(h: &mut Harness, seqs: impl IntoIterator<Item = u64>) -> Vec<Arc<Message>> {
    let burst: Vec<Arc<Message>> = seqs.into_iter().map(|seq| Arc::new(message(seq, Audience::All, ""))).collect();
    crate::delivery::burst::Burst::tie(&burst.iter().collect::<Vec<_>>());
    for message in &burst {
        h.broadcast(Live::Message(message.clone()));
    }
    burst
}

#[test]
fn a_whole_burst_is_taken_at_once_and_counted_message_by_message() {
    let mut h = Harness::new(Start::Live, 10);
    broadcast_burst(&mut h, 11..=15);
    broadcast_burst(&mut h, 16..=17);
    assert_eq!(h.buffers(), [vec!["11", "12", "13", "14", "15"], vec!["16", "17"]]);
    assert_eq!(h.state.last_sent(), 17);
    let tally = h.state.take_tally();
    assert_eq!(tally.delivered, 7);
    assert!(tally.delivered_bytes > 0);
}

#[test]
fn a_burst_partly_sent_already_goes_out_from_its_first_unsent_message() {
    let mut h = Harness::new(Start::Live, 12);
    // Sent by a replay before they came live.
    broadcast_burst(&mut h, 11..=15);
    assert_eq!(h.buffers(), [vec!["13", "14", "15"]]);
}

#[test]
fn a_burst_is_cut_by_the_watermark_and_by_a_personal_message_due_inside_it() {
    let mut h = Harness::new(Start::Live, 10);
    broadcast_burst(&mut h, [11, 12, 14, 15, 16]);
    h.personal(user_message(13));
    h.watermark = 15;
    // The personal message splits the burst; the watermark holds 16 back.
    assert_eq!(h.buffers(), [vec!["11", "12"], vec!["13"], vec!["14", "15"]]);
    h.watermark = 16;
    assert_eq!(h.buffers(), [vec!["16"]]);
}

#[test]
fn a_stomp_subscription_not_made_yet_holds_a_whole_burst_back_message_by_message() {
    let connected = crate::codec::stomp::Connected {
        version: crate::codec::stomp::Version::V12,
        client_sends: std::time::Duration::ZERO,
        client_wants: std::time::Duration::ZERO,
        allowed_topics: Vec::new(),
    };
    let codec = Codec::Stomp(Box::new(crate::codec::StompCodec::new(
        connected,
        std::time::Duration::ZERO,
        crate::codec::stomp::Transport::WebSocket,
        64 * 1024,
    )));
    let mut h = Harness::build(Start::Live, 10, 100, |params| params.codec = codec);
    h.state.take_frames(&mut Vec::new(), usize::MAX, usize::MAX);
    broadcast_burst(&mut h, 11..=13);
    h.state.pull(h.watermark);
    assert!(!h.state.has_frames(), "no subscription to /topic/all yet");
    let subscribe = b"SUBSCRIBE\nid:s\ndestination:/topic/all\n\n\0";
    assert_eq!(h.state.codec_mut().decode(subscribe), [Ok(crate::codec::Command::Nothing)]);
    let mut released = Vec::new();
    for frame in h.state.codec_mut().take_replies() {
        released.extend_from_slice(&frame);
    }
    let text = String::from_utf8_lossy(&released);
    for seq in 11..=13 {
        assert!(text.contains(&format!("message-id:{seq}\n")), "{text}");
    }
}

#[test]
fn a_burst_past_the_high_water_mark_is_taken_one_by_one_up_to_the_mark() {
    let mut h = Harness::new(Start::Live, 10);
    // Eight frames of a little over a fifth of the live mark: the fifth passes it.
    let payload = Bytes::from(vec![b'7'; LIVE_HIGH_WATER / 5]);
    let burst: Vec<Arc<Message>> =
        (11..=18).map(|seq| Arc::new(Message::new(seq, Audience::All, "", "", "t", payload.clone()))).collect();
    crate::delivery::burst::Burst::tie(&burst.iter().collect::<Vec<_>>());
    for message in &burst {
        h.broadcast(Live::Message(message.clone()));
    }
    h.state.pull(h.watermark);
    assert_eq!(h.state.last_sent(), 15);
    assert!(!h.state.has_live_room());
    h.state.take_frames(&mut Vec::new(), usize::MAX, usize::MAX);
    h.state.pull(h.watermark);
    assert_eq!(h.state.last_sent(), 18);
}

#[test]
fn a_loss_check_under_way_when_the_connection_ends_goes_on_and_notes_the_loss() {
    let mut h = checking_a_loss();
    assert!(h.state.owes_loss_check() && h.state.settling_loss());
    assert_eq!(h.state.next_loss_action(Some(found(12))), Some(Action::NoteLost { first: 12 }));
    assert_eq!(h.state.next_loss_action(Some(Outcome::Noted)), None, "one note, then nothing");
    let tally = h.state.take_tally();
    assert_eq!((tally.unrepairable, tally.losses_assumed), (1, 0));
}

#[test]
fn a_loss_check_that_finds_no_loss_after_the_connection_ended_ends_there() {
    let mut h = checking_a_loss();
    // Only 13 is missing, newer than anything sent: the repair it would start has no connection.
    assert_eq!(h.state.next_loss_action(Some(found(13))), None);
    let tally = h.state.take_tally();
    assert_eq!((tally.unrepairable, tally.repairs), (0, 0), "no repair ran");
}

#[test]
fn a_loss_check_the_stream_cannot_answer_after_the_connection_ended_assumes_the_loss() {
    let mut h = checking_a_loss();
    let unanswered = Outcome::Stored(Err("no leader".into()));
    assert_eq!(h.state.next_loss_action(Some(unanswered)), Some(Action::NoteLost { first: 12 }));
    assert_eq!(h.state.take_tally().losses_assumed, 1);
}

#[test]
fn a_session_that_ends_with_no_loss_check_owes_none() {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    assert!(!h.state.owes_loss_check(), "a catch-up under way ends with the connection");
}

#[test]
fn a_loss_check_waiting_behind_a_subscription_runs_after_the_connection_ends() {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    h.broadcast(all_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.state.subscribe("news".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "news".into(), attaching: Attaching::Live }));
    h.personal(Live::Gap { first: 12, last: 13, audience: Audience::User(USER.into()), first_on_route: false });
    h.personal(user_message(14));
    assert!(h.frames().is_empty());
    assert_eq!(h.action(), None, "the check waits for the subscription");
    // The connection ends there: the subscription ends with it, the check does not.
    assert!(h.state.owes_loss_check() && !h.state.settling_loss());
    let user = Audience::User(USER.into());
    assert_eq!(h.state.next_loss_action(None), Some(Action::FindStored { audience: user, from: 12 }));
    assert_eq!(h.state.next_loss_action(Some(found(12))), Some(Action::NoteLost { first: 12 }));
}

/// A session with 11 and 12 sent whose catch-up (a repair) is under way: live delivery waits.
fn catching_up(log_entries: usize) -> Harness {
    let mut h = Harness::with(Start::Live, 10, log_entries, |_| {});
    h.personal(user_message(11));
    h.broadcast(all_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.mailbox.push_event(Event::Repair);
    assert_eq!(h.action(), Some(Action::ReadBounds { at_least: 0 }));
    h
}

#[test]
fn a_gap_held_behind_a_catch_up_is_checked_when_the_connection_ends() {
    let mut h = catching_up(100);
    let user = Audience::User(USER.into());
    h.personal(Live::Gap { first: 12, last: 12, audience: user.clone(), first_on_route: false });
    h.personal(user_message(13));
    assert!(h.frames().is_empty() && h.action().is_none(), "held: the catch-up runs");
    assert!(!h.state.owes_loss_check(), "nothing owed before the unread entries are looked at");
    h.state.examine_unread(0);
    assert!(h.state.owes_loss_check() && !h.state.settling_loss());
    // The catch-up ends with the connection; the gap below what was sent (12) is looked up.
    assert_eq!(h.state.next_loss_action(None), Some(Action::FindStored { audience: user, from: 12 }));
    assert_eq!(h.state.next_loss_action(Some(found(12))), Some(Action::NoteLost { first: 12 }));
    assert_eq!(h.state.next_loss_action(Some(Outcome::Noted)), None);
}

#[test]
fn an_unread_gap_above_what_was_sent_is_no_loss_the_resume_reads_it() {
    let mut h = catching_up(100);
    h.personal(Live::Gap { first: 13, last: 14, audience: Audience::User(USER.into()), first_on_route: false });
    h.personal(user_message(15));
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
}

#[test]
fn an_unread_gap_the_replay_under_way_read_past_is_no_loss() {
    let mut h = catching_up(100);
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 16))));
    assert_eq!(h.action(), replay_of(everything(), 12, 16));
    for seq in [13, 14] {
        h.state.on_outcome(Outcome::Replayed(Box::new(message(seq, Audience::User(USER.into()), ""))));
    }
    assert_eq!(h.frames(), ["13", "14"]);
    // 13 never came live, and the replay sent it: read, not lost.
    h.personal(Live::Gap { first: 13, last: 13, audience: Audience::User(USER.into()), first_on_route: false });
    h.personal(user_message(15));
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
}

#[test]
fn a_gap_among_entries_a_log_evicted_unread_is_checked_when_the_connection_ends() {
    let mut h = catching_up(2);
    h.broadcast(Live::Gap { first: 11, last: 11, audience: Audience::All, first_on_route: false });
    for seq in 13..=15 {
        h.broadcast(all_message(seq));
    }
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(None), Some(Action::FindStored { audience: Audience::All, from: 11 }));
}

#[test]
fn a_connection_that_noted_its_loss_still_checks_an_older_gap_it_left_unread() {
    let mut h = checking_a_loss();
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
    h.state.on_outcome(Outcome::Noted);
    assert_eq!(h.closed_with(), Some(4008));
    // A gap read after the note, older than it: noted too (KV keeps the lowest).
    h.broadcast(Live::Gap { first: 11, last: 11, audience: Audience::All, first_on_route: false });
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(None), Some(Action::FindStored { audience: Audience::All, from: 11 }));
}

#[test]
fn every_loss_a_connection_owed_at_its_end_is_noted_not_only_the_first_found() {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    h.broadcast(all_message(15));
    assert_eq!(h.frames(), ["11", "15"]);
    let user = Audience::User(USER.into());
    h.personal(Live::Gap { first: 14, last: 14, audience: user.clone(), first_on_route: false });
    h.personal(user_message(16));
    assert_eq!(h.action(), Some(Action::FindStored { audience: user, from: 14 }));
    // Placed behind the check, though older: it waits unread.
    h.broadcast(Live::Gap { first: 12, last: 12, audience: Audience::All, first_on_route: false });
    h.broadcast(all_message(17));
    assert!(h.frames().is_empty());
    h.state.examine_unread(0);
    assert_eq!(h.state.next_loss_action(Some(found(14))), Some(Action::NoteLost { first: 14 }));
    let next = h.state.next_loss_action(Some(Outcome::Noted));
    assert_eq!(next, Some(Action::FindStored { audience: Audience::All, from: 12 }));
    assert_eq!(h.state.next_loss_action(Some(found(12))), Some(Action::NoteLost { first: 12 }));
    assert_eq!(h.state.next_loss_action(Some(Outcome::Noted)), None);
}

#[test]
fn a_new_devices_first_replay_under_way_owes_nothing_older_of_push_all() {
    let mut h = Harness::new(Start::Unread { read: 2 }, 9);
    assert_eq!(h.action(), replay_of(vec![Audience::User(USER.into())], 2, 9));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(6, Audience::User(USER.into()), ""))));
    assert_eq!(h.frames(), ["6"]);
    // From before the connection: its end would have counted it complete unread.
    h.broadcast(Live::Gap { first: 4, last: 4, audience: Audience::All, first_on_route: false });
    h.broadcast(all_message(10));
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
}

#[test]
fn a_topics_block_under_way_owes_nothing_older_of_the_topic() {
    let (mut h, log) = joining_news_since_5(13);
    let news = Audience::Topic("news".into());
    h.state.on_outcome(Outcome::Bounds(Ok(bounds(1, 14))));
    assert_eq!(h.action(), replay_of(vec![news.clone()], 5, 14));
    h.state.on_outcome(Outcome::Replayed(Box::new(message(7, news.clone(), ""))));
    // 12, below what was sent, is the block's to send, which did not end: no `replayed` for the
    // topic tells the client so, and its next `sub` with `since` asks for it again.
    log.append(Live::Gap { first: 12, last: 12, audience: news.clone(), first_on_route: false });
    log.append(Live::Message(Arc::new(message(15, news, ""))));
    h.state.examine_unread(0);
    assert!(!h.state.owes_loss_check());
}

#[test]
fn a_resumes_note_is_forgotten_once_its_replayed_frame_was_written() {
    let note = LostNote { first: 4, revision: 7 };
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Lost(note) }, 9);
    h.action();
    assert_eq!(h.state.take_reported_note(), None, "not reported yet");
    h.replay(Vec::new());
    assert_eq!(h.state.take_reported_note(), None, "the report waits to be written");
    assert_eq!(h.frames(), ["replayed:6-5/0/false"]);
    assert_eq!(h.state.take_reported_note(), Some(7));
    assert_eq!(h.state.take_reported_note(), None, "once");
}

#[test]
fn a_resumes_note_is_forgotten_under_steady_traffic_once_its_report_was_taken() {
    let note = LostNote { first: 4, revision: 7 };
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Lost(note) }, 9);
    h.action();
    h.replay(Vec::new());
    h.personal(user_message(10));
    let mut batch = Vec::new();
    // The report alone is taken: the message after it is not.
    h.state.take_frames(&mut batch, 1, usize::MAX);
    h.state.pull(h.watermark);
    assert!(h.state.has_frames());
    assert_eq!(h.state.take_reported_note(), Some(7), "written, though more waits behind it");
}

#[test]
fn a_resume_that_closes_before_its_report_is_written_keeps_its_note() {
    let note = LostNote { first: 4, revision: 7 };
    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Lost(note) }, 9);
    h.action();
    h.personal(user_message(10));
    h.replay(Vec::new());
    // Only the frames before the report are taken, then the connection closes.
    h.state.take_frames(&mut Vec::new(), 0, usize::MAX);
    assert_eq!(h.state.take_reported_note(), None);
    h.state.close(Close::gone("the client left"));
    assert_eq!(h.state.take_reported_note(), None);

    let mut h = Harness::new(Start::Resume { requested: 5, noted: Noted::Nothing }, 9);
    h.action();
    h.replay(Vec::new());
    h.frames();
    assert_eq!(h.state.take_reported_note(), None, "no note read, none to forget");
}

#[test]
fn a_note_under_way_when_the_connection_ends_is_awaited_not_dropped() {
    let mut h = checking_a_loss();
    h.state.on_outcome(found(12));
    assert_eq!(h.action(), Some(Action::NoteLost { first: 12 }));
    // Not started yet if the task never polled it (the queue was full): the end must poll it.
    assert!(h.state.settling_loss());
    assert_eq!(h.state.next_loss_action(Some(Outcome::Noted)), None);
}

#[test]
fn a_socket_io_resume_whose_answer_was_dropped_by_a_close_is_answered_in_the_close() {
    use crate::codec::socketio::Pid;
    for taken in [false, true] {
        let codec = Codec::SocketIo(Box::new(crate::codec::SocketIoCodec::new(Pid::parse("p").unwrap(), true)));
        let start = Start::Resume { requested: 10, noted: Noted::Nothing };
        let mut h = Harness::build(start, 10, 100, |params| {
            params.codec = codec;
            let (conn, user, device, node) = ("c".into(), USER.into(), "d".into(), "n".into());
            params.welcome = ServerFrame::Welcome {
                conn,
                user,
                device,
                node,
                seq: 10,
                heartbeat: 25,
                read: 0,
                unread: 0,
                epoch: None,
            };
        });
        assert_eq!(h.action(), replay_of(everything(), 10, 10));
        h.replay(Vec::new());
        if taken {
            let mut batch = Vec::new();
            h.state.take_frames(&mut batch, usize::MAX, usize::MAX);
            assert_eq!(batch.len(), 1, "the answer");
        }
        let close = Close::slow_consumer("stalled");
        h.state.close(close.clone());
        let last = h.state.codec().close(&close).unwrap();
        // The answer goes in the close, saying "not recovered", only when the queue lost it.
        assert_eq!(last.windows(11).any(|w| w == br#""pid":"p.1""#), !taken, "taken: {taken}");
    }
}

fn topic_start(topic: &str) -> LogStart {
    let log = Arc::new(Log::new(LogLimits { entries: 10, bytes: 1 << 20 }));
    LogStart { audience: Audience::Topic(topic.into()), log, position: 0, routed: 0 }
}

/// Subscribes `topic` live through its attach and flush.
fn join_live(h: &mut Harness, topic: &str) {
    assert_eq!(h.action(), Some(Action::Attach { topic: topic.into(), attaching: Attaching::Live }));
    h.state.on_outcome(Outcome::Attached(Ok(topic_start(topic))));
    assert_eq!(h.action(), Some(Action::Flush));
    h.state.on_outcome(Outcome::Flushed);
}

#[test]
fn a_socketio_connections_topics_are_kept_after_they_change_once_per_write_under_way() {
    let socketio =
        || Codec::SocketIo(Box::new(crate::codec::SocketIoCodec::new(crate::codec::socketio::Pid::new("c1"), false)));
    let mut h = Harness::build(Start::Live, 10, 100, |p| {
        p.codec = socketio();
        p.allowed_topics = vec!["news".into(), "sport".into()];
    });
    h.state.subscribe("news".into(), None);
    join_live(&mut h, "news");
    assert_eq!(h.action(), Some(Action::RememberTopics { topics: vec!["news".into()] }));
    // Two changes while that write is under way: one more write, of the topics as they are then.
    h.state.unsubscribe("news".into());
    h.state.subscribe("sport".into(), None);
    h.state.on_outcome(Outcome::Remembered);
    assert_eq!(h.action(), Some(Action::Detach { topic: "news".into() }));
    h.state.on_outcome(Outcome::Detached);
    join_live(&mut h, "sport");
    assert_eq!(h.action(), Some(Action::RememberTopics { topics: vec!["sport".into()] }));
    h.state.on_outcome(Outcome::Remembered);
    assert_eq!(h.action(), None);
    // A refused `sub` changes nothing.
    h.state.subscribe("secret".into(), None);
    assert_eq!(h.action(), None);

    // Every second ping, the topics are written again (their record lives a window past a write).
    h.state.pinged();
    assert_eq!(h.action(), None);
    h.state.pinged();
    assert_eq!(h.action(), Some(Action::RememberTopics { topics: vec!["sport".into()] }));

    // Herald's clients subscribe again themselves: nothing is kept.
    let mut h = Harness::new(Start::Live, 10);
    h.state.subscribe("news".into(), None);
    join_live(&mut h, "news");
    assert_eq!(h.action(), None);
    h.state.pinged();
    h.state.pinged();
    assert_eq!(h.action(), None);
}

#[test]
fn the_topics_a_new_token_must_allow_are_those_joined_and_the_one_joining() {
    let mut h = Harness::build(Start::Live, 10, 100, |p| {
        p.allowed_topics = vec!["news".into(), "sport".into()];
        p.max_topics = 3;
    });
    h.state.subscribe("news".into(), None);
    join_live(&mut h, "news");
    h.state.subscribe("sport".into(), None);
    assert_eq!(h.action(), Some(Action::Attach { topic: "sport".into(), attaching: Attaching::Live }));
    assert_eq!(h.state.topics_held().collect::<Vec<_>>(), ["news", "sport"]);

    // A `sub` queued behind it is checked when it starts, against the topics allowed then.
    h.state.subscribe("weather".into(), None);
    h.state.allow_topics(vec!["news".into(), "sport".into(), "weather".into()]);
    h.state.on_outcome(Outcome::Attached(Ok(topic_start("sport"))));
    assert_eq!(h.action(), Some(Action::Flush));
    h.state.on_outcome(Outcome::Flushed);
    assert_eq!(h.action(), Some(Action::Attach { topic: "weather".into(), attaching: Attaching::Live }));
}

#[test]
fn the_client_is_read_while_answers_and_jobs_stay_below_their_marks() {
    let mut h = Harness::new(Start::Live, 10);
    assert!(h.state.has_room_for_input());
    for n in 0..MAX_WAITING_JOBS {
        h.state.unsubscribe(format!("t{n}"));
    }
    assert!(!h.state.has_room_for_input(), "jobs waiting");
    assert!(h.action().is_none(), "each unsub of a topic not held is answered at once");
    assert!(h.state.has_room_for_input());

    h.state.push_frame(Bytes::from(vec![b' '; INPUT_HIGH_WATER]));
    assert!(!h.state.has_room_for_input(), "answers waiting for the socket");
    let mut batch = Vec::new();
    h.state.take_frames(&mut batch, usize::MAX, usize::MAX);
    assert!(h.state.has_room_for_input());
}

/// What an `ack:auto` subscription was sent counts once the frames that carry it are taken for
/// the socket, also while frames stay queued behind them, and never before.
#[test]
fn auto_acknowledged_sends_count_once_the_frames_that_carry_them_are_taken() {
    let mut h = Harness::build(Start::Live, 10, 100, |p| p.codec = stomp());
    h.state.codec_mut().decode(b"SUBSCRIBE\nid:q\ndestination:/user/queue/updates\n\n\0");
    queue_replies(&mut h);
    write_all(&mut h);
    let take = |h: &mut Harness, frames: usize| {
        h.state.pull(h.watermark);
        h.state.take_frames_acknowledged(&mut Vec::new(), frames, usize::MAX)
    };
    h.personal(user_message(11));
    h.personal(user_message(12));
    // A STOMP message is two frames: its head, and the body it shares.
    assert_eq!(take(&mut h, 2), None, "12 is still queued");
    h.personal(user_message(13));
    assert_eq!(take(&mut h, 2), Some(12), "11 and 12 are taken, 13 is still queued");
    assert_eq!(take(&mut h, 1), None, "the head of 13 only");
    assert_eq!(take(&mut h, 1), Some(13));
    assert!(!h.state.has_frames());
}

/// A move of the user's read position is told with the count of unread messages the client was
/// sent: those up to what the session had sent when it asked (counted from the stream), and the
/// personal ones it sent while the count was under way, past the read position. Other messages
/// on their way to it, stored before the count, come after the frame and are counted by the client.
#[test]
fn a_read_moved_is_told_with_the_unread_messages_the_client_was_sent() {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    h.personal(user_message(12));
    assert_eq!(h.frames(), ["11", "12"]);
    h.mailbox.push_event(Event::ReadMoved { read: 11 });
    h.state.pull(h.watermark);
    let question = h.state.take_read_count().expect("a count to ask for");
    assert_eq!((question.read, question.upto), (11, 12));
    assert!(h.state.take_read_count().is_none(), "asked once");
    // Sent while the count is under way: a personal message past the read position, a broadcast.
    h.personal(user_message(13));
    h.broadcast(all_message(14));
    assert_eq!(h.frames(), ["13", "14"]);
    // The stream's count of (11, 12]: one.
    h.mailbox.push_event(Event::ReadCounted { read: 11, upto: 12, unread: Some(1) });
    assert_eq!(h.frames(), ["read:11/2"]);
}

#[test]
fn a_read_count_overtaken_by_a_newer_move_or_not_counted_tells_nothing() {
    let mut h = Harness::new(Start::Live, 10);
    h.personal(user_message(11));
    assert_eq!(h.frames(), ["11"]);
    h.mailbox.push_event(Event::ReadMoved { read: 10 });
    h.state.pull(h.watermark);
    assert!(h.state.take_read_count().is_some());
    h.mailbox.push_event(Event::ReadMoved { read: 11 });
    h.mailbox.push_event(Event::ReadCounted { read: 10, upto: 11, unread: Some(1) });
    assert!(h.frames().is_empty(), "the newer move's count is awaited");
    let question = h.state.take_read_count().expect("the newer count");
    assert_eq!((question.read, question.upto), (11, 11));
    h.mailbox.push_event(Event::ReadCounted { read: 11, upto: 11, unread: None });
    assert!(h.frames().is_empty(), "a count that failed tells nothing");
}

/// Only Herald's protocol tells the client of read moves.
#[test]
fn protocols_without_read_frames_count_nothing() {
    let mut h = Harness::build(Start::Live, 10, 100, |p| p.codec = stomp());
    h.mailbox.push_event(Event::ReadMoved { read: 10 });
    h.state.pull(h.watermark);
    assert!(h.state.take_read_count().is_none());
}
