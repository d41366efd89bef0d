//! Scatter-gather over NATS: one request, answered by every gateway, collected for a short window.
//! The number of gateways is not known in advance, so the window (not a count) ends the gathering.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::Shared;

/// How long a gateway waits past the window for its own answer to its question (a busy gateway
/// answers late) before it takes the question for one NATS did not route.
const OWN_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Publishes `body` to `subject` and returns every reply that arrives within `window`.
pub(crate) async fn gather(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    window: Duration,
) -> Result<Vec<async_nats::Message>, async_nats::Error> {
    Ok(collect(client, subject, body, window, None).await?.0)
}

/// Every reply to `body` on `subject` that arrives within `window`, and after it, if one is
/// `awaited`, until it came (up to [`OWN_ANSWER_WAIT`]); whether it did.
async fn collect(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    window: Duration,
    awaited: Option<&(dyn Fn(&async_nats::Message) -> bool + Sync)>,
) -> Result<(Vec<async_nats::Message>, bool), async_nats::Error> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply(subject.to_string(), inbox, body).await?;
    let started = tokio::time::Instant::now();
    let (mut answers, mut came) = (Vec::new(), awaited.is_none());
    loop {
        let deadline = if came { started + window } else { started + window.max(OWN_ANSWER_WAIT) };
        let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await else { break };
        came |= awaited.is_some_and(|awaited| awaited(&reply));
        answers.push(reply);
    }
    Ok((answers, came))
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
    let own = |answer: &async_nats::Message| {
        serde_json::from_slice::<Answerer>(&answer.payload).is_ok_and(|answerer| answerer.node == *node)
    };
    let (answers, answered) = collect(&shared.client, subject, body, window, Some(&own)).await?;
    if !answered {
        let waited = window.max(OWN_ANSWER_WAIT);
        return Err(format!("NATS did not route the question within {waited:?} (no answer from this gateway)").into());
    }
    Ok(answers)
}

/// Who answered a question.
#[derive(serde::Deserialize)]
struct Answerer {
    node: String,
}
