//! `relay`: business events POSTed to an HTTP endpoint, at least once.
//!
//! The body is the event's payload; `Content-Type` is `application/json` when it is valid JSON
//! and `application/octet-stream` otherwise; `Herald-Subject` names the event's subject, and the
//! idempotency header (default `Idempotency-Key`) holds `<stream>-<seq>`, the same on every
//! attempt, so the endpoint can drop repeats. A 2xx is a success; a connection error, a timeout,
//! 408, 429 or 5xx is retried with backoff; any other status is dead-lettered at once.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::config::Config;
use crate::error::HandlerError;
use crate::events::Event;
use crate::function::Function;
use crate::runtime::StartError;

/// The header naming the event's subject.
pub const SUBJECT_HEADER: &str = "Herald-Subject";

/// Where and how events are POSTed.
struct Relay {
    http: reqwest::Client,
    url: Url,
    headers: HeaderMap,
    idempotency: HeaderName,
    /// How long a POST may take (`relay_timeout`), named when one took longer.
    timeout: std::time::Duration,
}

/// The `relay` function; fails when the URL or a header is not valid.
pub fn function(config: &Config) -> Result<Function, StartError> {
    let relay = Arc::new(Relay::new(config)?);
    Ok(Function::events("relay", config.relay_subjects.clone(), move |event: Event| {
        let relay = relay.clone();
        async move { relay.post(&event).await }
    }))
}

impl Relay {
    fn new(config: &Config) -> Result<Relay, StartError> {
        let bad = |what: String| StartError::Config(format!("relay: {what}"));
        let url = config.relay_url.as_deref().ok_or_else(|| bad("relay_url is not set".into()))?;
        let url = Url::parse(url).map_err(|e| bad(format!("relay_url {url:?}: {e}")))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.relay_headers {
            let name = HeaderName::try_from(name.as_str()).map_err(|e| bad(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::try_from(value.as_str()).map_err(|e| bad(format!("header {name}: {e}")))?;
            headers.insert(name, value);
        }
        let idempotency = HeaderName::try_from(config.relay_idempotency_header.as_str())
            .map_err(|e| bad(format!("relay_idempotency_header: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(config.relay_timeout)
            // A redirect would turn the POST into a GET; it is reported as a permanent failure.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(Relay { http, url, headers, idempotency, timeout: config.relay_timeout })
    }

    async fn post(&self, event: &Event) -> Result<(), HandlerError> {
        let content_type = if serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload).is_ok() {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let response = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(&self.idempotency, event.id.as_str())
            .header(SUBJECT_HEADER, event.subject.as_str())
            .header(CONTENT_TYPE, content_type)
            .body(Bytes::clone(&event.payload))
            .send()
            .await
            .map_err(|e| match e.is_timeout() {
                true => HandlerError::transient(format!(
                    "POST {}: no answer within relay_timeout ({:?})",
                    self.url, self.timeout
                )),
                false => HandlerError::transient(format!("POST {}: {e}", self.url)),
            })?;
        outcome(response.status())
    }
}

/// What a response status means for the event.
fn outcome(status: StatusCode) -> Result<(), HandlerError> {
    let message = || format!("the relay endpoint answered {status}");
    match status.as_u16() {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(HandlerError::transient(message())),
        _ => Err(HandlerError::permanent(message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decide_between_retry_and_giving_up() {
        let kind = |code: u16| match outcome(StatusCode::from_u16(code).unwrap()) {
            Ok(()) => "ok",
            Err(error) if error.is_permanent() => "permanent",
            Err(_) => "transient",
        };
        let cases = [
            (200, "ok"),
            (204, "ok"),
            (408, "transient"),
            (429, "transient"),
            (500, "transient"),
            (503, "transient"),
            (400, "permanent"),
            (404, "permanent"),
            (301, "permanent"),
        ];
        for (code, expected) in cases {
            assert_eq!(kind(code), expected, "{code}");
        }
    }

    #[test]
    fn bad_settings_refuse_to_start() {
        let mut config = Config { relay_url: Some("not a url".into()), ..Config::default() };
        assert!(Relay::new(&config).is_err());
        config.relay_url = Some("http://127.0.0.1:1/hook".into());
        assert!(Relay::new(&config).is_ok());
        config.relay_headers.insert("Bad Name".into(), "x".into());
        assert!(Relay::new(&config).is_err());
    }
}
