//! The functions binary's configuration: one flat struct, every default written next to its field
//! (and in docs/functions.md). Loaded from defaults, an optional TOML file, `HERALD_*` environment
//! variables and flags (see `herald_shared::config`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use herald_shared::nats::NatsSettings;
use herald_shared::stream::StreamSettings;
use serde::{Deserialize, Serialize};

use crate::retry::{Backoff, RetryPolicy};

/// The built-in functions, by the names `builtins` takes.
pub const BUILTINS: [&str; 4] = ["notify", "prefs", "presence", "relay"];

/// Everything `herald-functions` and [`crate::Runtime`] read; see docs/functions.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// How to reach NATS (`nats_url`, credentials).
    #[serde(flatten)]
    pub nats: NatsSettings,
    /// Settings of the `HERALD` stream, used only to create it when it is missing (the gateway owns
    /// it), and the replicas of the KV buckets.
    #[serde(flatten)]
    pub stream: StreamSettings,
    /// Address of the HTTP listener serving `GET /metrics` and `GET /healthz`. Default
    /// `127.0.0.1:9090`.
    pub metrics_listen: SocketAddr,
    /// NATS micro service name listing every function, with the rpc functions as its endpoints
    /// (`nats micro ls`). Default `herald-functions`.
    pub service_name: String,
    /// Queue group shared by every copy; lifecycle functions use `<queue_group>.<function>`.
    /// Default `herald-functions`.
    pub queue_group: String,
    /// Calls one function runs at once in this process. Default 16.
    pub concurrency: usize,
    /// Longest run of one call; a slower one fails (rpc: `Herald-Error`, events: retried). Default
    /// `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub timeout: Duration,
    /// How long shutdown waits for calls in flight before abandoning them. Default `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub shutdown_grace: Duration,
    /// The stream holding business events for durable functions. Default `HERALD_EVENTS`.
    pub events_stream: String,
    /// Subjects that stream captures; every durable function's subjects must lie inside them.
    /// Default `["events.>"]`.
    pub events_subjects: Vec<String>,
    /// Business events older than this are removed from the events stream. Default `7d`.
    #[serde(with = "herald_shared::config::duration")]
    pub events_max_age: Duration,
    /// The stream keeping dead letters (`herald.dlq.>`). Default `HERALD_DLQ`.
    pub dlq_stream: String,
    /// Dead letters older than this are removed. Default `14d`.
    #[serde(with = "herald_shared::config::duration")]
    pub dlq_max_age: Duration,
    /// Deliveries of a durable event before it is dead-lettered. Default 5.
    pub max_attempts: u64,
    /// Delay before the second delivery; doubles after each failure. Default `1s`.
    #[serde(with = "herald_shared::config::duration")]
    pub retry_initial: Duration,
    /// Longest delay between deliveries. Default `1m`.
    #[serde(with = "herald_shared::config::duration")]
    pub retry_max: Duration,
    /// An event neither acknowledged nor reported in progress for this long is delivered again,
    /// possibly to another copy (a running handler reports progress every half of it). Default `30s`.
    #[serde(with = "herald_shared::config::duration")]
    pub ack_wait: Duration,
    /// Built-in functions to run: any of `notify`, `prefs`, `presence`, `relay`. Default all four
    /// (`relay` runs only when `relay_url` is set).
    pub builtins: Vec<String>,
    /// Subjects `notify` consumes. Default `["events.notify.>"]`.
    pub notify_subjects: Vec<String>,
    /// Where `relay` POSTs events. Default none (relay off).
    pub relay_url: Option<String>,
    /// Subjects `relay` consumes. Default `["events.relay.>"]`.
    pub relay_subjects: Vec<String>,
    /// Extra headers of every relay request. Default none.
    pub relay_headers: BTreeMap<String, String>,
    /// Longest relay request; a slower one is retried. Default `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub relay_timeout: Duration,
    /// Header carrying `<stream>-<seq>`, the same on every attempt of one event. Default
    /// `Idempotency-Key`.
    pub relay_idempotency_header: String,
    /// How long `presence` collects gateway replies. Default `250ms`.
    #[serde(with = "herald_shared::config::duration")]
    pub presence_window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: NatsSettings::for_role("_INBOX_functions"),
            stream: StreamSettings::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            service_name: "herald-functions".into(),
            queue_group: "herald-functions".into(),
            concurrency: 16,
            timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            events_stream: "HERALD_EVENTS".into(),
            events_subjects: vec!["events.>".into()],
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_stream: "HERALD_DLQ".into(),
            dlq_max_age: Duration::from_secs(14 * 24 * 3600),
            max_attempts: 5,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ack_wait: Duration::from_secs(30),
            builtins: BUILTINS.iter().map(|name| name.to_string()).collect(),
            notify_subjects: vec!["events.notify.>".into()],
            relay_url: None,
            relay_subjects: vec!["events.relay.>".into()],
            relay_headers: BTreeMap::new(),
            relay_timeout: Duration::from_secs(10),
            relay_idempotency_header: "Idempotency-Key".into(),
            presence_window: Duration::from_millis(250),
        }
    }
}

impl Config {
    /// Refuses settings that cannot work (the binary exits with status 2, as the gateway does).
    pub fn check(&self) -> Result<(), String> {
        if self.nats.nats_url.trim().is_empty() {
            return Err("nats_url is empty: no NATS server to connect to".into());
        }
        if self.timeout.is_zero() {
            return Err("timeout is 0: every call would time out".into());
        }
        Ok(())
    }

    /// The retry policy of durable functions.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: Backoff { initial: self.retry_initial, max: self.retry_max },
        }
    }

    /// Whether built-in `name` is enabled.
    pub fn builtin_enabled(&self, name: &str) -> bool {
        self.builtins.iter().any(|enabled| enabled == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct NoFlags {}

    #[test]
    fn a_toml_file_overrides_the_defaults() {
        let dir = std::env::temp_dir().join(format!("herald-functions-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("functions.toml");
        let toml = "metrics_listen = \"0.0.0.0:9191\"\nmax_attempts = 7\nretry_initial = \"250ms\"\n\
                    builtins = [\"notify\", \"relay\"]\nrelay_url = \"http://hooks.local/in\"\n\
                    [relay_headers]\nAuthorization = \"Bearer t\"\n";
        std::fs::write(&file, toml).unwrap();
        let config: Config = herald_shared::config::load(Some(&file), &NoFlags {}).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(config.metrics_listen, SocketAddr::from(([0, 0, 0, 0], 9191)));
        assert_eq!(config.retry_policy().max_attempts, 7);
        assert_eq!(config.retry_policy().backoff.initial, Duration::from_millis(250));
        assert!(config.builtin_enabled("relay") && !config.builtin_enabled("prefs"));
        assert_eq!(config.relay_headers.get("Authorization").map(String::as_str), Some("Bearer t"));
        assert_eq!(config.ack_wait, Config::default().ack_wait);
    }
}
