//! Dead letters (stream `HERALD_DLQ`, subjects `herald.dlq.<function>`; see docs/functions.md):
//!
//! - `GET /v1/dead-letters` → how many each function has;
//! - `GET /v1/dead-letters/<function>?after=<seq>&limit=<n>` → the letters, oldest first;
//! - `POST /v1/dead-letters/<function>/redrive` `{"seq":n}` → the event published again to its
//!   subject (a new message of the events stream, so its attempts count from 1 again), then the
//!   letter removed;
//! - `POST /v1/dead-letters/<function>/purge` → every letter of the function removed.

use herald_shared::functions::DeadLetter;
use herald_shared::id::check_function_name;
use herald_shared::payload::{data_bytes, data_value, from_base64};
use herald_shared::subject::{dead_letter, header};
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::jsapi::{self, NO_MESSAGE, NO_STREAM};
use crate::Shared;

/// The stream of dead letters (the functions' `dlq_stream`).
pub(crate) const DLQ_STREAM: &str = "HERALD_DLQ";
/// The header of a re-driven event naming the letter it came from (`HERALD_DLQ-<seq>`).
pub(crate) const REDRIVEN_FROM: &str = "Herald-Redriven-From";

const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 500;

/// `after` and `limit` of `GET /v1/dead-letters/<function>`.
pub(super) fn page_of(query: &str) -> Result<(u64, u64), ApiError> {
    super::page_query(query, DEFAULT_LIMIT, MAX_LIMIT)
}

/// `GET /v1/dead-letters`.
pub(super) async fn counts(shared: &Shared) -> Result<Value, ApiError> {
    let body = json!({"subjects_filter": "herald.dlq.>"});
    let info = match jsapi::request(shared, format!("STREAM.INFO.{DLQ_STREAM}"), &body).await? {
        Ok(info) => info,
        // No function ever dead-lettered anything (or the functions never ran).
        Err(error) if error.err_code == NO_STREAM => return Ok(json!({"total": 0, "functions": []})),
        Err(error) => return Err(error.into()),
    };
    let subjects = info["state"]["subjects"].as_object().cloned().unwrap_or_default();
    let mut functions: Vec<(String, u64)> = subjects
        .into_iter()
        .filter_map(|(subject, count)| Some((subject.strip_prefix("herald.dlq.")?.to_string(), count.as_u64()?)))
        .collect();
    functions.sort();
    let functions: Vec<Value> =
        functions.into_iter().map(|(function, count)| json!({"function": function, "dead_letters": count})).collect();
    Ok(json!({"total": info["state"]["messages"], "functions": functions}))
}

/// `GET /v1/dead-letters/<function>?after=&limit=`.
pub(super) async fn list(shared: &Shared, function: &str, query: &str) -> Result<Value, ApiError> {
    check_function_name(function).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (mut after, limit) = page_of(query)?;
    let mut letters = Vec::new();
    while (letters.len() as u64) < limit {
        // Nothing comes after the last sequence there can be.
        let Some(from) = after.checked_add(1) else { break };
        let body = json!({"seq": from, "next_by_subj": dead_letter(function)});
        let message = match jsapi::request(shared, format!("STREAM.MSG.GET.{DLQ_STREAM}"), &body).await? {
            Ok(answer) => StoredLetter::from_answer(&answer)?,
            Err(error) if error.err_code == NO_MESSAGE || error.err_code == NO_STREAM => break,
            Err(error) => return Err(error.into()),
        };
        after = message.seq;
        letters.push(message.to_json());
    }
    Ok(json!({"function": function, "dead_letters": letters, "next": after}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Redrive {
    seq: u64,
}

/// `POST /v1/dead-letters/<function>/redrive` `{"seq":n}`.
pub(super) async fn redrive(shared: &Shared, function: &str, Redrive { seq }: Redrive) -> Result<Value, ApiError> {
    check_function_name(function).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Stream sequences start at 1 (JetStream calls 0 a bad request, which is no outage).
    if seq == 0 {
        return Err(ApiError::bad_request("seq: letters are numbered from 1"));
    }
    let letter = match jsapi::request(shared, format!("STREAM.MSG.GET.{DLQ_STREAM}"), &json!({"seq": seq})).await? {
        Ok(answer) => StoredLetter::from_answer(&answer)?,
        Err(error) if error.err_code == NO_MESSAGE || error.err_code == NO_STREAM => {
            return Err(no_letter(function, seq));
        }
        Err(error) => return Err(error.into()),
    };
    if letter.subject != dead_letter(function) {
        return Err(no_letter(function, seq));
    }
    let event = letter.letter.as_ref().map_err(|why| {
        let reason = format!("dead letter {seq} of {function} cannot be read ({why}): purge it");
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_letter", reason)
    })?;
    let mut headers = async_nats::HeaderMap::new();
    let from = format!("{DLQ_STREAM}-{seq}");
    // A re-drive retried (its answer lost) publishes the event once.
    headers.insert(header::NATS_MSG_ID, format!("redrive:{from}").as_str());
    headers.insert(REDRIVEN_FROM, from.as_str());
    let js = shared.api_js.as_ref().unwrap_or(&shared.js);
    let payload = match &event.payload {
        Some(payload) => from_base64(payload).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_letter", format!("a dead letter's payload: {e}"))
        })?,
        // A letter from before the payload was kept: its data as clients would read it.
        None => data_bytes(&event.data),
    };
    let published = async { js.publish_with_headers(event.subject.clone(), headers, payload.into()).await?.await };
    let ack = published.await.map_err(|e| ApiError::unavailable(format!("publishing to {}: {e}", event.subject)))?;
    let deleted = jsapi::request(shared, format!("STREAM.MSG.DELETE.{DLQ_STREAM}"), &json!({"seq": seq})).await?;
    if let Err(error) = deleted
        && error.err_code != NO_MESSAGE
    {
        return Err(error.into());
    }
    Ok(json!({
        "function": function,
        "seq": seq,
        "subject": event.subject,
        "stream": ack.stream,
        "event_seq": ack.sequence,
        "duplicate": ack.duplicate,
    }))
}

/// `POST /v1/dead-letters/<function>/purge`.
pub(super) async fn purge(shared: &Shared, function: &str) -> Result<Value, ApiError> {
    check_function_name(function).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = json!({"filter": dead_letter(function)});
    let purged = match jsapi::request(shared, format!("STREAM.PURGE.{DLQ_STREAM}"), &body).await? {
        Ok(answer) => answer["purged"].as_u64().unwrap_or_default(),
        Err(error) if error.err_code == NO_STREAM => 0,
        Err(error) => return Err(error.into()),
    };
    Ok(json!({"function": function, "purged": purged}))
}

fn no_letter(function: &str, seq: u64) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no dead letter {seq} of {function}"))
}

/// A dead letter as stored: its sequence in the dead-letter stream, subject, time and content
/// (or why it cannot be read: something else published there, or a letter of another version).
struct StoredLetter {
    seq: u64,
    subject: String,
    time: String,
    letter: Result<DeadLetter, String>,
    raw: Vec<u8>,
}

impl StoredLetter {
    /// From a `STREAM.MSG.GET` answer (`{"message":{"subject","seq","data"(base64),"time"}}`).
    fn from_answer(answer: &Value) -> Result<StoredLetter, ApiError> {
        use base64::Engine;
        let message = &answer["message"];
        let data = base64::engine::general_purpose::STANDARD
            .decode(message["data"].as_str().unwrap_or_default())
            .map_err(|e| ApiError::unavailable(format!("a dead letter's data: {e}")))?;
        Ok(StoredLetter {
            seq: message["seq"].as_u64().unwrap_or_default(),
            subject: message["subject"].as_str().unwrap_or_default().to_string(),
            time: message["time"].as_str().unwrap_or_default().to_string(),
            letter: serde_json::from_slice(&data).map_err(|e| e.to_string()),
            raw: data,
        })
    }

    /// The letter as listed; one that cannot be read is listed too (with `unreadable` and its raw
    /// content as `data`), so that it hides none of the others and can be seen and purged.
    fn to_json(&self) -> Value {
        let l = match &self.letter {
            Ok(letter) => letter,
            Err(why) => {
                return json!({"seq": self.seq, "time": self.time, "unreadable": why,
                    "error": format!("unreadable dead letter: {why}"), "data": data_value(&self.raw)});
            }
        };
        json!({
            "seq": self.seq,
            "time": self.time,
            "subject": l.subject,
            "stream": l.stream,
            "event_seq": l.seq,
            "attempts": l.attempts,
            "error": l.error,
            "data": Self::data(l),
        })
    }

    /// The letter's `data`; for a letter too large to carry it, read from its `payload`.
    fn data(letter: &DeadLetter) -> Value {
        match (&letter.data, &letter.payload) {
            (Value::Null, Some(payload)) => from_base64(payload).map(|bytes| data_value(&bytes)).unwrap_or(Value::Null),
            (data, _) => data.clone(),
        }
    }
}
