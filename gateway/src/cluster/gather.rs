//! Scatter-gather over NATS: one request, answered by every gateway, collected for a short window.
//! The number of gateways is not known in advance, so the window (not a count) ends the gathering.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::Shared;

/// Publishes `body` to `subject` and returns every reply that arrives within `window`.
pub(crate) async fn gather(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    window: Duration,
) -> Result<Vec<async_nats::Message>, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply(subject.to_string(), inbox, body).await?;
    let deadline = tokio::time::Instant::now() + window;
    let mut answers = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
        answers.push(reply);
    }
    Ok(answers)
}

/// [`gather`] of a question every gateway answers with its `node`, this one included: without its
/// own answer, NATS did not route the question in time (a server that hangs), which is not "no
/// one is there".
pub(crate) async fn gather_gateways(
    shared: &Shared,
    subject: &str,
    body: Bytes,
) -> Result<Vec<async_nats::Message>, async_nats::Error> {
    let (window, node) = (shared.config.gather_window, &shared.config.node_id);
    let answers = gather(&shared.client, subject, body, window).await?;
    let answered_by = |answer: &async_nats::Message| {
        serde_json::from_slice::<Answerer>(&answer.payload).is_ok_and(|answerer| answerer.node == *node)
    };
    if !answers.iter().any(answered_by) {
        return Err(format!("NATS did not route the question within {window:?} (no answer from this gateway)").into());
    }
    Ok(answers)
}

/// Who answered a question.
#[derive(serde::Deserialize)]
struct Answerer {
    node: String,
}
