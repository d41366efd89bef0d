//! Plain HTTP to the processes under test: a gateway's `/readyz`, a NATS node's `/healthz` and
//! `/connz`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Whether `GET path` on `addr` answers 200 within a few seconds.
pub async fn is_ok(addr: SocketAddr, path: &str) -> bool {
    get(addr, path).await.is_some_and(|response| response.status().is_success())
}

/// The JSON body of `GET path` on `addr`, if it answered 200 with JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let response = get(addr, path).await.filter(|response| response.status().is_success())?;
    tokio::time::timeout(TIMEOUT, response.json()).await.ok()?.ok()
}

async fn get(addr: SocketAddr, path: &str) -> Option<reqwest::Response> {
    let request = reqwest::Client::new().get(format!("http://{addr}{path}")).timeout(TIMEOUT);
    request.send().await.ok()
}
