//! A client's `rpc`: a NATS request to the push function, answered through the session's mailbox.
//! The caller's identity travels in headers taken from the connection, never from the request.

use std::sync::Arc;

use herald_shared::frame::{RpcError, RpcResult, ServerFrame, error_code};
use herald_shared::id::check_function_name;
use herald_shared::payload::data_value;
use herald_shared::subject::{self, header};

use super::Session;
use crate::delivery::mailbox::Event;
use crate::http::metrics::RpcLabels;

/// Calls push function `function` for the client and hands the session the `rpc_result`.
pub(super) async fn call(session: Arc<Session>, id: String, function: String, data: serde_json::Value) {
    let answer = match check_function_name(&function) {
        Err(error) => failure(id, error_code::BAD_REQUEST, &error.to_string()),
        Ok(()) => request(&session, id, function, data).await,
    };
    session.mailbox.push_event(Event::Notice(answer));
}

async fn request(session: &Session, id: String, function: String, data: serde_json::Value) -> ServerFrame {
    let shared = &session.shared;
    let payload = serde_json::to_vec(&data).unwrap_or_default();
    let refused = refusal(shared, payload.len());
    let was_refused = refused.is_some();
    let (result, label) = match refused {
        Some(refused) => refused,
        None => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(header::HERALD_USER, &*session.user);
            headers.insert(header::HERALD_DEVICE, session.device.as_str());
            headers.insert(header::HERALD_CONN, session.conn.as_str());
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(payload.into())
                .timeout(Some(shared.config.rpc_timeout));
            let outcome = shared.client.send_request(subject::function(&function), request).await;
            answer_of(&function, outcome)
        }
    };
    // Unknown names get one shared label, refusals before asking another: clients choose names,
    // metrics must stay bounded.
    let function_label = match label {
        "no_function" => "(none)".to_string(),
        _ if was_refused => "(any)".to_string(),
        _ => function,
    };
    shared.metrics.rpc_calls.get_or_create(&RpcLabels { function: function_label, outcome: label.into() }).inc();
    match result {
        Ok(data) => ServerFrame::RpcResult(RpcResult { id, ok: true, data: Some(data), error: None }),
        Err((code, message)) => failure(id, code, &message),
    }
}

/// An outcome and its metric label.
type Answer = (Result<serde_json::Value, (&'static str, String)>, &'static str);

/// Why a request of `payload_bytes` is not sent, if it is not: NATS is away (asked now, it would
/// wait out the timeout and say `timeout`), or the request is over what NATS takes (it never could).
fn refusal(shared: &crate::Shared, payload_bytes: usize) -> Option<Answer> {
    if !shared.health.control_connected() {
        return Some((Err((error_code::UNAVAILABLE, "not connected to NATS".into())), "unavailable"));
    }
    let max = shared.client.server_info().max_payload;
    // Room for the caller's headers (user, device and connection ids: 128 bytes each at most).
    (payload_bytes + RPC_HEADER_BYTES > max).then(|| {
        let message = format!("the request is over what NATS takes ({max} bytes)");
        (Err((error_code::BAD_REQUEST, message)), "bad_request")
    })
}

/// Room for an rpc request's headers in what NATS takes of a message.
const RPC_HEADER_BYTES: usize = 512;

fn answer_of(function: &str, outcome: Result<async_nats::Message, async_nats::RequestError>) -> Answer {
    match outcome {
        Ok(reply) => match function_error(&reply) {
            Some(message) => (Err((error_code::FUNCTION_ERROR, message)), "function_error"),
            None => (Ok(data_value(&reply.payload)), "ok"),
        },
        Err(e) => match e.kind() {
            async_nats::client::RequestErrorKind::NoResponders => {
                (Err((error_code::NO_FUNCTION, format!("no function answers {function}"))), "no_function")
            }
            async_nats::client::RequestErrorKind::TimedOut => {
                (Err((error_code::TIMEOUT, format!("{function} did not answer in time"))), "timeout")
            }
            _ => (Err((error_code::UNAVAILABLE, e.to_string())), "unavailable"),
        },
    }
}

/// The error a function reported in its reply's headers, if any.
fn function_error(reply: &async_nats::Message) -> Option<String> {
    let headers = reply.headers.as_ref()?;
    headers
        .get(header::HERALD_ERROR)
        .or_else(|| headers.get(herald_shared::functions::header::NATS_SERVICE_ERROR))
        .map(|value| value.as_str().to_string())
}

/// A failed `rpc_result`.
pub(super) fn failure(id: String, code: &str, message: &str) -> ServerFrame {
    let error = RpcError { code: code.to_string(), message: message.to_string() };
    ServerFrame::RpcResult(RpcResult { id, ok: false, data: None, error: Some(error) })
}
