//! `POST /v1/publish`: one message, or an array of them, stored with JetStream.
//!
//! Every message has an id (`Nats-Msg-Id`): the caller's, or one made here, named in every answer,
//! errors included. A publish whose answer was lost or late (a 503 after NATS was away) may still
//! have been stored; retried with the same id within the stream's duplicate window it is stored
//! once, so a retry is always safe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use bytes::Bytes;
use futures::future::join_all;
use herald_shared::id::{IdKind, check_id};
use herald_shared::subject::{Audience, STREAM, header};
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::ApiError;
use crate::Shared;
use herald_shared::nats::{OUT_OF_STORAGE, out_of_storage};

/// Most messages in one batch publish.
const MAX_BATCH: usize = 1000;

/// What the 503 of a failed publish adds to its reason.
const RETRY_HINT: &str = "it may have been stored: retry with the same id, it is stored once";

/// What NATS last said when it refused the API's pushes (a NATS user not allowed to publish them)
/// or its connection (a wrong password): a publish that then gets no answer was refused, and a
/// retry will not help.
#[derive(Default)]
pub(crate) struct PublishRefusals(Mutex<Option<(Instant, Refusal)>>);

#[derive(Debug, Clone)]
enum Refusal {
    /// A permissions violation, as NATS wrote it.
    Publish(String),
    /// An authorization violation: the credentials.
    Credentials,
    /// A permissions violation on the acknowledgements' subject, as NATS wrote it.
    Acks(String),
}

impl Refusal {
    /// The reason of the 500 it explains.
    fn reason(&self) -> String {
        match self {
            Refusal::Publish(text) => format!(
                "NATS refused the API's publishes ({text}): the API publishes as api_nats_user, which NATS must \
                 allow to publish pushes (nats.conf's publisher); a retry will not help"
            ),
            Refusal::Credentials => "NATS refused the API's connection (authorization violation): check \
                                     api_nats_user and api_nats_password; a retry will not help"
                .into(),
            Refusal::Acks(text) => format!(
                "NATS refused the API's user its acknowledgements ({text}): the message may be stored, but no \
                 answer can say so; api_nats_user must read _INBOX.> (nats.conf's publisher)"
            ),
        }
    }
}

/// How long a refusal explains the publishes that time out after it.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

impl PublishRefusals {
    /// Notes `event` of a connection the API may publish on (the gateway's own, without
    /// `api_nats_user`), if it refuses a push.
    pub(crate) fn note(&self, event: &async_nats::Event) {
        if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event
            && text.contains("Permissions Violation for Publish to \"push.")
        {
            self.set(Some(Refusal::Publish(text.clone())));
        }
    }

    /// Notes `event` of the API's own connection (`api_nats_user`): a push refused, or its
    /// credentials, until it connects.
    pub(crate) fn note_api(&self, event: &async_nats::Event) {
        match event {
            event if herald_shared::nats::refuses_credentials(event) => self.set(Some(Refusal::Credentials)),
            async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                if text.contains("Permissions Violation for Subscription to \"_INBOX") =>
            {
                self.set(Some(Refusal::Acks(text.clone())))
            }
            async_nats::Event::Connected => {
                let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(last.as_ref(), Some((_, Refusal::Credentials))) {
                    *last = None;
                }
            }
            event => self.note(event),
        }
    }

    fn set(&self, refusal: Option<Refusal>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = refusal.map(|refusal| (Instant::now(), refusal));
    }

    fn recent(&self) -> Option<Refusal> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|(when, _)| when.elapsed() < REFUSAL_MEMORY).map(|(_, text)| text.clone())
    }
}

/// A message to publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish<'a> {
    to: Target,
    /// As the caller wrote it: a value re-encoded could change (a number past 64 bits, say).
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

/// Exactly one of the three: `{"user":…,"topic":…}` is refused, not read as one of them.
#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum Target {
    User { user: String },
    Topic { topic: String },
    All { all: bool },
}

/// A message ready for JetStream.
struct Checked {
    id: String,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
}

impl Publish<'_> {
    /// The message ready to publish (with an id made here when the caller gave none), or why it is
    /// not acceptable.
    fn check(self) -> Result<Checked, String> {
        let audience = match self.to {
            Target::User { user } => check_id(IdKind::User, &user).map(|_| Audience::User(user)),
            Target::Topic { topic } => check_id(IdKind::Topic, &topic).map(|_| Audience::Topic(topic)),
            Target::All { all: true } => Ok(Audience::All),
            Target::All { all: false } => return Err("to: {\"all\": false} addresses nobody".into()),
        }
        .map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(kind) = self.kind {
            herald_shared::id::check_kind(&kind)?;
            headers.insert(header::HERALD_TYPE, kind.as_str());
        }
        let id = match self.id {
            Some(id) if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(format!("id {id:?}: 1-128 visible ASCII characters"));
            }
            Some(id) => id,
            None => format!("api-{}", crate::id::random_id(20)),
        };
        headers.insert(header::NATS_MSG_ID, id.as_str());
        // The data is sent as the JSON text it came as, so clients receive the same JSON value.
        let payload = self.data.map_or("null", RawValue::get);
        Ok(Checked {
            id,
            subject: audience.push_subject(),
            headers,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    }
}

/// Reads one message of a request.
fn read(item: &RawValue) -> Result<Checked, String> {
    serde_json::from_str::<Publish>(item.get()).map_err(describe).and_then(Publish::check)
}

/// Why a message could not be read, in the caller's terms.
fn describe(error: serde_json::Error) -> String {
    let text = error.to_string();
    if text.contains("untagged enum Target") {
        return r#"to: exactly one of {"user":"<id>"}, {"topic":"<topic>"}, {"all":true}"#.to_string();
    }
    text
}

/// The bytes NATS counts of a message: its payload and its headers' block.
fn size(message: &Checked) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, values)| {
            values.iter().map(|value| name.to_string().len() + value.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    message.payload.len() + headers + "NATS/1.0\r\n\r\n".len()
}

/// The subject of stored message `seq`, if the stream says (a duplicate names what it duplicates).
async fn stored_to(shared: &Shared, seq: u64) -> Option<String> {
    let stream = shared.js.get_stream_no_info(STREAM).await.ok()?;
    Some(stream.direct_get(seq).await.ok()?.subject.to_string())
}

pub(super) async fn publish(shared: &Shared, body: &[u8]) -> Result<Value, ApiError> {
    let not_json = |e: serde_json::Error| ApiError::bad_request(format!("not JSON: {e}"));
    let whole: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
    let batch = whole.get().starts_with('[');
    let items: Vec<&RawValue> = if batch { serde_json::from_str(whole.get()).map_err(not_json)? } else { vec![whole] };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!("a batch holds 1 to {MAX_BATCH} messages")));
    }
    let which = |index: usize, reason: String| if batch { format!("message {index}: {reason}") } else { reason };
    let max_payload = shared.client.server_info().max_payload;
    let mut checked = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        if !item.get().starts_with('{') {
            // serde would read a message from an array of its fields too.
            return Err(ApiError::bad_request(which(index, "a message is a JSON object".into())));
        }
        let message = read(item).map_err(|reason| ApiError::bad_request(which(index, reason)))?;
        if size(&message) > max_payload {
            let reason = format!("{} bytes with its headers; NATS takes at most {max_payload}", size(&message));
            let error = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", which(index, reason));
            return Err(error.with_id(message.id));
        }
        checked.push(message);
    }
    let js = shared.api_js.as_ref().unwrap_or(&shared.js);
    let acks = join_all(checked.into_iter().map(|message| async move {
        let subject = message.subject.clone();
        let stored = async { js.publish_with_headers(subject, message.headers, message.payload).await?.await };
        match stored.await {
            Ok(ack) if ack.duplicate => match stored_to(shared, ack.sequence).await {
                Some(other) if other != message.subject => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "id {} names message {} to {other}, stored before: an id is one message of the whole stream, so \
                         this one was not stored; give each message its own id",
                        message.id, ack.sequence
                    ),
                )
                .with_id(message.id)),
                _ => Ok(json!({"id": message.id, "seq": ack.sequence, "duplicate": true})),
            },
            Ok(ack) => Ok(json!({"id": message.id, "seq": ack.sequence, "duplicate": false})),
            Err(error) => Err(match shared.publish_refusals.recent() {
                Some(refusal) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "misconfigured", refusal.reason()),
                None if out_of_storage(&error) => {
                    ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", OUT_OF_STORAGE)
                }
                None => ApiError::unavailable(format!("{}; {RETRY_HINT}", publish_failure(&error))),
            }
            .with_id(message.id)),
        }
    }))
    .await;
    if !batch {
        return acks.into_iter().next().unwrap_or_else(|| Err(ApiError::unavailable("nothing published")));
    }
    let results: Vec<Value> = acks.into_iter().map(|ack| ack.unwrap_or_else(|error| error.body())).collect();
    Ok(json!({ "results": results }))
}

/// A failed publish, said as what it means here: async-nats calls NATS's "no responders" to a
/// publish "no stream found", but the stream is rarely missing (the gateways make it again): mostly
/// nobody answered for it, as while its leader is being elected or its nodes are cut off.
fn publish_failure(error: &PublishError) -> String {
    match error.kind() {
        PublishErrorKind::StreamNotFound => {
            "no JetStream stream answered for the subject (its leader being elected, its nodes out of reach, or the stream missing)".into()
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: Value) -> Result<Checked, String> {
        read(&RawValue::from_string(value.to_string()).unwrap())
    }

    #[test]
    fn a_publish_nobody_answered_is_not_said_to_lack_a_stream() {
        let unanswered = publish_failure(&PublishError::new(PublishErrorKind::StreamNotFound));
        assert!(unanswered.starts_with("no JetStream stream answered"), "{unanswered}");
        let timed_out = PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(publish_failure(&timed_out), timed_out.to_string());
    }

    #[test]
    fn publish_requests_are_checked() {
        let message =
            check(json!({"to": {"user": "42"}, "data": {"text": "hi"}, "kind": "mail", "id": "order-7"})).unwrap();
        assert_eq!((message.subject.as_str(), message.id.as_str()), ("push.user.42", "order-7"));
        assert_eq!(message.headers.get(header::HERALD_TYPE).map(|v| v.as_str()), Some("mail"));
        assert_eq!(message.headers.get(header::NATS_MSG_ID).map(|v| v.as_str()), Some("order-7"));
        assert_eq!(&message.payload[..], br#"{"text":"hi"}"#);
        assert_eq!(check(json!({"to": {"all": true}, "data": "hi"})).unwrap().payload, Bytes::from_static(b"\"hi\""));
        assert_eq!(check(json!({"to": {"topic": "news"}})).unwrap().subject, "push.topic.news");
        for bad in [
            json!({"to": {"user": "a.b"}}),
            json!({"to": {"user": "*"}}),
            json!({"to": {"all": false}}),
            json!({"to": {"group": "x"}}),
            json!({"to": {"user": "42"}, "id": "has space"}),
            json!({"to": {"user": "42"}, "kind": "a\nb"}),
            json!({"to": {"user": "42"}, "kind": " mail"}),
            json!({"to": {"user": "42"}, "extra": 1}),
            json!({"to": {"user": "42", "topic": "news"}}),
            json!({"to": {"topic": "news", "all": true}}),
            json!({"to": {"user": "42", "zz": 1}}),
            json!({"data": 1}),
        ] {
            assert!(check(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_without_an_id_gets_one() {
        let (first, second) =
            (check(json!({"to": {"all": true}})).unwrap(), check(json!({"to": {"all": true}})).unwrap());
        assert!(first.id.starts_with("api-") && first.id.len() == 24);
        assert_ne!(first.id, second.id);
        assert_eq!(first.headers.get(header::NATS_MSG_ID).map(|v| v.as_str()), Some(first.id.as_str()));
    }
}
