//! The durable trigger: business events captured by the events stream, consumed through one
//! shared durable pull consumer per function (so copies share the work), at least once. A success
//! is acknowledged; a failure is handed back with a growing delay; after the last attempt (or at
//! once for a permanent failure) a dead letter goes to `herald.dlq.<function>` and the event is
//! terminated.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, Message};
use futures::{FutureExt, StreamExt};
use herald_shared::functions::DeadLetter;
use herald_shared::id::kv_key;
use herald_shared::payload::{data_value, to_base64};
use herald_shared::subject::{dead_letter, header};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use crate::config::Config;
use crate::error::HandlerError;
use crate::events::{Event, EventHandler};
use crate::retry::{Backoff, Decision, RetryPolicy};
use crate::worker::Worker;

/// Pauses between attempts to recreate a consumer that failed.
const RECOVERY: Backoff = Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(5) };
/// How long a pull request waits for events before the next one asks again (which also finds a
/// consumer or a connection that was lost meanwhile).
const PULL_EXPIRY: Duration = Duration::from_secs(5);

/// One durable function's consumer and policies.
pub(crate) struct Durable {
    js: jetstream::Context,
    function: String,
    stream: String,
    durable_name: String,
    subjects: Vec<String>,
    handler: Arc<dyn EventHandler>,
    policy: RetryPolicy,
    ack_wait: Duration,
    /// Events this process began to end without a delivery ([`crate::unreadable`]), each with how
    /// far it got, until the consumer's acknowledgement floor passes them.
    ended: std::sync::Mutex<Ended>,
}

/// What [`Durable::ended`] holds: per consumer (its creation time), since a new one starts over.
#[derive(Default)]
struct Ended {
    consumer_created: Option<time::OffsetDateTime>,
    events: std::collections::BTreeMap<u64, Ending>,
}

/// How far this process got in ending an event without a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Not begun: dead-letter it, then `+TERM` it.
    New,
    /// Its letter was sent without an answer (it may be stored): sent again, a duplicate is this
    /// process's own, so it still counts as a new letter.
    Tried,
    /// Dead-lettered; its `+TERM` is still to be taken.
    Lettered,
    /// Done: it waits in the consumer's window for the events before it.
    Done,
}

impl Durable {
    pub(crate) fn new(
        js: jetstream::Context,
        config: &Config,
        function: &str,
        subjects: Vec<String>,
        handler: Arc<dyn EventHandler>,
    ) -> Durable {
        Durable {
            js,
            function: function.to_string(),
            stream: config.events_stream.clone(),
            durable_name: durable_name(function),
            subjects,
            handler,
            policy: config.retry_policy(),
            ack_wait: config.ack_wait.max(Duration::from_millis(100)),
            ended: std::sync::Mutex::default(),
        }
    }

    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn stream(&self) -> &str {
        &self.stream
    }

    pub(crate) fn durable_name(&self) -> &str {
        &self.durable_name
    }

    pub(crate) fn function(&self) -> &str {
        &self.function
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, Ended> {
        self.ended.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How far ending stored event `seq` without a delivery got, for the consumer made at `created`
    /// (a consumer made again starts over: what was ended for the old one is not for it).
    pub(crate) fn ending(&self, seq: u64, created: time::OffsetDateTime) -> Ending {
        let mut ended = self.ended();
        if ended.consumer_created != Some(created) {
            *ended = Ended { consumer_created: Some(created), events: Default::default() };
        }
        ended.events.get(&seq).copied().unwrap_or(Ending::New)
    }

    /// Notes how far ending `seq` got.
    pub(crate) fn ended_to(&self, seq: u64, ending: Ending) {
        self.ended().events.insert(seq, ending);
    }

    /// Forgets the ended events below `floor`: the consumer is past them.
    pub(crate) fn forget_ended_below(&self, floor: u64) {
        let mut ended = self.ended();
        ended.events = ended.events.split_off(&floor);
    }

    /// The subjects the consumer takes.
    pub(crate) fn subjects(&self) -> &[String] {
        &self.subjects
    }

    /// Ends stored event `seq`'s deliveries to this consumer (`+TERM` on its acknowledgement subject,
    /// which the server reads by stream sequence), without a delivery in hand: one the client could
    /// not take.
    pub(crate) async fn terminate(&self, seq: u64, within: Duration) -> Result<(), String> {
        let subject = format!("$JS.ACK.{}.{}.1.{seq}.1.0.0", self.stream, self.durable_name);
        // Asked as a request: the server answers once it has taken the acknowledgement.
        let client = self.js.client();
        match tokio::time::timeout(within, client.request(subject, "+TERM".into())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("+TERM of {seq}: {error}")),
            Err(_) => Err(format!("+TERM of {seq}: no answer")),
        }
    }

    /// Dead-letters stored event `seq`, which no handler saw (its attempts are 0), over `js`;
    /// whether the letter was new (not one the dead-letter stream had within its duplicate window).
    pub(crate) async fn dead_letter_unhandled(
        &self,
        js: &jetstream::Context,
        subject: &str,
        seq: u64,
        payload: &[u8],
        error: &str,
    ) -> Result<bool, String> {
        let event = Event {
            function: self.function.clone(),
            subject: subject.to_string(),
            payload: payload.to_vec().into(),
            headers: HeaderMap::new(),
            id: format!("{}-{seq}", self.stream),
            attempt: 0,
            stream_sequence: Some(seq),
        };
        publish_dead_letter(js, self, &event, error).await
    }

    /// Creates the shared consumer, or finds it with this configuration.
    pub(crate) async fn consumer(&self) -> Result<PullConsumer, String> {
        let config = pull::Config {
            durable_name: Some(self.durable_name.clone()),
            description: Some("Herald push function".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Attempts are counted here, not by the server, so a dead letter is always written.
            max_deliver: -1,
            filter_subjects: self.subjects.clone(),
            ..Default::default()
        };
        self.warn_of_another_filter().await;
        self.js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| format!("consumer {} on stream {}: {e}", self.durable_name, self.stream))
    }

    /// Warns when the shared consumer exists with other subjects: every copy moves it to its own,
    /// and the events of subjects another copy wanted are skipped from then on.
    async fn warn_of_another_filter(&self) {
        let Ok(stream) = self.js.get_stream(&self.stream).await else { return };
        let Ok(info) = stream.consumer_info(&self.durable_name).await else { return };
        let existing = &info.config.filter_subjects;
        let existing = if existing.is_empty() && !info.config.filter_subject.is_empty() {
            vec![info.config.filter_subject.clone()]
        } else {
            existing.clone()
        };
        if existing != self.subjects {
            warn!(
                consumer = %self.durable_name,
                from = ?existing,
                to = ?self.subjects,
                "the consumer every copy shares changes its subjects: copies with the old ones skip events; run every copy with the same"
            );
        }
    }
}

/// The durable consumer name of `function` (consumer names cannot hold `.`).
pub fn durable_name(function: &str) -> String {
    format!("herald-fn-{}", kv_key(function))
}

/// Consumes events until shutdown, recreating the consumer when it goes away.
pub(crate) async fn serve(durable: Arc<Durable>, consumer: PullConsumer, worker: Arc<Worker>) {
    let mut consumer = Some(consumer);
    let mut failures = 0;
    while !worker.shutdown().is_cancelled() {
        let current = match consumer.take() {
            Some(current) => Ok(current),
            None => durable.consumer().await,
        };
        let ended = match current {
            Ok(current) => consume(&durable, &current, &worker).await,
            Err(error) => Err(error),
        };
        match ended {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                warn!(function = worker.name(), %error, "event consumer failed; recreating it");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECOVERY.delay(failures)) => {}
            _ = worker.shutdown().cancelled() => {}
        }
    }
}

/// Pulls events while holding a permit for each; `Ok` when shutdown stopped it.
///
/// Each pull asks for as many events as can start now, no more: an event pulled but waiting for a
/// permit would run out its `ack_wait` before its handler's first `+WPI`, and another copy would
/// run it too.
async fn consume(durable: &Arc<Durable>, consumer: &PullConsumer, worker: &Arc<Worker>) -> Result<(), String> {
    loop {
        let Some(mut permits) = worker.free_permits().await else {
            return Ok(());
        };
        let mut batch = consumer
            .batch()
            .max_messages(permits.num_permits())
            .expires(PULL_EXPIRY)
            .messages()
            .await
            .map_err(|e| format!("pull: {e}"))?;
        loop {
            let next = tokio::select! {
                next = batch.next() => next,
                _ = worker.shutdown().cancelled() => {
                    hand_back_unstarted(&durable.js, batch, worker).await;
                    return Ok(());
                }
            };
            match next {
                Some(Ok(message)) => {
                    let permit = permits.split(1).expect("a permit for each event a pull asks for");
                    spawn_handle(durable.clone(), worker.clone(), message, permit);
                }
                // A status that ends the pull: the consumer is recreated if it is gone, else (a
                // leader change, too many pulls waiting) the next pull asks again, after a pause.
                Some(Err(error)) => {
                    if let Err(gone) = consumer.get_info().await {
                        return Err(format!("pull: {error}; consumer: {gone}"));
                    }
                    debug!(function = worker.name(), %error, "pull ended by the server; pulling again");
                    tokio::select! {
                        _ = tokio::time::sleep(RECOVERY.initial) => {}
                        _ = worker.shutdown().cancelled() => {}
                    }
                    break;
                }
                // All the events it asked for came, or it expired.
                None => break,
            }
        }
    }
}

/// At shutdown: hands the events that were pulled but not started back to the server at once
/// (`-NAK` without delay), so another copy takes them now rather than after `ack_wait`.
///
/// The pull subscription ends first (a round trip collects what was already on its way to this
/// copy), so the server cannot deliver a handed-back event to this copy again. An event still on
/// its way after that comes back after `ack_wait`, as from a crashed copy.
async fn hand_back_unstarted(js: &jetstream::Context, mut messages: pull::Batch, worker: &Worker) {
    if let Err(error) = js.client().flush().await {
        debug!(function = worker.name(), %error, "cannot flush before handing events back");
    }
    let mut unstarted = Vec::new();
    while let Some(Some(next)) = messages.next().now_or_never() {
        if let Ok(message) = next {
            unstarted.push(message);
        }
    }
    // Unsubscribes (queued before the NAKs on the same connection): no delivery to us any more.
    drop(messages);
    for message in unstarted {
        if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
            debug!(function = worker.name(), %error, "cannot hand an event back");
        }
    }
}

fn spawn_handle(durable: Arc<Durable>, worker: Arc<Worker>, message: Message, permit: OwnedSemaphorePermit) {
    let spawner = worker.clone();
    spawner.spawn(async move {
        handle(&durable, &worker, message).await;
        drop(permit);
    });
}

/// Runs the handler on one delivery and settles it.
async fn handle(durable: &Durable, worker: &Worker, message: Message) {
    let Some(event) = event_of(worker.name(), &message) else {
        // Without its metadata the event has no id or attempt count: it could never be handled
        // or dead-lettered, only delivered again and again.
        warn!(function = worker.name(), subject = %message.subject, "a delivery without JetStream metadata; terminated");
        if let Err(error) = message.ack_with(AckKind::Term).await {
            debug!(function = worker.name(), %error, "cannot terminate the delivery");
        }
        return;
    };
    let (id, attempt) = (event.id.clone(), event.attempt);
    let run = worker.call(&id, durable.handler.handle(event.clone()));
    let outcome = with_progress(run, &message, durable.ack_wait / 2).await;
    let decision = durable.policy.decide(outcome.as_ref().map(|_| ()), attempt);
    settle(durable, worker, &message, &event, decision, outcome.err()).await;
}

/// The event of a delivery; `None` when it lacks JetStream metadata.
fn event_of(function: &str, message: &Message) -> Option<Event> {
    let info = message.info().ok()?;
    Some(Event {
        function: function.to_string(),
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        headers: message.headers.clone().unwrap_or_default(),
        id: format!("{}-{}", info.stream, info.stream_sequence),
        attempt: info.delivered.max(1) as u64,
        stream_sequence: Some(info.stream_sequence),
    })
}

/// Awaits `run`, telling the server every `every` that the event is still being worked on, so a
/// long call is not delivered again meanwhile.
async fn with_progress<T>(run: impl Future<Output = T>, message: &Message, every: Duration) -> T {
    let every = every.max(Duration::from_millis(50));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => return out,
            _ = ticks.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    debug!(%error, "cannot report progress");
                }
            }
        }
    }
}

async fn settle(
    durable: &Durable,
    worker: &Worker,
    message: &Message,
    event: &Event,
    decision: Decision,
    error: Option<HandlerError>,
) {
    let metrics = worker.metrics();
    let acked = match decision {
        Decision::Ack => message.ack().await,
        Decision::Retry(delay) => {
            metrics.retries.get_or_create(worker.label()).inc();
            message.ack_with(AckKind::Nak(Some(delay))).await
        }
        Decision::DeadLetter => {
            let error = error.map(|e| e.message().to_string()).unwrap_or_default();
            match publish_dead_letter(&durable.js, durable, event, &error).await {
                Ok(_) => {
                    metrics.dead_letters.get_or_create(worker.label()).inc();
                    warn!(function = worker.name(), msg_id = %event.id, %error, "event dead-lettered");
                    message.ack_with(AckKind::Term).await
                }
                Err(publish_error) => {
                    warn!(function = worker.name(), msg_id = %event.id, %publish_error, "cannot dead-letter; retrying");
                    let delay = durable.policy.backoff.delay(event.attempt);
                    message.ack_with(AckKind::Nak(Some(delay))).await
                }
            }
        }
    };
    if let Err(error) = acked {
        debug!(function = worker.name(), msg_id = %event.id, %error, "cannot settle the event");
    }
}

/// Stores the dead letter before the event is dropped: with JetStream, deduplicated per function
/// and event (`<function>:<stream>-<seq>`), so a retried dead-lettering stores one letter.
async fn publish_dead_letter(
    js: &jetstream::Context,
    durable: &Durable,
    event: &Event,
    error: &str,
) -> Result<bool, String> {
    let mut letter = dead_letter_of(durable, event, error);
    let mut body = serde_json::to_vec(&letter).map_err(|e| e.to_string())?;
    // The payload is there twice (`data` to read, `payload` to re-drive): a large event's letter
    // over what NATS takes keeps `payload` alone, or it could never be written and its event would
    // be retried for ever.
    if body.len() + LETTER_HEADERS > js.client().server_info().max_payload {
        letter.data = serde_json::Value::Null;
        body = serde_json::to_vec(&letter).map_err(|e| e.to_string())?;
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::NATS_MSG_ID, format!("{}:{}", event.function, event.id).as_str());
    js.publish_with_headers(dead_letter(&event.function), headers, body.into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
        .map(|ack| !ack.duplicate)
}

/// Room for a dead letter's headers in what NATS takes of a message.
const LETTER_HEADERS: usize = 512;

fn dead_letter_of(durable: &Durable, event: &Event, error: &str) -> DeadLetter {
    DeadLetter {
        function: event.function.clone(),
        subject: event.subject.clone(),
        stream: durable.stream.clone(),
        seq: event.stream_sequence.unwrap_or_default(),
        attempts: event.attempt,
        error: error.to_string(),
        data: data_value(&event.payload),
        payload: Some(to_base64(&event.payload)),
        ts: OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_names_hold_no_dots() {
        assert_eq!(durable_name("notify"), "herald-fn-notify");
        assert_eq!(durable_name("orders.shipped"), "herald-fn-orders=2Eshipped");
    }
}
