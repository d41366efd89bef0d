//! The personal inbox: each user's read position in KV `herald-reads` (the highest personal `seq`
//! the user read on any device, moved only forward), and what the stream says about the user's
//! messages: how many are unread, the last one, a page of them.
//!
//! Reads from clients are frequent and cheap: they update a map in memory that a flusher writes
//! every [`FLUSH_INTERVAL`]; the HTTP API writes at once. Every gateway follows the bucket with one
//! watch, and tells its sockets of a user whose position moved (`read` notice with the new count),
//! so the user's other devices update within a second, with no subscription per user.
//!
//! Counting is exact: the personal subject holds at most the stream's per-subject limit, so a
//! count is one direct get (`Nats-Num-Pending` of the first unread message) when the user muted
//! nothing, and a read of the unread messages' headers (at most that limit) when they did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::id::{kv_key, kv_key_decode};
use herald_shared::subject::{Audience, KV_READS, STREAM};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::forward::{self, KvError};
use super::registry::Registry;
use super::watch::{Backoff, watch_from};
use crate::delivery::feed::Delivered;
use crate::delivery::mailbox::Event;
use crate::delivery::message::{self, Message};
use crate::session::replay::Replayer;

/// How often read positions from clients are written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// The pause after a flush KV did not take.
const FAILED_FLUSH_PAUSE: Duration = Duration::from_secs(2);

/// The inbox could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("inbox: {0}")]
pub(crate) struct InboxError(String);

fn error(what: impl std::fmt::Display) -> InboxError {
    InboxError(what.to_string())
}

impl From<KvError> for InboxError {
    fn from(kv: KvError) -> InboxError {
        InboxError(kv.0)
    }
}

/// A page of a user's personal messages.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) messages: Vec<Message>,
    /// Where the next page starts (`after`), the last `seq` of this one.
    pub(crate) next: u64,
    /// Whether nothing after `after` can have been trimmed by the stream's limits.
    pub(crate) complete: bool,
}

pub(crate) struct Inbox {
    js: jetstream::Context,
    replayer: Replayer,
    bucket: OnceCell<kv::Store>,
    /// Read positions from clients, not yet written: user → seq.
    pending: Mutex<HashMap<String, u64>>,
}

impl Inbox {
    pub(crate) fn new(js: jetstream::Context, replayer: Replayer) -> Inbox {
        Inbox { js, replayer, bucket: OnceCell::new(), pending: Mutex::default() }
    }

    async fn bucket(&self) -> Result<&kv::Store, InboxError> {
        self.bucket.get_or_try_init(|| async { self.js.get_key_value(KV_READS).await.map_err(error) }).await
    }

    /// The user's read position (0: nothing read yet).
    pub(crate) async fn read_position(&self, user: &str) -> Result<u64, InboxError> {
        Ok(forward::load(self.bucket().await?, &kv_key(user)).await?.unwrap_or(0))
    }

    /// A client read up to `seq`: written by the next flush.
    pub(crate) fn note_read(&self, user: &str, seq: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(user.to_string()).or_insert(0);
        *entry = (*entry).max(seq);
    }

    /// Moves the user's read position up to `seq` now; returns the position afterwards.
    pub(crate) async fn mark_read(&self, user: &str, seq: u64) -> Result<u64, InboxError> {
        Ok(forward::advance(self.bucket().await?, &kv_key(user), seq).await?)
    }

    /// Writes the read positions noted, every [`FLUSH_INTERVAL`] until `shutdown`, then once more.
    /// Each flush that fails counts in `failures`.
    pub(crate) async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken, failures: Counter) {
        let mut pause = FLUSH_INTERVAL;
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = shutdown.cancelled() => true,
            };
            pause = FLUSH_INTERVAL;
            if !self.flush(stop).await {
                failures.inc();
                // KV that refuses at once (no permission) is not asked five times a second.
                pause = FAILED_FLUSH_PAUSE;
            }
            if stop {
                return;
            }
        }
    }

    /// Writes the read positions noted. One KV does not take (NATS away, a leader being elected)
    /// is noted again with the ones not tried yet, for the next flush: a `read` the client sent is
    /// written once KV answers again, not dropped (unless this is the `last` flush). Whether every
    /// one was written.
    async fn flush(&self, last: bool) -> bool {
        let mut pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner())).into_iter();
        while let Some((user, seq)) = pending.next() {
            if let Err(error) = self.mark_read(&user, seq).await {
                let left = pending.len() + 1;
                if last {
                    warn!(%user, seq, %error, left, "read positions not written before the gateway stopped");
                    return false;
                }
                warn!(%user, seq, %error, left, "read positions not written yet: tried again at the next flush");
                for (user, seq) in std::iter::once((user, seq)).chain(pending) {
                    self.note_read(&user, seq);
                }
                return false;
            }
        }
        true
    }

    /// How many of the user's personal messages in `(read, upto]` are unread, leaving out the
    /// `muted` kinds.
    pub(crate) async fn unread(&self, user: &str, read: u64, upto: u64, muted: &[Box<str>]) -> Result<u64, InboxError> {
        Ok(self.unread_and_first(user, read, upto, muted).await?.0)
    }

    /// [`Self::unread`], and the `seq` of the first unread message (none when nothing is unread).
    pub(crate) async fn unread_and_first(
        &self,
        user: &str,
        read: u64,
        upto: u64,
        muted: &[Box<str>],
    ) -> Result<(u64, Option<u64>), InboxError> {
        if read >= upto {
            return Ok((0, None));
        }
        if muted.is_empty() {
            let subject = Audience::User(user.to_string()).push_subject();
            let (unread, first) = self.count_between(&subject, read, upto).await?;
            return Ok((unread, first.filter(|_| unread > 0)));
        }
        let mut replay = self.replayer.open(&[Audience::User(user.to_string())], read, upto).await.map_err(error)?;
        let (mut unread, mut first) = (0, None);
        while let Some(stored) = replay.next().await {
            let stored = stored.map_err(error)?;
            if !muted.iter().any(|muted| **muted == *stored.kind) {
                unread += 1;
                first.get_or_insert(stored.seq);
            }
        }
        Ok((unread, first))
    }

    /// How many messages of `subject` are in `(read, upto]`, and the first one's `seq` at or past
    /// `read + 1`: the messages from `read + 1` on less those past `upto`, two counts that a
    /// message stored between them would set apart (it counts in the second only, if it is asked
    /// for second), so the second is asked for again after the first until it stayed the same.
    async fn count_between(&self, subject: &str, read: u64, upto: u64) -> Result<(u64, Option<u64>), InboxError> {
        let mut past_upto = self.count_past(subject, upto).await?;
        for _ in 0..COUNT_TRIES {
            let (from_read, first) = self.count_from(subject, read + 1).await?;
            let again = self.count_past(subject, upto).await?;
            if again == past_upto {
                return Ok((from_read.saturating_sub(past_upto), first));
            }
            past_upto = again;
        }
        // Stored faster than asked: what is past `upto` now (the count may be low by what came last).
        let (from_read, first) = self.count_from(subject, read + 1).await?;
        Ok((from_read.saturating_sub(past_upto), first))
    }

    /// How many messages of `subject` are past `upto`.
    async fn count_past(&self, subject: &str, upto: u64) -> Result<u64, InboxError> {
        match upto.checked_add(1) {
            Some(from) => Ok(self.count_from(subject, from).await?.0),
            None => Ok(0),
        }
    }

    /// How many messages of `subject` have a sequence of `from` or more (the first one's
    /// `Nats-Num-Pending`, the messages after it, plus itself), and the first one's `seq`.
    async fn count_from(&self, subject: &str, from: u64) -> Result<(u64, Option<u64>), InboxError> {
        let body = serde_json::json!({"seq": from, "next_by_subj": subject, "batch": 1});
        match self.direct_get(body).await? {
            None => Ok((0, None)),
            Some(reply) => {
                let pending = reply_header(&reply, "Nats-Num-Pending").ok_or_else(|| error("no Nats-Num-Pending"))?;
                Ok((pending + 1, reply_header(&reply, "Nats-Sequence")))
            }
        }
    }

    /// The sequence of the user's last personal message (0: none).
    pub(crate) async fn last(&self, user: &str) -> Result<u64, InboxError> {
        let body = serde_json::json!({"last_by_subj": Audience::User(user.to_string()).push_subject()});
        Ok(self.direct_get(body).await?.and_then(|reply| reply_header(&reply, "Nats-Sequence")).unwrap_or(0))
    }

    /// Up to `limit` personal messages of the user after `after`, in order.
    pub(crate) async fn page(&self, user: &str, after: u64, limit: usize) -> Result<Page, InboxError> {
        if after == u64::MAX {
            // Nothing can come after it (and `after + 1` below would overflow).
            return Ok(Page { messages: Vec::new(), next: after, complete: true });
        }
        let audience = Audience::User(user.to_string());
        let subject = audience.push_subject();
        let (remaining, limits) = tokio::join!(self.count_from(&subject, after + 1), self.limits());
        let (remaining, _) = remaining?;
        let mut replay = self.replayer.open(std::slice::from_ref(&audience), after, u64::MAX).await.map_err(error)?;
        let mut messages = Vec::new();
        while messages.len() < limit {
            let Some(stored) = replay.next().await else { break };
            messages.push(message::from_stored(stored.map_err(error)?));
        }
        let next = messages.last().map_or(after, |message| message.seq);
        let (first, per_subject_cap) = limits?;
        let trimmed = per_subject_cap > 0 && remaining >= per_subject_cap as u64;
        Ok(Page { messages, next, complete: first <= after + 1 && !trimmed })
    }

    /// The stream's first sequence, and its own per-subject limit (whatever this gateway's
    /// settings say: another gateway or an operator may have set it).
    async fn limits(&self) -> Result<(u64, i64), InboxError> {
        let stream = self.js.get_stream_no_info(STREAM).await.map_err(error)?;
        let info = stream.get_info().await.map_err(error)?;
        Ok((info.state.first_sequence, info.config.max_messages_per_subject))
    }

    /// One direct get (on the replays' connection, which reads any stored message's headers);
    /// `None` when no message matches.
    async fn direct_get(&self, body: serde_json::Value) -> Result<Option<Delivered>, InboxError> {
        let subject = format!("$JS.API.DIRECT.GET.{STREAM}");
        let reply = self.replayer.replies().request(subject, Bytes::from(body.to_string())).await.map_err(error)?;
        match reply.answer_status() {
            None | Some(200) => Ok(Some(reply)),
            Some(404) => Ok(None),
            Some(other) => Err(error(format!("direct get answered {other}"))),
        }
    }

    /// Follows every read position and tells the local sessions of a user whose position moved,
    /// until `shutdown`. A broken watch resumes after the last revision it saw.
    pub(crate) async fn watch(self: Arc<Self>, registry: Arc<Registry>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut last_revision = 0;
        while !shutdown.is_cancelled() {
            match self.follow(&registry, &mut last_revision, &shutdown).await {
                Ok(()) => {}
                // Stopping: the connection's drain ends the watch, as it should.
                Err(_) if shutdown.is_cancelled() => {}
                Err(error) if backoff.failed(false) => warn!(%error, "read positions watch restarting"),
                Err(error) => debug!(%error, "read positions watch not running yet"),
            }
            backoff.wait(&shutdown).await;
        }
    }

    async fn follow(
        &self,
        registry: &Registry,
        last_revision: &mut u64,
        shutdown: &CancellationToken,
    ) -> Result<(), InboxError> {
        let mut updates = watch_from(self.bucket().await?, *last_revision).await.map_err(error)?;
        loop {
            let entry = tokio::select! {
                entry = updates.next() => entry,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let entry = entry.ok_or_else(|| error("watch ended"))?.map_err(error)?;
            *last_revision = entry.revision;
            let (Some(user), Some(read)) = (kv_key_decode(&entry.key), forward::parse(&entry.value)) else { continue };
            // Each connection counts what it was sent: other messages may be on their way to it.
            for session in registry.of_user(&user) {
                session.mailbox.push_event(Event::ReadMoved { read });
            }
        }
    }
}

/// Tries at a count between two sequences while messages keep coming.
const COUNT_TRIES: usize = 4;

/// A numeric header of a direct-get reply.
fn reply_header(reply: &Delivered, name: &str) -> Option<u64> {
    reply.header(name)?.parse().ok()
}
