//! `notify`: a business event on `events.notify.>` becomes pushes.
//!
//! ```json
//! {"id":"order-7-shipped","to":{"users":["42","43"]},"kind":"mail","data":{"text":"shipped"}}
//! ```
//!
//! `to` is `{"users":[...]}`, `{"topic":"news"}` or `{"all":true}`; `kind` (optional) becomes
//! `Herald-Type`; `data` is the pushed payload. Each push's `Nats-Msg-Id` is
//! `<id>:user:<user>` / `<id>:topic:<topic>` / `<id>:all` (`id` defaults to the event's
//! `<stream>-<seq>`), so redelivered or republished events push once. An event that cannot be
//! parsed or names a bad id is dead-lettered at once, before anything is pushed.

use std::collections::BTreeSet;

use herald_shared::subject::Audience;
use serde::Deserialize;

use crate::config::Config;
use crate::error::HandlerError;
use crate::events::Event;
use crate::function::Function;
use crate::push::{Pusher, check_audience};

/// The most users one event may address.
pub const MAX_USERS: usize = 10_000;

/// A notification event.
#[derive(Debug, Deserialize)]
struct Notification {
    id: Option<String>,
    to: Target,
    kind: Option<String>,
    data: serde_json::Value,
}

/// Who a notification is for; exactly one field is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    users: Option<Vec<String>>,
    topic: Option<String>,
    all: Option<bool>,
}

/// The `notify` function, on the configured subjects.
pub fn function(config: &Config, pusher: Pusher) -> Function {
    Function::events("notify", config.notify_subjects.clone(), move |event: Event| {
        let pusher = pusher.clone();
        async move { notify(&pusher, &event).await }
    })
}

async fn notify(pusher: &Pusher, event: &Event) -> Result<(), HandlerError> {
    let notification: Notification = event.json()?;
    let audiences = audiences(notification.to)?;
    let source_id = notification.id.as_deref().unwrap_or(&event.id);
    let payload = serde_json::to_vec(&notification.data)?;
    // Pipelined: thousands of users take a few round trips, not one each, so the event does not
    // time out half pushed. A failure retries the event; the pushes already stored are not repeated.
    pusher.push_all(source_id, &audiences, notification.kind.as_deref(), payload.into()).await?;
    Ok(())
}

/// The audiences of `to`, every id checked before anything is pushed.
fn audiences(to: Target) -> Result<Vec<Audience>, HandlerError> {
    let audiences = match (to.users, to.topic, to.all) {
        (Some(users), None, None) => {
            if users.is_empty() || users.len() > MAX_USERS {
                return Err(HandlerError::permanent(format!("to.users must hold 1 to {MAX_USERS} users")));
            }
            let unique: BTreeSet<String> = users.into_iter().collect();
            unique.into_iter().map(Audience::User).collect()
        }
        (None, Some(topic), None) => vec![Audience::Topic(topic)],
        (None, None, Some(true)) => vec![Audience::All],
        _ => {
            return Err(HandlerError::permanent(
                r#"to must be exactly one of {"users":[...]}, {"topic":"..."}, {"all":true}"#,
            ));
        }
    };
    for audience in &audiences {
        check_audience(audience).map_err(|e| HandlerError::permanent(e.to_string()))?;
    }
    Ok(audiences)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(to: &str) -> Result<Vec<Audience>, HandlerError> {
        audiences(serde_json::from_str(to).map_err(HandlerError::from)?)
    }

    #[test]
    fn targets_become_audiences() {
        let users = parse(r#"{"users":["b","a","b"]}"#).unwrap();
        assert_eq!(users, [Audience::User("a".into()), Audience::User("b".into())]);
        assert_eq!(parse(r#"{"topic":"news"}"#).unwrap(), [Audience::Topic("news".into())]);
        assert_eq!(parse(r#"{"all":true}"#).unwrap(), [Audience::All]);
    }

    #[test]
    fn bad_targets_are_permanent_errors() {
        for bad in [
            r#"{}"#,
            r#"{"all":false}"#,
            r#"{"users":[]}"#,
            r#"{"users":["ok","*"]}"#,
            r#"{"topic":"a.b"}"#,
            r#"{"topic":">"}"#,
            r#"{"users":["a"],"topic":"t"}"#,
            r#"{"user":"a"}"#,
            r#"{"users":"a"}"#,
        ] {
            let error = parse(bad).expect_err(bad);
            assert!(error.is_permanent(), "{bad}");
        }
    }
}
