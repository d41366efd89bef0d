//! Scatter-gather over NATS: one request, answered by every gateway, collected for a short window.
//! The number of gateways is not known in advance, so the window (not a count) ends the gathering.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

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
