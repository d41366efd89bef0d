//! The NATS micro service a runtime registers, so standard tooling (`nats micro ls`, `info`,
//! `stats`) sees every function it runs, whatever its trigger.
//!
//! - The service's metadata lists each function under `fn.<name>`, with its trigger as JSON:
//!   `{"trigger":"rpc","subject":"herald.fn.prefs.get"}`,
//!   `{"trigger":"durable","subjects":["events.notify.>"],"stream":"HERALD_EVENTS","consumer":"herald-fn-notify"}`,
//!   `{"trigger":"lifecycle","subjects":["herald.events.connect","herald.events.disconnect"],"queue_group":"herald-functions.audit"}`.
//! - rpc functions are its endpoints (they answer requests). The micro-service API keeps
//!   statistics per endpoint only, so durable and lifecycle functions, which answer no requests,
//!   are listed in the metadata but have no statistics there; every function's counters are on
//!   `/metrics`.
//! - Each endpoint's statistics carry the function's Herald counters as `data`:
//!   `{"function":"prefs.get","calls":3,"errors":0,"retries":0,"dead_letters":0,"in_flight":0}`.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::service::{Service, ServiceExt};
use herald_shared::subject;
use serde_json::{Value, json};

use crate::config::Config;
use crate::durable::durable_name;
use crate::events::LIFECYCLE_SUBJECTS;
use crate::function::{Function, Trigger};
use crate::metrics::Metrics;
use crate::runtime::StartError;

/// The metadata key listing function `name`.
pub fn metadata_key(name: &str) -> String {
    format!("fn.{name}")
}

/// Registers the micro service of `functions`, before any of them starts.
pub(crate) async fn register(
    client: &async_nats::Client,
    config: &Config,
    functions: &[Function],
    metrics: Arc<Metrics>,
) -> Result<Service, StartError> {
    let metadata = functions.iter().map(|f| (metadata_key(&f.name), describe(f, config).to_string())).collect();
    // Endpoints are registered under their subject; the statistics name the function.
    let rpc_functions: HashMap<String, String> = functions
        .iter()
        .filter(|f| matches!(f.trigger, Trigger::Rpc(_)))
        .map(|f| (subject::function(&f.name), f.name.clone()))
        .collect();
    client
        .service_builder()
        .description("Herald push functions")
        .queue_group(&config.queue_group)
        .metadata(metadata)
        .stats_handler(move |endpoint, _| match rpc_functions.get(&endpoint) {
            Some(function) => counters(&metrics, function),
            None => Value::Null,
        })
        .start(&config.service_name, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| StartError::Nats(format!("micro service {}: {e}", config.service_name)))
}

/// What triggers `function`, as listed in the metadata.
fn describe(function: &Function, config: &Config) -> Value {
    match &function.trigger {
        Trigger::Rpc(_) => json!({"trigger": "rpc", "subject": subject::function(&function.name)}),
        Trigger::Durable { subjects, .. } => json!({
            "trigger": "durable",
            "subjects": subjects,
            "stream": config.events_stream,
            "consumer": durable_name(&function.name),
        }),
        Trigger::Lifecycle(_) => json!({
            "trigger": "lifecycle",
            "subjects": LIFECYCLE_SUBJECTS,
            "queue_group": format!("{}.{}", config.queue_group, function.name),
        }),
    }
}

/// The Herald counters of `function`.
fn counters(metrics: &Metrics, function: &str) -> Value {
    let label = metrics.label(function);
    json!({
        "function": function,
        "calls": metrics.calls.get_or_create(&label).get(),
        "errors": metrics.errors.get_or_create(&label).get(),
        "retries": metrics.retries.get_or_create(&label).get(),
        "dead_letters": metrics.dead_letters.get_or_create(&label).get(),
        "in_flight": metrics.in_flight.get_or_create(&label).get(),
    })
}
