//! `GET /v1/functions`: every running copy of the push functions, from the NATS micro-service API
//! (see docs/functions.md): the functions it runs with their triggers (`$SRV.INFO`: its metadata
//! lists every function, durable and lifecycle ones included) and its rpc endpoints' counters
//! (`$SRV.STATS`: the micro-service API counts requests, so only rpc functions have them there).

use serde_json::{Value, json};

use super::ApiError;
use crate::Shared;
use crate::cluster::gather::gather;

/// The questions every micro service answers.
const INFO: &str = "$SRV.INFO";
const STATS: &str = "$SRV.STATS";

pub(super) async fn functions(shared: &Shared) -> Result<Value, ApiError> {
    let (infos, stats) = tokio::join!(ask_every_service(shared, INFO), ask_every_service(shared, STATS));
    let (infos, mut stats) = (infos?, stats?);
    stats.sort_by(|a, b| (a["name"].as_str(), a["id"].as_str()).cmp(&(b["name"].as_str(), b["id"].as_str())));
    let services: Vec<Value> = stats
        .iter()
        .map(|stats| {
            let info = infos.iter().find(|info| info["id"] == stats["id"]).unwrap_or(&Value::Null);
            service(info, stats)
        })
        .collect();
    Ok(json!({ "services": services }))
}

/// The answers of every service to `question`, gathered for the gather window.
async fn ask_every_service(shared: &Shared, question: &str) -> Result<Vec<Value>, ApiError> {
    let answers = gather(&shared.client, question, bytes::Bytes::new(), shared.config.gather_window)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(answers.iter().filter_map(|answer| serde_json::from_slice::<Value>(&answer.payload).ok()).collect())
}

/// The functions a service's metadata lists (`fn.<name>` → its trigger as JSON), by name.
fn listed_functions(info: &Value) -> Vec<Value> {
    let mut functions: Vec<Value> = info["metadata"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(key, trigger)| {
            let name = key.strip_prefix("fn.")?;
            let mut trigger: Value = serde_json::from_str(trigger.as_str()?).ok()?;
            trigger["name"] = json!(name);
            Some(trigger)
        })
        .collect();
    functions.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    functions
}

/// One copy of a service: its name, id, version, start, functions, and each endpoint's counters.
fn service(info: &Value, stats: &Value) -> Value {
    let endpoints: Vec<Value> = stats["endpoints"]
        .as_array()
        .map(|endpoints| {
            endpoints
                .iter()
                .map(|e| {
                    json!({
                        "name": e["name"],
                        "subject": e["subject"],
                        "requests": e["num_requests"],
                        "errors": e["num_errors"],
                        "average_processing_ns": e["average_processing_time"],
                        "last_error": e["last_error"],
                        "data": e["data"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "name": stats["name"],
        "id": stats["id"],
        "version": stats["version"],
        "started": stats["started"],
        "functions": listed_functions(info),
        "endpoints": endpoints,
    })
}
