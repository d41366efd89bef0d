//! Push-function runtimes running in-process against a test NATS, and ways to look at what they did:
//! rpc calls with caller headers, stored pushes, dead letters, durable consumer progress, metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use futures::TryStreamExt;
use herald_functions::{Config, Function, Runtime};
use herald_shared::functions::DeadLetter;
use herald_shared::subject::{STREAM, header};

use crate::{TestNats, eventually};

/// How long a test waits for a condition of a functions test.
pub const WAIT: Duration = Duration::from_secs(30);

/// The configuration test runtimes start from: metrics on an ephemeral port, quick retries.
pub fn test_config(nats: &TestNats) -> Config {
    let mut config = Config::default();
    config.nats.nats_url = nats.url();
    config.nats.nats_user = Some(crate::nats::Role::Functions.user().to_string());
    config.nats.nats_password = Some(crate::nats::Role::Functions.password());
    config.metrics_listen = "127.0.0.1:0".parse().unwrap();
    config.retry_initial = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(100);
    config.shutdown_grace = Duration::from_secs(5);
    // Every gateway answers within the window in these tests: four times the default, so that a
    // loaded machine does not make one late.
    config.presence_window = Duration::from_secs(1);
    config
}

/// A runtime of `functions` on a connection of its own, as the `functions` user.
pub async fn start(nats: &TestNats, config: &Config, functions: Vec<Function>) -> Runtime {
    start_at(&nats.url(), config, functions).await
}

/// A runtime of `functions` connected to NATS at `url` (a proxy in front of a test NATS).
pub async fn start_at(url: &str, config: &Config, functions: Vec<Function>) -> Runtime {
    crate::gateway::init_logs();
    let client = async_nats::ConnectOptions::with_user_and_password(
        crate::nats::Role::Functions.user().into(),
        crate::nats::Role::Functions.password(),
    )
    .custom_inbox_prefix(&config.nats.nats_inbox_prefix)
    .connect(url)
    .await
    .expect("connect as functions");
    Runtime::start(client, config, functions).await.expect("functions start")
}

/// The built-in functions `config` enables, as the binary runs them.
pub async fn start_builtins(config: &Config) -> Runtime {
    herald_functions::start(config).await.expect("built-in functions start")
}

/// The answer to an rpc call.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcAnswer {
    /// The reply body as JSON (`Null` when empty or not JSON).
    pub body: serde_json::Value,
    /// `Herald-Error`, when the function failed.
    pub error: Option<String>,
}

/// Calls function `name` as the gateway would for `user` (device `phone`, connection `c-1`).
pub async fn call(client: &async_nats::Client, name: &str, user: Option<&str>, body: serde_json::Value) -> RpcAnswer {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(user) = user {
        headers.insert(header::HERALD_USER, user);
        headers.insert(header::HERALD_DEVICE, "phone");
        headers.insert(header::HERALD_CONN, "c-1");
    }
    let subject = herald_shared::subject::function(name);
    let reply = client.request_with_headers(subject, headers, body.to_string().into()).await.expect("a reply");
    let error = reply.headers.as_ref().and_then(|h| h.get(header::HERALD_ERROR)).map(|v| v.as_str().to_string());
    RpcAnswer { body: serde_json::from_slice(&reply.payload).unwrap_or(serde_json::Value::Null), error }
}

/// Messages stored per subject in stream `stream`, for subjects matching `filter`.
pub async fn stored_counts(js: &jetstream::Context, stream: &str, filter: &str) -> BTreeMap<String, usize> {
    let stream = js.get_stream(stream).await.expect("stream exists");
    stream.info_with_subjects(filter).await.expect("stream info").try_collect().await.expect("subjects")
}

/// The last push stored on `subject` in `HERALD`, once there is one.
pub async fn last_push(js: &jetstream::Context, subject: &str) -> StreamMessage {
    let stream = js.get_stream(STREAM).await.expect("HERALD exists");
    eventually(&format!("a push on {subject}"), WAIT, || async {
        stream.direct_get_last_for_subject(subject).await.ok()
    })
    .await
}

/// Waits until the durable consumer of `function` on `stream` has acknowledged (or terminated)
/// everything up to stream sequence `seq` and has nothing in flight.
pub async fn wait_settled(js: &jetstream::Context, stream: &str, function: &str, seq: u64) {
    let durable = herald_functions::durable::durable_name(function);
    let stream = js.get_stream(stream).await.expect("events stream exists");
    eventually(&format!("{durable} settled up to {seq}"), WAIT, || async {
        let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(&durable).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.ack_floor.stream_sequence >= seq && info.num_ack_pending == 0).then_some(())
    })
    .await;
}

/// The dead letters stored for `function`, once there are `count` of them.
pub async fn dead_letters(js: &jetstream::Context, config: &Config, function: &str, count: usize) -> Vec<DeadLetter> {
    let stream = js.get_stream(&config.dlq_stream).await.expect("DLQ stream exists");
    let subject = herald_shared::subject::dead_letter(function);
    eventually(&format!("{count} dead letters of {function}"), WAIT, || async {
        let mut letters = Vec::new();
        let mut seq = 1;
        while let Ok(message) = stream.direct_get_next_for_subject(&subject, Some(seq)).await {
            letters.push(serde_json::from_slice(&message.payload).expect("a dead letter"));
            seq = message.sequence + 1;
        }
        (letters.len() >= count).then_some(letters)
    })
    .await
}

/// The value of metric `name` (as exported, with its labels, e.g.
/// `herald_functions_calls_total{function="echo"}`) at `runtime`'s `/metrics`, 0 if absent.
pub async fn metric(runtime: &Runtime, name: &str) -> f64 {
    let url = format!("http://{}/metrics", runtime.metrics_addr());
    let text = reqwest::get(url).await.expect("GET /metrics").text().await.expect("metrics text");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Publishes a business event with JetStream and returns its stream sequence.
pub async fn publish_event(js: &jetstream::Context, subject: &str, body: impl Into<bytes::Bytes>) -> u64 {
    js.publish(subject.to_string(), body.into()).await.expect("publish").await.expect("stored").sequence
}
