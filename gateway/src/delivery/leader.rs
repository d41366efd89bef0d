//! After the stream changes leader: which routed subjects have a message stored past what the
//! router has seen of them. A leader that fails after storing a message and before republishing it
//! leaves the message stored but never delivered, and nothing on its subject says so until the
//! subject's next message (and then maybe behind newer messages of other subjects). The new leader
//! is asked each routed subject's last stored sequence; the router puts a gap where one is past
//! what it routed, so only the sessions of those subjects catch up (see `RouterTask::stored_past`).

use base64::Engine;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use herald_shared::subject::{Audience, STREAM, header};

use super::feed::Feed;

/// JetStream's error code for "no message found".
const NO_MESSAGE_FOUND: u64 = 10037;

/// Questions to the stream's leader in flight at once.
const IN_FLIGHT: usize = 64;

/// For each `(audience, routed)` (the last sequence of its subject the router accounts for), the
/// subject's last stored sequence where it is past `routed`; an error when the stream could not
/// say for some subject.
pub(crate) async fn stored_past(feed: &Feed, routed: Vec<(Audience, u64)>) -> Result<Vec<(Audience, u64)>, String> {
    // The first failure ends this question: the router asks again, or every session catches up.
    let answers: Vec<Option<(Audience, u64)>> = stream::iter(routed)
        .map(|(audience, routed)| async move {
            let last = last_stored(feed, &audience).await?;
            Ok::<_, String>(last.filter(|last| *last > routed).map(|last| (audience, last)))
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(answers.into_iter().flatten().collect())
}

/// The last sequence stored on `audience`'s subject, from the stream's leader; none if it holds
/// nothing there.
async fn last_stored(feed: &Feed, audience: &Audience) -> Result<Option<u64>, String> {
    let query = serde_json::json!({ "last_by_subj": audience.push_subject() });
    Ok(message_get(feed, query).await?.map(|stored| stored.seq))
}

/// The message `query` (a `STREAM.MSG.GET` request) names, from the stream's leader: never a
/// replica that may be behind, as a direct get could be.
pub(crate) async fn message_get(feed: &Feed, query: serde_json::Value) -> Result<Option<Stored>, String> {
    let subject = format!("$JS.API.STREAM.MSG.GET.{STREAM}");
    let answer = feed.request(subject, Bytes::from(query.to_string())).await.map_err(|error| error.to_string())?;
    stored(&answer)
}

/// The stream's replica group as a `STREAM.INFO` answer describes it (a server without a cluster
/// names itself its leader).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct StreamCluster {
    #[serde(default)]
    leader: String,
}

impl StreamCluster {
    /// False when the group has no leader: the answering replica then speaks from its own store,
    /// which lacks what the others stored while it was cut off from them.
    pub(crate) fn has_leader(&self) -> bool {
        !self.leader.is_empty()
    }
}

/// A message a `STREAM.MSG.GET` answer holds: its sequence and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    /// Its `Herald-Type`, or empty.
    pub(crate) kind: String,
}

impl Stored {
    /// Whether it is of one of the `muted` kinds.
    pub(crate) fn is_muted(&self, muted: &[Box<str>]) -> bool {
        super::message::is_muted(&self.kind, muted)
    }
}

/// The message a `STREAM.MSG.GET` answer holds; none when it says 404 "no message found" (a 404
/// "stream not found" says nothing of the message: an error).
pub(crate) fn stored(answer: &[u8]) -> Result<Option<Stored>, String> {
    let Some(message) = message_in(answer)? else { return Ok(None) };
    let seq = message.get("seq").and_then(serde_json::Value::as_u64).ok_or("a message without its seq")?;
    // Headers the stream could not give (it always can) leave the kind empty: never muted.
    let headers = message.get("hdrs").and_then(serde_json::Value::as_str).unwrap_or_default();
    let headers = base64::engine::general_purpose::STANDARD.decode(headers).unwrap_or_default();
    let kind = super::feed::proto::header(&headers, header::HERALD_TYPE).unwrap_or_default().to_string();
    Ok(Some(Stored { seq, kind }))
}

/// The `message` object of a `STREAM.MSG.GET` answer; none when it says 404 "no message found".
pub(crate) fn message_in(answer: &[u8]) -> Result<Option<serde_json::Value>, String> {
    let mut answer: serde_json::Value = serde_json::from_slice(answer).map_err(|error| error.to_string())?;
    if let Some(message) = answer.get_mut("message").filter(|message| message.is_object()) {
        return Ok(Some(message.take()));
    }
    let code = |name: &str| answer.pointer(&format!("/error/{name}")).and_then(serde_json::Value::as_u64);
    match (code("code"), code("err_code")) {
        (Some(404), None | Some(NO_MESSAGE_FOUND)) => Ok(None),
        _ => Err(format!("message get answered {answer}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_get_answer_gives_the_message_or_none_or_an_error() {
        let found = br#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"push.all","seq":42,"time":"t"}}"#;
        assert_eq!(stored(found), Ok(Some(Stored { seq: 42, kind: String::new() })));
        let hdrs = base64::engine::general_purpose::STANDARD.encode("NATS/1.0\r\nHerald-Type: ads\r\n\r\n");
        let kind = format!(r#"{{"message":{{"subject":"push.user.u","seq":7,"hdrs":"{hdrs}","time":"t"}}}}"#);
        let kind = stored(kind.as_bytes()).unwrap().unwrap();
        assert_eq!(kind, Stored { seq: 7, kind: "ads".into() });
        assert!(kind.is_muted(&["ads".into()]) && !kind.is_muted(&["mail".into()]));
        let none = br#"{"error":{"code":404,"err_code":10037,"description":"no message found"}}"#;
        assert_eq!(stored(none), Ok(None));
        let no_stream = br#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#;
        assert!(stored(no_stream).is_err());
        let unavailable = br#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(stored(unavailable).is_err());
        assert!(stored(b"not json").is_err());
    }
}
