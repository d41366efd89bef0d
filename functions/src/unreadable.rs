//! Events the NATS client cannot read. NATS stores whatever header bytes a publisher sends (a value
//! that is not UTF-8, a line without `:`, a first line that is not `NATS/1.0`), but async-nats drops
//! its whole connection on such a delivery instead of handing it over: the event is never handled,
//! the durable consumer delivers it again after every `ack_wait`, for ever, and each time every
//! function of the copy loses its connection (rpc calls in flight, lifecycle events).
//!
//! After every (re)connection, each durable consumer's pending events are read with the stream's
//! JSON API (which returns headers as base64, not parsed); an event whose headers async-nats would
//! refuse is dead-lettered for each durable function whose subjects match it, then removed from
//! the events stream, which ends its deliveries. Its letter keeps the payload, so it can be
//! re-driven (without the headers).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use herald_shared::payload::from_base64;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::durable::Durable;

/// How often the connection count is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Pending events read past a consumer's acknowledgement floor, at most, per sweep. An unreadable
/// event is never acknowledged, so the floor stops below it: the next sweeps reach it.
const MAX_LOOK: u64 = 1024;

/// Sweeps the consumers of `durables` after each connection of `client` until `shutdown`.
pub(crate) async fn watch(client: async_nats::Client, durables: Vec<Arc<Durable>>, shutdown: CancellationToken) {
    let statistics = client.statistics();
    let mut swept = 0;
    loop {
        let connects = statistics.connects.load(Ordering::Relaxed);
        if connects != swept && client.connection_state() == State::Connected {
            swept = connects;
            for durable in &durables {
                if let Err(error) = sweep(durable, &durables).await {
                    debug!(consumer = durable.durable_name(), %error, "cannot look for unreadable events");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Dead-letters and removes the unreadable events `durable`'s consumer has pending.
async fn sweep(durable: &Durable, durables: &[Arc<Durable>]) -> Result<(), String> {
    let js = durable.js();
    let stream = js.get_stream_no_info(durable.stream()).await.map_err(|e| e.to_string())?;
    let info = stream.consumer_info(durable.durable_name()).await.map_err(|e| e.to_string())?;
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let first = info.ack_floor.stream_sequence + 1;
    let last = info.delivered.stream_sequence.min(first + MAX_LOOK - 1);
    for seq in first..=last {
        let Some(event) = stored(js, durable.stream(), seq).await? else { continue };
        let Some(why) = event.headers.as_deref().and_then(unreadable_headers) else { continue };
        warn!(stream = durable.stream(), seq, subject = %event.subject, why, "an event whose headers cannot be read: dead-lettered and removed");
        let error = format!(
            "its headers cannot be read ({why}): the NATS client refuses the delivery, so it was never handled; \
             it was removed from stream {}",
            durable.stream()
        );
        for matching in durables.iter().filter(|d| d.consumes(&event.subject)) {
            matching.dead_letter_unhandled(&event.subject, seq, &event.payload, &error).await?;
        }
        stream.delete_message(seq).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A stored event as the stream's JSON API gives it: headers and payload undecoded.
struct StoredEvent {
    subject: String,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The event stored at `seq`, or `None` when there is none (acknowledged and removed, or deleted).
async fn stored(js: &jetstream::Context, stream: &str, seq: u64) -> Result<Option<StoredEvent>, String> {
    #[derive(Deserialize)]
    struct Answer {
        message: Option<Raw>,
        error: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Raw {
        subject: String,
        #[serde(default)]
        hdrs: Option<String>,
        #[serde(default)]
        data: String,
    }
    let subject = format!("STREAM.MSG.GET.{stream}");
    let answer: Answer = js.request(subject, &json!({ "seq": seq })).await.map_err(|e| e.to_string())?;
    match (answer.message, answer.error) {
        (Some(raw), _) => {
            let headers = raw.hdrs.map(|h| from_base64(&h)).transpose().map_err(|e| e.to_string())?;
            let payload = from_base64(&raw.data).map_err(|e| e.to_string())?;
            Ok(Some(StoredEvent { subject: raw.subject, headers, payload }))
        }
        (None, Some(error)) if error["code"] == 404 => Ok(None),
        (None, error) => Err(format!("stream {stream} message {seq}: {error:?}")),
    }
}

/// Why async-nats (0.51) would refuse a message with this header block, if it would: the rules of
/// its parser, which drops the connection on any of them.
pub(crate) fn unreadable_headers(block: &[u8]) -> Option<&'static str> {
    let Ok(text) = std::str::from_utf8(block) else { return Some("not UTF-8") };
    let mut lines = text.lines();
    let Some(status) = lines.next().and_then(|first| first.strip_prefix("NATS/1.0")) else {
        return Some("the first line is not NATS/1.0");
    };
    let status = status.trim();
    let code = status.split_once(' ').map_or(status, |(code, _)| code.trim());
    if !code.is_empty() && async_nats::status::StatusCode::from_str(code).is_err() {
        return Some("the status of the first line is not a number");
    }
    for line in lines.filter(|line| !line.is_empty() && !line.starts_with(char::is_whitespace)) {
        let Some((name, _)) = line.split_once(':') else { return Some("a line without ':'") };
        if async_nats::HeaderName::from_str(name).is_err() {
            return Some("a header name with characters NATS headers cannot have");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_async_nats_refuses_are_named() {
        assert_eq!(unreadable_headers(b"NATS/1.0\r\nNats-Msg-Id: a\r\nX: caf\xc3\xa9\r\n\r\n"), None);
        assert_eq!(unreadable_headers(b"NATS/1.0 503\r\n\r\n"), None);
        assert_eq!(unreadable_headers(b"NATS/1.0\r\nX:\r\n  continued\r\n\r\n"), None);
        assert_eq!(unreadable_headers(b"NATS/1.0\r\nX: caf\xe9\r\n\r\n"), Some("not UTF-8"));
        assert_eq!(unreadable_headers(b"NATS/1.0\r\nno colon here\r\n\r\n"), Some("a line without ':'"));
        assert_eq!(unreadable_headers(b"HTTP/1.1\r\n\r\n"), Some("the first line is not NATS/1.0"));
        assert!(unreadable_headers(b"NATS/1.0 abc\r\n\r\n").is_some());
        assert!(unreadable_headers(b"NATS/1.0\r\nA B: c\r\n\r\n").is_some());
    }
}
