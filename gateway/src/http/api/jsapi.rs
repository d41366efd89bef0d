//! Requests to the JetStream API for the operators' endpoints, whose answers they mostly pass on.

use hyper::StatusCode;
use serde_json::Value;

use super::ApiError;
use crate::Shared;

/// JetStream's error code for "no message found" (a read past the last one).
pub(super) const NO_MESSAGE: u64 = 10037;
/// JetStream's error code for "stream not found".
pub(super) const NO_STREAM: u64 = 10059;

/// A JetStream error answer: its codes and description.
pub(super) struct JsError {
    pub(super) err_code: u64,
    description: String,
    code: u64,
}

impl From<JsError> for ApiError {
    fn from(error: JsError) -> ApiError {
        match error.code {
            404 => ApiError::new(StatusCode::NOT_FOUND, "not_found", error.description),
            // What was asked cannot be done: no retry helps, unlike with an outage.
            400 => ApiError::bad_request(error.description),
            _ => ApiError::unavailable(error.description),
        }
    }
}

/// Sends `body` to `$JS.API.<subject>`: the answer, or JetStream's error (`Err(Ok(..))`), or an
/// API error when NATS did not answer.
pub(super) async fn request(
    shared: &Shared,
    subject: String,
    body: &Value,
) -> Result<Result<Value, JsError>, ApiError> {
    let answer: Value = shared.js.request(subject, body).await.map_err(ApiError::unavailable)?;
    Ok(match answer.get("error") {
        Some(error) => Err(JsError {
            err_code: error["err_code"].as_u64().unwrap_or_default(),
            code: error["code"].as_u64().unwrap_or(500),
            description: error["description"].as_str().unwrap_or("JetStream error").to_string(),
        }),
        None => Ok(answer),
    })
}
