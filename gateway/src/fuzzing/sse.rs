//! The one thing an SSE client sends that the gateway reads besides `/ws`'s query: the
//! `Last-Event-ID` header of a reconnecting EventSource.

use hyper::StatusCode;
use hyper::header::HeaderValue;

use crate::http::sse::last_event_id;

/// Any header value: `last_event_id` never panics, accepts only a sequence number (digits, an
/// optional `+`, spaces around) and refuses anything else with 400.
pub fn sse_last_event_id(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    match last_event_id(&value) {
        Ok(seq) => {
            let text = std::str::from_utf8(data).expect("an accepted value is text").trim();
            let digits = text.strip_prefix('+').unwrap_or(text);
            assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()), "{text:?} accepted");
            assert_eq!(digits.trim_start_matches('0').parse::<u64>().unwrap_or(0), seq);
        }
        Err(refused) => assert_eq!((refused.status, refused.error), (StatusCode::BAD_REQUEST, "bad_request")),
    }
}
