//! `GET /v1/functions`: every running copy of the push functions, with their counters, from the NATS
//! micro-service API (`$SRV.STATS`; see docs/functions.md).

use serde_json::{Value, json};

use super::ApiError;
use crate::Shared;
use crate::cluster::gather::gather;

/// The micro-service statistics question every service answers.
const STATS: &str = "$SRV.STATS";

pub(super) async fn functions(shared: &Shared) -> Result<Value, ApiError> {
    let answers = gather(&shared.client, STATS, bytes::Bytes::new(), shared.config.gather_window)
        .await
        .map_err(ApiError::unavailable)?;
    let mut services: Vec<Value> =
        answers.iter().filter_map(|answer| serde_json::from_slice::<Value>(&answer.payload).ok()).collect();
    services.sort_by(|a, b| (a["name"].as_str(), a["id"].as_str()).cmp(&(b["name"].as_str(), b["id"].as_str())));
    let services: Vec<Value> = services.iter().map(service).collect();
    Ok(json!({ "services": services }))
}

/// One copy of a service: its name, id, version, start, and each endpoint's counters.
fn service(stats: &Value) -> Value {
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
        "endpoints": endpoints,
    })
}
