//! Client frames: `ping`, `ack` and refusals are answered at once, `sub` / `unsub` run in order
//! (reading waits meanwhile), `rpc` calls run in tasks of their own.

use std::sync::Arc;
use std::time::Instant;

use herald_shared::frame::{ClientFrame, RpcError, RpcResult, ServerFrame, close_code, error_code};
use herald_shared::id::check_function_name;
use herald_shared::payload::data_value;
use herald_shared::subject::{self, header};

use super::{Session, TopicRequest};
use crate::delivery::outbox::Close;
use crate::http::metrics::RpcLabels;
use crate::http::ratelimit::TokenBucket;
use crate::websocket::frame;
use crate::websocket::reader::Inbound;

/// Handles one client message; an error is how the connection closes.
pub(super) async fn handle(
    session: &Arc<Session>,
    inbound: Inbound,
    rpc_budget: &mut TokenBucket,
) -> Result<(), Close> {
    match inbound {
        Inbound::Ping(payload) => session.outbox().push_control(frame::pong(&payload)),
        Inbound::Pong => {}
        // The reader let through only codes a peer may send: echo it (RFC 6455 §5.5.1).
        Inbound::Close(code) => return Err(Close::new(code.unwrap_or(close_code::NORMAL), "")),
        Inbound::Text(text) => {
            if let Some(request) = handle_text(session, &text, rpc_budget)? {
                Box::pin(super::join::topic_request(session, request)).await?;
            }
        }
    }
    Ok(())
}

/// Answers a text frame, or returns the topic request it asks for.
fn handle_text(
    session: &Arc<Session>,
    text: &[u8],
    rpc_budget: &mut TokenBucket,
) -> Result<Option<TopicRequest>, Close> {
    let frame = match serde_json::from_slice::<ClientFrame>(text) {
        Ok(frame) => frame,
        Err(error) => return refuse_frame(session, text, error).map(|()| None),
    };
    match frame {
        ClientFrame::Ping => session.send(&ServerFrame::Pong),
        ClientFrame::Ack { seq } => {
            // A client cannot acknowledge what it was not sent.
            let seq = seq.min(session.outbox().last_seq());
            session.shared.cursors.ack(&session.user, &session.device, seq);
        }
        ClientFrame::Sub { topic, since } => return Ok(Some(TopicRequest::Subscribe { topic, since })),
        ClientFrame::Unsub { topic } => return Ok(Some(TopicRequest::Unsubscribe { topic })),
        ClientFrame::Rpc { id, function, data } => {
            if rpc_budget.try_take(Instant::now()) {
                tokio::spawn(call(session.clone(), id, function, data));
            } else {
                send_rpc_error(session, id, error_code::RATE_LIMITED, "too many rpc calls");
            }
        }
    }
    Ok(None)
}

/// A text message that is not a valid client frame: an `error` frame when it is a JSON object with a
/// `type` (so newer clients survive older gateways), a 1008 close when it cannot be parsed at all.
fn refuse_frame(session: &Session, text: &[u8], error: serde_json::Error) -> Result<(), Close> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: String,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(text) else {
        return Err(Close::new(close_code::POLICY, "not a JSON frame with a type"));
    };
    const KNOWN: [&str; 5] = ["ack", "sub", "unsub", "rpc", "ping"];
    if KNOWN.contains(&probe.kind.as_str()) {
        session.send(&ServerFrame::error(error_code::BAD_REQUEST, format!("bad {} frame: {error}", probe.kind)));
    } else {
        session.send(&ServerFrame::error(error_code::UNKNOWN_TYPE, format!("unknown frame type {:?}", probe.kind)));
    }
    Ok(())
}

/// Calls push function `function` for the client and sends the `rpc_result`. The caller's identity
/// travels in headers taken from the connection, never from the frame.
async fn call(session: Arc<Session>, id: String, function: String, data: serde_json::Value) {
    if let Err(e) = check_function_name(&function) {
        return send_rpc_error(&session, id, error_code::BAD_REQUEST, &e.to_string());
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(header::HERALD_USER, &*session.user);
    headers.insert(header::HERALD_DEVICE, session.device.as_str());
    headers.insert(header::HERALD_CONN, session.conn.as_str());
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(serde_json::to_vec(&data).unwrap_or_default().into())
        .timeout(Some(session.shared.config.rpc_timeout));
    let outcome = session.shared.client.send_request(subject::function(&function), request).await;
    let (result, label) = match outcome {
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
    };
    // Unknown names get one shared label: clients choose names, metrics must stay bounded.
    let function_label = if label == "no_function" { "(none)".to_string() } else { function };
    session
        .shared
        .metrics
        .rpc_calls
        .get_or_create(&RpcLabels { function: function_label, outcome: label.into() })
        .inc();
    match result {
        Ok(data) => session.send(&ServerFrame::RpcResult(RpcResult { id, ok: true, data: Some(data), error: None })),
        Err((code, message)) => send_rpc_error(&session, id, code, &message),
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

fn send_rpc_error(session: &Session, id: String, code: &str, message: &str) {
    let error = RpcError { code: code.to_string(), message: message.to_string() };
    session.send(&ServerFrame::RpcResult(RpcResult { id, ok: false, data: None, error: Some(error) }));
}
