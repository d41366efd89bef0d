//! Reading back what a connection missed: the stored messages of its subjects (its user, `push.all`,
//! its topics) with a sequence in `(since, upto]`, in sequence order.
//!
//! Two ways, selectable by configuration and compared in docs/benchmarks.md:
//! - [`ReplayMethod::Direct`]: batched direct gets (`$JS.API.DIRECT.GET.HERALD` with `next_by_subj`
//!   and `batch`), one cursor per subject, merged by sequence. No server-side state at all.
//! - [`ReplayMethod::Consumer`]: one short-lived ordered consumer filtered on all the subjects.
//!
//! Neither creates a durable consumer per user: tens of thousands of those break JetStream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::subject::{Audience, STREAM, header};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::delivery::feed::Delivered;
use crate::delivery::replies::{Replies, ReplyInbox};

/// How replays read the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayMethod {
    Direct,
    Consumer,
}

/// How long one request to the stream may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a replay reads ahead of its socket: each round of direct gets asks for what the cursors'
/// buffers lack of it, shared by the cursors it refills (each still gets one message however
/// large). What a replay holds while its socket drains, whatever the messages' size, and what a
/// gateway's replays in flight at once (`replay_concurrency`) send it.
const FETCH_BYTES: usize = 512 * 1024;
/// The least any cursor asks for in a round: another cursor's buffer may hold most of the budget
/// while its messages wait behind this one's.
const MIN_CURSOR_BYTES: usize = 16 * 1024;

/// A stored message, read back.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) audience: Audience,
    pub(crate) seq: u64,
    /// RFC 3339.
    pub(crate) ts: String,
    /// Its `Herald-Type` and `Nats-Msg-Id`, or empty.
    pub(crate) kind: String,
    pub(crate) id: String,
    pub(crate) payload: Bytes,
}

/// The stream could not be read.
#[derive(Debug, thiserror::Error)]
#[error("replay failed: {0}")]
pub(crate) struct ReplayError(String);

fn error(what: impl std::fmt::Display) -> ReplayError {
    ReplayError(what.to_string())
}

/// Reads the messages of `audiences` with `since < seq <= upto`, in sequence order.
pub(crate) enum Replay {
    Direct(Box<DirectReplay>),
    Consumer(Box<ConsumerReplay>),
}

/// Opens replays for the gateway's sessions. Reads in flight are bounded per gateway (a batch of
/// direct gets, or a whole consumer replay, holds one of `permits`): when many sessions catch up at
/// once (a reconnect storm, a burst every socket fell behind on), they take turns instead of asking
/// NATS for more than the gateway can take in.
#[derive(Clone)]
pub(crate) struct Replayer {
    js: async_nats::jetstream::Context,
    replies: Replies,
    method: ReplayMethod,
    batch: usize,
    permits: Arc<Semaphore>,
}

impl Replayer {
    pub(crate) fn new(
        js: async_nats::jetstream::Context,
        replies: Replies,
        method: ReplayMethod,
        batch: usize,
        concurrency: usize,
    ) -> Replayer {
        Replayer { js, replies, method, batch: batch.max(1), permits: Arc::new(Semaphore::new(concurrency.max(1))) }
    }

    /// The connection replays read the stream on.
    pub(crate) fn replies(&self) -> &Replies {
        &self.replies
    }

    /// A replay of `audiences` over `(since, upto]`.
    pub(crate) async fn open(&self, audiences: &[Audience], since: u64, upto: u64) -> Result<Replay, ReplayError> {
        Ok(match self.method {
            ReplayMethod::Direct => Replay::Direct(Box::new(DirectReplay::start(self, audiences, since, upto).await?)),
            ReplayMethod::Consumer => {
                Replay::Consumer(Box::new(ConsumerReplay::start(self, audiences, since, upto).await?))
            }
        })
    }
}

impl Replay {
    /// The next message, `None` once everything up to `upto` was read.
    pub(crate) async fn next(&mut self) -> Option<Result<Stored, ReplayError>> {
        match self {
            Replay::Direct(replay) => replay.next().await,
            Replay::Consumer(replay) => replay.next().await,
        }
    }

    /// Per audience (in the order given to [`Replayer::open`]), the most of its messages the stream
    /// said it held from where the replay was reading on (at least: the consumer's count is every
    /// audience's together). At the per-subject limit, the limit's trimming had reached the
    /// replay: see [`complete`].
    pub(crate) fn held_ahead(&self) -> Vec<u64> {
        match self {
            Replay::Direct(replay) => replay.cursors.iter().map(|cursor| cursor.ahead).collect(),
            Replay::Consumer(replay) => vec![replay.ahead; replay.audiences],
        }
    }

    /// The sum of [`Replay::held_ahead`], which only grows: a change says that it changed, without
    /// building it.
    pub(crate) fn held_ahead_sum(&self) -> u64 {
        match self {
            Replay::Direct(replay) => replay.cursors.iter().map(|cursor| cursor.ahead).sum(),
            Replay::Consumer(replay) => replay.ahead,
        }
    }
}

/// One cursor per subject, each filled by batched direct gets; the smallest head goes next.
pub(crate) struct DirectReplay {
    /// For requests only the stream's leader answers.
    reader: Replies,
    /// Every batch reply arrives here, on `<inbox>.<cursor>.<request>`.
    replies: ReplyInbox,
    cursors: Vec<SubjectCursor>,
    upto: u64,
    batch: usize,
    requests: u64,
    permits: Arc<Semaphore>,
}

struct SubjectCursor {
    audience: Audience,
    subject: String,
    /// The next sequence to ask for.
    next_seq: u64,
    buffered: VecDeque<Stored>,
    end: CursorEnd,
    /// Whether the next reply is the first of a batch (or the leader's answer).
    batch_start: bool,
    /// The most messages of the subject the stream held from `next_seq` on, as a batch's first
    /// reply said (see [`Replay::held_ahead`]).
    ahead: u64,
}

/// Whether a cursor read everything of its subject up to `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CursorEnd {
    /// More to read.
    Open,
    /// The replica that answered had nothing more; the stream's leader confirms before the cursor
    /// is done (a replica may be behind the leader: it was cut off, or it is catching up).
    Unconfirmed,
    Done,
}

impl DirectReplay {
    async fn start(
        replayer: &Replayer,
        audiences: &[Audience],
        since: u64,
        upto: u64,
    ) -> Result<DirectReplay, ReplayError> {
        let cursors = audiences
            .iter()
            .map(|audience| SubjectCursor {
                audience: audience.clone(),
                subject: audience.push_subject(),
                next_seq: since + 1,
                buffered: VecDeque::new(),
                end: if since >= upto { CursorEnd::Done } else { CursorEnd::Open },
                batch_start: false,
                ahead: 0,
            })
            .collect();
        Ok(DirectReplay {
            reader: replayer.replies.clone(),
            replies: replayer.replies.open(),
            cursors,
            upto,
            batch: replayer.batch,
            requests: 0,
            permits: replayer.permits.clone(),
        })
    }

    async fn next(&mut self) -> Option<Result<Stored, ReplayError>> {
        if let Err(e) = self.refill().await {
            return Some(Err(e));
        }
        let cursor = self
            .cursors
            .iter_mut()
            .filter(|c| !c.buffered.is_empty())
            .min_by_key(|c| c.buffered.front().map(|m| m.seq))?;
        cursor.buffered.pop_front().map(Ok)
    }

    /// Fetches the next batch of every cursor that ran dry, all requests in flight at once, then
    /// has the leader confirm the end of those a replica said were over.
    async fn refill(&mut self) -> Result<(), ReplayError> {
        self.fetch().await?;
        for index in 0..self.cursors.len() {
            if self.cursors[index].buffered.is_empty() && self.cursors[index].end == CursorEnd::Unconfirmed {
                self.confirm_end(index).await?;
            }
        }
        Ok(())
    }

    /// Asks the stream's leader for the cursor's next message: none (or one past `upto`) confirms
    /// the end; one up to `upto` was missing from the replica that answered, and goes next.
    async fn confirm_end(&mut self, index: usize) -> Result<(), ReplayError> {
        let upto = self.upto;
        let cursor = &mut self.cursors[index];
        let query = serde_json::json!({"seq": cursor.next_seq, "next_by_subj": cursor.subject});
        let subject = format!("$JS.API.STREAM.MSG.GET.{STREAM}");
        let answer = self.reader.request(subject, query.to_string().into()).await.map_err(error)?;
        // The leader's answer does not count what it holds from there on (a trim that reached the
        // replay while a replica lagged behind goes unseen here; the next batch's count sees one
        // that goes on).
        match from_message_get(cursor.audience.clone(), &answer.payload)? {
            Some(stored) if stored.seq <= upto => {
                cursor.next_seq = stored.seq + 1;
                cursor.buffered.push_back(stored);
                cursor.end = CursorEnd::Open;
            }
            _ => cursor.end = CursorEnd::Done,
        }
        Ok(())
    }

    /// Sends one batch request for every cursor that ran dry and files the replies.
    async fn fetch(&mut self) -> Result<(), ReplayError> {
        let dry: Vec<usize> = (0..self.cursors.len())
            .filter(|&i| self.cursors[i].buffered.is_empty() && self.cursors[i].end == CursorEnd::Open)
            .collect();
        if dry.is_empty() {
            return Ok(());
        }
        // Held until the batch's replies are in.
        let _permit = self.permits.clone().acquire_owned().await.map_err(error)?;
        let request_id = self.requests;
        self.requests += 1;
        let held: usize = self.cursors.iter().flat_map(|cursor| &cursor.buffered).map(|m| m.payload.len()).sum();
        let floor = (FETCH_BYTES / (2 * self.cursors.len())).max(MIN_CURSOR_BYTES);
        let max_bytes = (FETCH_BYTES.saturating_sub(held) / dry.len()).max(floor);
        for &index in &dry {
            self.cursors[index].batch_start = true;
            let cursor = &self.cursors[index];
            let (seq, subject, batch) = (cursor.next_seq, &cursor.subject, self.batch);
            let body = serde_json::json!({"seq": seq, "next_by_subj": subject, "batch": batch, "max_bytes": max_bytes});
            let reply = format!("{}.{index}.{request_id}", self.replies.inbox);
            self.replies
                .publish(format!("$JS.API.DIRECT.GET.{STREAM}"), reply, body.to_string().into())
                .map_err(error)?;
        }
        let mut open = dry.len();
        while open > 0 {
            let message = tokio::time::timeout(REQUEST_TIMEOUT, self.replies.next())
                .await
                .map_err(|_| error("direct get timed out"))?
                .ok_or_else(|| error("the replies connection was lost"))?;
            let subject = std::str::from_utf8(&message.subject).unwrap_or_default();
            let Some((index, id)) = parse_reply(subject, &self.replies.inbox) else { continue };
            if id != request_id || index >= self.cursors.len() {
                continue;
            }
            if self.take_reply(index, message)? {
                open -= 1;
            }
        }
        Ok(())
    }

    /// Files one reply for cursor `index`; returns whether its batch is over.
    fn take_reply(&mut self, index: usize, message: Delivered) -> Result<bool, ReplayError> {
        let upto = self.upto;
        let cursor = &mut self.cursors[index];
        if let Some(status) = message.answer_status() {
            match status {
                // End of batch: more may follow unless nothing is pending.
                204 => {
                    let pending = message.header("Nats-Num-Pending").and_then(|v| v.parse::<u64>().ok());
                    if cursor.end == CursorEnd::Open && (pending == Some(0) || cursor.buffered.is_empty()) {
                        cursor.end = CursorEnd::Unconfirmed;
                    }
                    return Ok(true);
                }
                404 => {
                    if cursor.end == CursorEnd::Open {
                        cursor.end = CursorEnd::Unconfirmed;
                    }
                    return Ok(true);
                }
                other => {
                    let line = message.headers.split(|&b| b == b'\r').next().unwrap_or_default();
                    return Err(error(format!("direct get answered {other}: {}", String::from_utf8_lossy(line))));
                }
            }
        }
        if std::mem::take(&mut cursor.batch_start) {
            // The batch's first message is the first the replica holds from `next_seq` on: with
            // those after it, what it held from the replay's position.
            let pending = message.header("Nats-Num-Pending").and_then(|value| value.parse::<u64>().ok());
            cursor.ahead = cursor.ahead.max(1 + pending.unwrap_or(0));
        }
        let stored = from_direct_get(cursor.audience.clone(), message)?;
        if stored.seq > upto {
            // The replica holds newer messages: it has every one of the subject's up to `upto`.
            cursor.end = CursorEnd::Done;
        } else if cursor.end == CursorEnd::Open {
            cursor.next_seq = stored.seq + 1;
            cursor.buffered.push_back(stored);
        }
        Ok(false)
    }
}

fn parse_reply(subject: &str, inbox: &str) -> Option<(usize, u64)> {
    let rest = subject.strip_prefix(inbox)?.strip_prefix('.')?;
    let (index, id) = rest.split_once('.')?;
    Some((index.parse().ok()?, id.parse().ok()?))
}

/// A message a direct get answered with: the stream's headers (added after the publisher's, so
/// read last) say its sequence and time.
fn from_direct_get(audience: Audience, message: Delivered) -> Result<Stored, ReplayError> {
    let text = |name: &str| message.header(name).unwrap_or_default().to_string();
    let seq = message.header(header::NATS_SEQUENCE).and_then(|seq| seq.parse().ok());
    Ok(Stored {
        audience,
        seq: seq.ok_or_else(|| error("a direct get answer without its sequence"))?,
        ts: text(header::NATS_TIME_STAMP),
        kind: text(header::HERALD_TYPE),
        id: text(header::NATS_MSG_ID),
        payload: message.payload,
    })
}

/// The message a `STREAM.MSG.GET` answer holds (its headers and data in base64); none when there
/// is none from the sequence asked.
fn from_message_get(audience: Audience, answer: &[u8]) -> Result<Option<Stored>, ReplayError> {
    let Some(message) = crate::delivery::leader::message_in(answer).map_err(error)? else { return Ok(None) };
    let text = |name: &str| message.get(name).and_then(serde_json::Value::as_str).unwrap_or_default();
    let decode = |name: &str| base64::engine::general_purpose::STANDARD.decode(text(name)).map_err(error);
    let headers = decode("hdrs")?;
    let header = |name: &str| crate::delivery::feed::proto::header(&headers, name).unwrap_or_default().to_string();
    Ok(Some(Stored {
        audience,
        seq: message
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| error("a message without its seq"))?,
        ts: text("time").to_string(),
        kind: header(header::HERALD_TYPE),
        id: header(header::NATS_MSG_ID),
        payload: decode("data")?.into(),
    }))
}

fn rfc3339(time: time::OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// One ordered consumer over all the subjects, deleted by the server once idle.
pub(crate) struct ConsumerReplay {
    messages: Option<Ordered>,
    upto: u64,
    /// How many audiences it reads, and the most messages of all of them the stream held from a
    /// delivered one on.
    audiences: usize,
    ahead: u64,
    /// Held while the consumer delivers.
    _permit: Option<OwnedSemaphorePermit>,
}

impl ConsumerReplay {
    async fn start(
        replayer: &Replayer,
        audiences: &[Audience],
        since: u64,
        upto: u64,
    ) -> Result<ConsumerReplay, ReplayError> {
        if since >= upto {
            return Ok(ConsumerReplay { messages: None, upto, audiences: audiences.len(), ahead: 0, _permit: None });
        }
        let permit = replayer.permits.clone().acquire_owned().await.map_err(error)?;
        let stream = replayer.js.get_stream_no_info(STREAM).await.map_err(error)?;
        let config = OrderedConfig {
            filter_subjects: audiences.iter().map(Audience::push_subject).collect(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: since + 1 },
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(error)?;
        let messages = if consumer.cached_info().num_pending == 0 {
            None
        } else {
            Some(consumer.messages().await.map_err(error)?)
        };
        Ok(ConsumerReplay { messages, upto, audiences: audiences.len(), ahead: 0, _permit: Some(permit) })
    }

    async fn next(&mut self) -> Option<Result<Stored, ReplayError>> {
        let messages = self.messages.as_mut()?;
        let message = match tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Some(Err(error(e))),
            Ok(None) => return None,
            Err(_) => return Some(Err(error("ordered consumer stalled"))),
        };
        let (seq, pending, time) = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending, info.published),
            Err(e) => return Some(Err(error(e))),
        };
        self.ahead = self.ahead.max(1 + pending);
        if seq > self.upto {
            self.messages = None;
            return None;
        }
        if pending == 0 || seq == self.upto {
            self.messages = None;
        }
        let message = message.message;
        let audience = Audience::from_push_subject(message.subject.as_str())?;
        let headers = message.headers.unwrap_or_default();
        let text = |name: &str| stored_header(&headers, name).unwrap_or_default().to_string();
        let (kind, id) = (text(header::HERALD_TYPE), text(header::NATS_MSG_ID));
        Some(Ok(Stored { audience, seq, ts: rfc3339(time), kind, id, payload: message.payload }))
    }
}

/// The last value of header `name`, in any case, of a message async-nats read (a consumer
/// replay's), as [`crate::delivery::feed::proto::header`] reads the others.
fn stored_header<'a>(headers: &'a async_nats::HeaderMap, name: &str) -> Option<&'a str> {
    let exact = headers.get_last(name).map(|value| value.as_str());
    exact.or_else(|| {
        let mut named = headers.iter().filter(|(key, _)| AsRef::<str>::as_ref(*key).eq_ignore_ascii_case(name));
        named.find_map(|(_, values)| values.last()).map(|value| value.as_str())
    })
}

/// Whether nothing addressed to a connection after `since` can have been removed by the stream's
/// limits: the stream still starts at or before `since + 1` (nothing aged out past it), and the
/// per-subject cap's trimming never reached a message the replay had yet to read. Per subject,
/// `read` are the messages the replay read after `since` (at the cap, all the subject held came
/// after `since`: older ones may have been trimmed) and `ahead` the most the stream said it held
/// from where the replay was reading on ([`Replay::held_ahead`]: at the cap, the oldest it held
/// was at that position, and one before it may have been trimmed). Deletes by hand and
/// per-message TTLs are not counted as losses.
pub(crate) fn complete(first_seq: u64, since: u64, per_subject_cap: i64, read: &[u64], ahead: &[u64]) -> bool {
    let nothing_aged_out = first_seq <= since + 1;
    let below_cap = |count: &u64| *count < per_subject_cap as u64;
    let nothing_trimmed = per_subject_cap <= 0 || (read.iter().all(below_cap) && ahead.iter().all(below_cap));
    nothing_aged_out && nothing_trimmed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_only_when_nothing_can_have_been_removed() {
        // Stream starts right after since, no subject at its cap.
        assert!(complete(11, 10, 1000, &[3, 0], &[0, 0]));
        assert!(complete(1, 10, 1000, &[999], &[0]));
        // Messages after since aged out.
        assert!(!complete(12, 10, 1000, &[3], &[0]));
        // A subject at its cap may have been trimmed.
        assert!(!complete(1, 10, 1000, &[1000, 2], &[0, 0]));
        // The cap's trimming reached where the replay was reading.
        assert!(!complete(1, 10, 1000, &[2, 500], &[0, 1000]));
        assert!(complete(1, 10, 1000, &[2, 500], &[3, 999]));
        // No per-subject cap.
        assert!(complete(1, 10, -1, &[5000], &[7000]));
    }

    #[test]
    fn reply_subjects_route_to_cursors() {
        assert_eq!(parse_reply("_INBOX.abc.2.17", "_INBOX.abc"), Some((2, 17)));
        assert_eq!(parse_reply("_INBOX.other.2.17", "_INBOX.abc"), None);
        assert_eq!(parse_reply("_INBOX.abc.x.1", "_INBOX.abc"), None);
    }
}
