//! After the stream changes leader: which routed subjects have a message stored past what the
//! router has seen of them. A leader that fails after storing a message and before republishing it
//! leaves the message stored but never delivered, and nothing on its subject says so until the
//! subject's next message (and then maybe behind newer messages of other subjects). The new leader
//! is asked each routed subject's last stored sequence; the router puts a gap where one is past
//! what it routed, so only the sessions of those subjects catch up (see `RouterTask::stored_past`).

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use herald_shared::subject::{Audience, STREAM};

use super::feed::Feed;

/// Questions to the stream's leader in flight at once.
const IN_FLIGHT: usize = 64;

/// For each `(audience, routed)` (the last sequence of its subject the router accounts for), the
/// subject's last stored sequence where it is past `routed`; an error when the stream could not
/// say for some subject.
pub(crate) async fn stored_past(feed: &Feed, routed: Vec<(Audience, u64)>) -> Result<Vec<(Audience, u64)>, String> {
    // The first failure ends the check: every session will catch up instead.
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
    let body = serde_json::json!({ "last_by_subj": audience.push_subject() });
    let subject = format!("$JS.API.STREAM.MSG.GET.{STREAM}");
    let answer = feed.request(subject, Bytes::from(body.to_string())).await.map_err(|error| error.to_string())?;
    stored_seq(&answer)
}

/// The sequence of the message a `STREAM.MSG.GET` answer holds; none when it says 404 (no such
/// message).
pub(crate) fn stored_seq(answer: &[u8]) -> Result<Option<u64>, String> {
    let answer: serde_json::Value = serde_json::from_slice(answer).map_err(|error| error.to_string())?;
    if let Some(seq) = answer.pointer("/message/seq").and_then(serde_json::Value::as_u64) {
        return Ok(Some(seq));
    }
    match answer.pointer("/error/code").and_then(serde_json::Value::as_u64) {
        Some(404) => Ok(None),
        _ => Err(format!("message get answered {answer}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_get_answer_gives_the_sequence_or_none_or_an_error() {
        let found = br#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"push.all","seq":42,"time":"t"}}"#;
        assert_eq!(stored_seq(found), Ok(Some(42)));
        let none = br#"{"error":{"code":404,"err_code":10037,"description":"no message found"}}"#;
        assert_eq!(stored_seq(none), Ok(None));
        let unavailable = br#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(stored_seq(unavailable).is_err());
        assert!(stored_seq(b"not json").is_err());
    }
}
