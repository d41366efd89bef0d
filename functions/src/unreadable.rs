//! Events the NATS client cannot take. NATS stores whatever header bytes a publisher sends, and
//! async-nats refuses some of them: a block that is not UTF-8, a line without `:`, a name with a
//! space, a first line that is not `NATS/1.0` make it drop its whole connection; a carriage return
//! left inside a trimmed value makes it panic (the connection is gone for good: see
//! `Runtime::nats_client_lost`); a first line with a status other than 200 makes the pull consumer
//! take the event for a server's notice and drop it. Either way no handler sees the event, and the
//! durable consumer delivers it again after every `ack_wait`, for ever.
//!
//! Before a copy's first pull, after every (re)connection, and every `ack_wait` while a consumer has
//! events delivered more than once, each durable consumer's pending events on its own subjects are
//! read with the stream's JSON API (which returns headers as base64, unparsed); one the client
//! cannot take is dead-lettered for that function and terminated for its consumer alone (`+TERM` on
//! the event's acknowledgement subject): the stream keeps it for other consumers. Its letter keeps
//! the payload, so it can be re-driven (without the headers).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use herald_shared::payload::from_base64;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::durable::{Durable, Ending};
use crate::worker::Worker;

/// How often the connection count is looked at: a sweep after a reconnection starts at once, well
/// before the event that cut the connection is due again (`ack_wait` after its delivery), or that
/// event can cut the sweep's own requests off, sweep after sweep.
const LOOK_EVERY: Duration = Duration::from_millis(100);
/// How soon a failed sweep is tried again, unless a new connection comes first.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a sweep's requests wait: a drop of the connection (what such an event causes) loses
/// their answers, and the sweep is better tried again soon than after async-nats's 10 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Sweeps that failed in a row before it is worth a warning.
const FAILURES_TOLD: u32 = 5;
/// Pending events read per consumer and sweep, at most. One the client cannot take is never
/// acknowledged, so the consumer's acknowledgement floor stops below it: later sweeps reach it.
const MAX_LOOK: usize = 1024;

/// Sweeps the consumers of `durables` after each connection of `client`, and every `ack_wait`
/// while one has events delivered again, until `shutdown`; a sweep that failed is tried again.
pub(crate) async fn watch(
    client: async_nats::Client,
    durables: Vec<(Arc<Durable>, Arc<Worker>)>,
    ack_wait: Duration,
    shutdown: CancellationToken,
    client_lost: CancellationToken,
) {
    let statistics = client.statistics();
    let (mut seen_connects, mut swept_at, mut failures) = (0, Instant::now(), 0);
    // A connection not swept yet, and whether the last sweep after a reconnection failed.
    let (mut new_connection, mut after_reconnect) = (false, false);
    loop {
        let connects = statistics.connects.load(Ordering::Relaxed);
        if connects != seen_connects {
            (seen_connects, new_connection, after_reconnect) = (connects, true, true);
        }
        let wait = if failures > 0 { RETRY_AFTER } else { ack_wait };
        let due = new_connection || swept_at.elapsed() >= wait;
        if due && client.connection_state() == State::Connected {
            (swept_at, new_connection) = (Instant::now(), false);
            match sweep_all(&durables, after_reconnect).await {
                Ok(()) => (after_reconnect, failures) = (false, 0),
                Err(error) => {
                    failures += 1;
                    debug!(%error, failures, "a sweep for events the NATS client cannot take failed");
                    if failures % FAILURES_TOLD == 0 {
                        warn!(%error, "cannot look for events the NATS client cannot take (on a permissions violation: the functions' NATS user needs $JS.API.STREAM.MSG.GET on the events stream, see nats.conf)");
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = shutdown.cancelled() => return,
            _ = client_lost.cancelled() => return,
        }
    }
}

/// Sweeps every durable's consumer once (`after_reconnect`: whether or not events came again).
pub(crate) async fn sweep_all(durables: &[(Arc<Durable>, Arc<Worker>)], after_reconnect: bool) -> Result<(), String> {
    let mut first_error = None;
    for (durable, worker) in durables {
        let mut js = durable.js().clone();
        js.set_timeout(REQUEST_TIMEOUT);
        // One consumer that cannot be swept keeps no other from it.
        if let Err(error) = sweep(&js, durable, worker, after_reconnect).await {
            first_error.get_or_insert_with(|| format!("{}: {error}", durable.durable_name()));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Dead-letters and terminates the events `durable`'s consumer has pending that the client
/// cannot take; after a reconnection always, otherwise only while some were delivered again.
async fn sweep(js: &jetstream::Context, durable: &Durable, worker: &Worker, reconnected: bool) -> Result<(), String> {
    let stream = js.get_stream_no_info(durable.stream()).await.map_err(|e| e.to_string())?;
    let info = stream.consumer_info(durable.durable_name()).await.map_err(|e| e.to_string())?;
    let (first, last) = (info.ack_floor.stream_sequence + 1, info.delivered.stream_sequence);
    durable.forget_ended_below(first);
    if info.num_ack_pending == 0 || (!reconnected && info.num_redelivered == 0) {
        return Ok(());
    }
    let mut first_error = None;
    for filter in durable.subjects() {
        let mut next = first;
        for _ in 0..MAX_LOOK {
            let Some((seq, event)) = stored_next(js, durable.stream(), next, filter).await? else { break };
            if seq > last {
                break;
            }
            next = seq + 1;
            let Some(why) = event.headers.as_deref().and_then(untakeable_headers) else { continue };
            if let Err(error) = end(js, durable, worker, seq, &event, why, info.created).await {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Dead-letters event `seq` (unless this process did already) and `+TERM`s it for the consumer made
/// at `created`.
async fn end(
    js: &jetstream::Context,
    durable: &Durable,
    worker: &Worker,
    seq: u64,
    event: &StoredEvent,
    why: &str,
    created: time::OffsetDateTime,
) -> Result<(), String> {
    let ending = durable.ending(seq, created);
    match ending {
        // It waits in the window until the events before it are settled.
        Ending::Done => return Ok(()),
        Ending::Lettered => {}
        Ending::New | Ending::Tried => {
            durable.ended_to(seq, Ending::Tried);
            let error = format!("the NATS client cannot take it ({why}), so no handler saw it");
            let stored = durable.dead_letter_unhandled(js, &event.subject, seq, &event.payload, &error).await?;
            // A duplicate after this process's own unanswered try is that try's letter.
            if stored || ending == Ending::Tried {
                warn!(function = durable.function(), stream = durable.stream(), seq, subject = %event.subject, why, "an event the NATS client cannot take: dead-lettered");
                worker.metrics().dead_letters.get_or_create(worker.label()).inc();
            }
            durable.ended_to(seq, Ending::Lettered);
        }
    }
    durable.terminate(seq, REQUEST_TIMEOUT).await?;
    durable.ended_to(seq, Ending::Done);
    Ok(())
}

/// A stored event as the stream's JSON API gives it: headers and payload undecoded.
struct StoredEvent {
    subject: String,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The first event at `seq` or after it on `filter`, as stored, or `None` when there is none.
async fn stored_next(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
    filter: &str,
) -> Result<Option<(u64, StoredEvent)>, String> {
    #[derive(Deserialize)]
    struct Answer {
        message: Option<Raw>,
        error: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Raw {
        subject: String,
        seq: u64,
        #[serde(default)]
        hdrs: Option<String>,
        #[serde(default)]
        data: String,
    }
    let subject = format!("STREAM.MSG.GET.{stream}");
    let query = json!({ "seq": seq, "next_by_subj": filter });
    let answer: Answer = js.request(subject, &query).await.map_err(|e| e.to_string())?;
    match (answer.message, answer.error) {
        (Some(raw), _) => {
            let headers = raw.hdrs.map(|h| from_base64(&h)).transpose().map_err(|e| e.to_string())?;
            let payload = from_base64(&raw.data).map_err(|e| e.to_string())?;
            Ok(Some((raw.seq, StoredEvent { subject: raw.subject, headers, payload })))
        }
        (None, Some(error)) if error["code"] == 404 => Ok(None),
        (None, error) => Err(format!("stream {stream} after {seq} on {filter}: {error:?}")),
    }
}

/// Why async-nats (0.51) would not hand over a JetStream delivery with this header block, if it
/// would not: the rules of its parser (which drops the connection on any of them), step by step,
/// and a status on the first line (which its pull consumer takes for the server's own notice).
pub(crate) fn untakeable_headers(block: &[u8]) -> Option<&'static str> {
    let Ok(text) = std::str::from_utf8(block) else { return Some("headers that are not UTF-8") };
    let mut lines = text.lines().peekable();
    let Some(status) = lines.next().and_then(|first| first.strip_prefix("NATS/1.0")) else {
        return Some("a first header line that is not NATS/1.0");
    };
    let status = status.trim();
    let code = status.split_once(' ').map_or(status, |(code, _)| code.trim());
    if !code.is_empty() {
        match async_nats::status::StatusCode::from_str(code) {
            // Handed over as a message without a status.
            Ok(async_nats::status::StatusCode::OK) => {}
            Ok(_) => return Some("a status on the first header line, taken for the server's notice"),
            Err(_) => return Some("a first header line with a status that is not a number"),
        }
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else { return Some("a header line without ':'") };
        if async_nats::HeaderName::from_str(name).is_err() {
            return Some("a header name with characters NATS headers cannot have");
        }
        // A value may go on over lines that start with whitespace; it is trimmed at both ends. A
        // carriage return left inside it (not before a line feed) makes the client panic, its
        // connection gone for good.
        let mut joined = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|next| next.starts_with(char::is_whitespace)) {
            joined.push_str(more);
        }
        if joined.trim_end().contains('\r') {
            return Some("a carriage return inside a header value");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_async_nats_does_not_hand_over_are_named() {
        let takeable: [&[u8]; 8] = [
            b"NATS/1.0\r\nNats-Msg-Id: a\r\nX: caf\xc3\xa9\r\n\r\n",
            b"NATS/1.0\r\nX: a\r\n  continued\r\n\r\n",
            b"NATS/1.0\r\n\r\n",
            b"NATS/1.0 200\r\nX: a\r\n\r\n",
            // Carriage returns the value's trimming takes away.
            b"NATS/1.0\r\nX: abc\r\r\n\r\n",
            b"NATS/1.0\r\nX:\r\r\n\r\n",
            b"NATS/1.0\r\nX: \rabc\r\n\r\n",
            b"NATS/1.0\r\nX: a\r\n \r\r\n\r\n",
        ];
        for block in takeable {
            assert_eq!(untakeable_headers(block), None, "{block:?}");
        }
        let untakeable: [(&[u8], &str); 10] = [
            (b"NATS/1.0\r\nX: caf\xe9\r\n\r\n", "headers that are not UTF-8"),
            (b"NATS/1.0\r\nno colon here\r\n\r\n", "a header line without ':'"),
            (b"HTTP/1.1\r\n\r\n", "a first header line that is not NATS/1.0"),
            (b"NATS/1.0 503\r\n\r\n", "a status on the first header line, taken for the server's notice"),
            (b"NATS/1.0 abc\r\n\r\n", "a first header line with a status that is not a number"),
            (b"NATS/1.0\r\nA B: c\r\n\r\n", "a header name with characters NATS headers cannot have"),
            // Whitespace continues a value only after a header line.
            (b"NATS/1.0\r\n X: y\r\n\r\n", "a header name with characters NATS headers cannot have"),
            (b"NATS/1.0\r\nX: a\rb\r\n\r\n", "a carriage return inside a header value"),
            (b"NATS/1.0\r\nX: a\r\n  b\rc\r\n\r\n", "a carriage return inside a header value"),
            (b"NATS/1.0\r\nX: a\r\n\rb\r\n\r\n", "a carriage return inside a header value"),
        ];
        for (block, why) in untakeable {
            assert_eq!(untakeable_headers(block), Some(why), "{block:?}");
        }
    }
}
