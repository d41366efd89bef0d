//! The gateway's configuration: one flat struct, every default written next to its field.
//! Loaded from defaults, an optional TOML file, `HERALD_*` environment variables and flags
//! (see `herald_shared::config`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use herald_shared::nats::NatsSettings;

pub use crate::session::replay::ReplayMethod;
use herald_shared::stream::StreamSettings;
use serde::{Deserialize, Serialize};

/// The secret dev mode signs tokens with when none is configured. Never use it in production.
pub const DEV_SECRET: &str = "herald-dev-secret-do-not-use-in-production";

/// What a device's first connection (no `since`, no cursor yet) gets before going live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NewDeviceReplay {
    /// The user's unread personal messages (above the read position, muted kinds left out).
    Unread,
    /// Nothing: the connection starts live.
    None,
}

/// Who may hold sockets at the same time, enforced across all gateways through NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionPolicy {
    /// Any number of devices per user; a second socket of the same user and device replaces the
    /// first (4009).
    Multi,
    /// One socket per user: the newest wins, the older gets 4009 wherever it is.
    Single,
    /// One socket per user: a second one is refused (HTTP 409) while the first is open.
    Reject,
}

impl SessionPolicy {
    /// The policy's name, as in configuration and in KV `herald-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPolicy::Multi => "multi",
            SessionPolicy::Single => "single",
            SessionPolicy::Reject => "reject",
        }
    }

    /// The policy named `name`, if any.
    pub fn parse(name: &str) -> Option<SessionPolicy> {
        [SessionPolicy::Multi, SessionPolicy::Single, SessionPolicy::Reject].into_iter().find(|p| p.as_str() == name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address of the WebSocket and HTTP listener. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Connections the kernel queues before the gateway accepts them (a reconnect storm arrives
    /// at once). Default 4096 (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// This gateway's name in `welcome` frames, events and logs. Default `gw-` + random.
    pub node_id: String,
    #[serde(flatten)]
    pub nats: NatsSettings,
    #[serde(flatten)]
    pub stream: StreamSettings,
    /// HS256 secret for connect tokens. Default none (dev mode uses a built-in dev secret).
    pub jwt_secret: Option<String>,
    /// Ed25519 or RSA public key (PEM file) for EdDSA / RS256 connect tokens. Default none.
    pub jwt_public_key: Option<PathBuf>,
    /// When set, a token's `aud` must name one of these; when empty, `aud` is not checked (tokens
    /// from an identity provider carry one of their own). Default empty.
    pub jwt_audience: Vec<String>,
    /// Dev mode: a built-in token secret when none is set, `/dev/token` for the demo page, and a
    /// ready token printed at start. Default false.
    pub dev: bool,
    /// Interval of server pings, announced in `welcome`. Default `25s`.
    #[serde(with = "herald_shared::config::duration")]
    pub heartbeat: Duration,
    /// A peer that sends nothing (not even a pong) for `heartbeat` + this is closed. Default `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub heartbeat_timeout: Duration,
    /// Largest client message; a bigger one closes the connection with 1009. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Most bytes of a user's own messages waiting for one socket; past it, the socket catches up
    /// from the stream instead. A message counts for at most half of it, so a message larger than
    /// the limit is still delivered. Default 1 MiB.
    pub outbound_queue_bytes: usize,
    /// A socket that takes no bytes for this long while the gateway has some for it is closed
    /// with 4008 (the client stopped reading). Default `15s`.
    #[serde(with = "herald_shared::config::duration")]
    pub write_stall_timeout: Duration,
    /// How long a client may take to send a request's head (and, on a kept-alive connection, to
    /// start its next request) before the connection is closed; bounds connections that never
    /// become a socket (slowloris). Default `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub request_head_timeout: Duration,
    /// How long a request's body (the HTTP API's, a Socket.IO or SockJS POST) may take to arrive
    /// in full before it is answered 408; 0 for no limit. Default `60s`.
    #[serde(with = "herald_shared::config::duration")]
    pub request_body_timeout: Duration,
    /// The kernel's send buffer for each client socket (`SO_SNDBUF`), in bytes; 0 leaves it to
    /// the kernel, which grows it as needed (up to `net.ipv4.tcp_wmem`). Default 0.
    pub socket_send_buffer: usize,
    /// Most bytes the kernel keeps unsent for each client socket (`TCP_NOTSENT_LOWAT`), in bytes;
    /// 0 leaves it unbounded. What a slow client has not taken waits in the gateway's queues
    /// instead, and its socket takes bytes in small steps as the client reads, which the stall
    /// timeout sees. Default 131072.
    pub socket_unsent_limit: u32,
    /// Most messages each broadcast log (`push.all`, each topic) keeps for the sockets reading
    /// it; a socket that falls further behind catches up from the stream. Default 8192.
    pub broadcast_log_entries: usize,
    /// Most bytes each broadcast log keeps. Default 16 MiB.
    pub broadcast_log_bytes: usize,
    /// Most frames the writer sends in one vectored write. Default 64.
    pub write_batch_frames: usize,
    /// How long shutdown waits for sockets to close before it stops anyway. Default `10s`.
    #[serde(with = "herald_shared::config::duration")]
    pub shutdown_grace: Duration,
    /// Session policy this gateway writes to KV `herald-config` when the cluster has none yet; the
    /// one found there wins. Default `multi`.
    pub session_policy: SessionPolicy,
    /// How replays read the stream: `direct` (batched direct gets) or `consumer` (a short-lived
    /// ordered consumer). Default `direct`.
    pub replay_method: ReplayMethod,
    /// What a device's first connection gets before going live: `unread` (the user's unread
    /// personal messages) or `none`. Default `unread`.
    pub new_device_replay: NewDeviceReplay,
    /// Messages per direct-get batch. Default 256.
    pub replay_batch: usize,
    /// Most replay reads in flight at once on this gateway (batches of direct gets, or consumer
    /// replays): sessions catching up at once take turns. Default 64.
    pub replay_concurrency: usize,
    /// How often acknowledged cursors are written to KV. Default `1s`.
    #[serde(with = "herald_shared::config::duration")]
    pub cursor_flush_interval: Duration,
    /// Cursors written to KV a second at most by this gateway; with more acknowledging devices,
    /// each is written less often (longest unwritten first). Default 1000.
    pub cursor_write_rate: u32,
    /// Most topics one connection may subscribe to. Default 64.
    pub max_topics: usize,
    /// How long an `rpc` waits for its function. Default `5s`.
    #[serde(with = "herald_shared::config::duration")]
    pub rpc_timeout: Duration,
    /// `rpc` calls per second a connection may make on average. Default 20.
    pub rpc_rate: f64,
    /// `rpc` calls a connection may make at once above the rate. Default 40.
    pub rpc_burst: f64,
    /// Browser origins allowed to open sockets (e.g. `https://app.example.com`); others get 403. A
    /// request without `Origin` (not a browser) is always allowed. Default empty: any origin.
    pub allowed_origins: Vec<String>,
    /// Most sockets this gateway holds; more get 503. Default 0: no limit.
    pub max_connections: usize,
    /// Most sockets from one client address; more get 429. Default 0: no limit.
    pub max_connections_per_address: usize,
    /// Proxies whose `X-Forwarded-For` names the client address (for logs and per-address limits).
    /// Default empty: the peer's address is the client's.
    pub trusted_proxies: Vec<IpAddr>,
    /// Address of the HTTP API (`/v1/publish`, `/v1/disconnect`, `/v1/presence`). Default none: off.
    pub api_listen: Option<SocketAddr>,
    /// Keys the HTTP API accepts (`Authorization: Bearer <key>` or `X-Api-Key`); required with
    /// `api_listen`. Default empty.
    pub api_keys: Vec<String>,
    /// NATS user the HTTP API publishes as (a publisher: gateways themselves may not publish
    /// pushes). Default none: the gateway's own connection.
    pub api_nats_user: Option<String>,
    /// Password of `api_nats_user`. Default none.
    pub api_nats_password: Option<String>,
    /// Largest HTTP API request body; bigger gets 413. Default 1 MiB.
    pub api_max_body_bytes: usize,
    /// How long scatter-gather questions to all gateways (presence, disconnect) collect answers.
    /// Default `250ms`.
    #[serde(with = "herald_shared::config::duration")]
    pub gather_window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_backlog: 4096,
            node_id: format!("gw-{}", crate::id::random_id(6)),
            nats: NatsSettings::for_role("_INBOX_gateway"),
            stream: StreamSettings::default(),
            jwt_secret: None,
            jwt_public_key: None,
            jwt_audience: Vec::new(),
            dev: false,
            heartbeat: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(10),
            max_frame_bytes: 1 << 20,
            outbound_queue_bytes: 1 << 20,
            write_stall_timeout: Duration::from_secs(15),
            request_head_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(60),
            socket_send_buffer: 0,
            socket_unsent_limit: 128 * 1024,
            broadcast_log_entries: 8192,
            broadcast_log_bytes: 16 << 20,
            write_batch_frames: 64,
            shutdown_grace: Duration::from_secs(10),
            session_policy: SessionPolicy::Multi,
            replay_method: ReplayMethod::Direct,
            new_device_replay: NewDeviceReplay::Unread,
            replay_batch: 256,
            replay_concurrency: 64,
            cursor_flush_interval: Duration::from_secs(1),
            cursor_write_rate: 1000,
            max_topics: 64,
            rpc_timeout: Duration::from_secs(5),
            rpc_rate: 20.0,
            rpc_burst: 40.0,
            allowed_origins: Vec::new(),
            max_connections: 0,
            max_connections_per_address: 0,
            trusted_proxies: Vec::new(),
            api_listen: None,
            api_keys: Vec::new(),
            api_nats_user: None,
            api_nats_password: None,
            api_max_body_bytes: 1 << 20,
            gather_window: Duration::from_millis(250),
        }
    }
}

impl Config {
    /// Refuses the values no gateway can run with, rather than running wrongly: a zero that would
    /// turn a timer into a busy loop or close everything at once, an empty name, key or address.
    pub fn check(&self) -> Result<(), String> {
        let zero = [
            ("heartbeat", self.heartbeat.is_zero(), "pings would be sent without a pause"),
            ("heartbeat_timeout", self.heartbeat_timeout.is_zero(), "every socket would be closed as dead"),
            ("cursor_flush_interval", self.cursor_flush_interval.is_zero(), "cursors would be flushed without a pause"),
            ("rpc_timeout", self.rpc_timeout.is_zero(), "every rpc would time out"),
            ("gather_window", self.gather_window.is_zero(), "no gateway's answer would be waited for"),
            ("sessions_max_age", self.stream.sessions_max_age.is_zero(), "claims would never expire"),
            ("max_frame_bytes", self.max_frame_bytes == 0, "every client message would be refused"),
            ("cursor_write_rate", self.cursor_write_rate == 0, "no cursor would be written"),
            ("write_stall_timeout", self.write_stall_timeout.is_zero(), "every socket would be closed as stalled"),
            ("write_batch_frames", self.write_batch_frames == 0, "no frame would be written"),
            ("replay_batch", self.replay_batch == 0, "no replay would read a message"),
            ("replay_concurrency", self.replay_concurrency == 0, "no replay would start"),
            ("broadcast_log_entries", self.broadcast_log_entries == 0, "every broadcast would be read from the stream"),
            ("broadcast_log_bytes", self.broadcast_log_bytes == 0, "every broadcast would be read from the stream"),
            ("outbound_queue_bytes", self.outbound_queue_bytes == 0, "every message would be read from the stream"),
        ];
        if let Some((key, _, why)) = zero.iter().find(|(_, is_zero, _)| *is_zero) {
            return Err(format!("{key} is 0: {why}"));
        }
        if self.node_id.trim().is_empty() {
            return Err("node_id is empty: gateways are told apart by it".into());
        }
        if self.nats.nats_url.trim().is_empty() {
            return Err("nats_url is empty: no NATS server to connect to".into());
        }
        if self.api_keys.iter().any(|key| key.is_empty()) {
            return Err("api_keys holds an empty key: it would let requests without a key in".into());
        }
        Ok(())
    }

    /// The HS256 secret in effect: the configured one, or the dev secret in dev mode.
    pub fn effective_secret(&self) -> Option<String> {
        match (&self.jwt_secret, self.dev) {
            (Some(secret), _) => Some(secret.clone()),
            (None, true) => Some(DEV_SECRET.to_string()),
            (None, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_the_check_and_zeros_that_cannot_work_do_not() {
        assert_eq!(Config::default().check(), Ok(()));
        let refused = |change: fn(&mut Config), key: &str| {
            let mut config = Config::default();
            change(&mut config);
            let error = config.check().expect_err(key);
            assert!(error.starts_with(key), "{error}");
        };
        refused(|c| c.heartbeat = Duration::ZERO, "heartbeat is 0");
        refused(|c| c.stream.sessions_max_age = Duration::ZERO, "sessions_max_age is 0");
        refused(|c| c.max_frame_bytes = 0, "max_frame_bytes is 0");
        refused(|c| c.write_stall_timeout = Duration::ZERO, "write_stall_timeout is 0");
        refused(|c| c.write_batch_frames = 0, "write_batch_frames is 0");
        refused(|c| c.replay_concurrency = 0, "replay_concurrency is 0");
        refused(|c| c.node_id = " ".into(), "node_id is empty");
        refused(|c| c.nats.nats_url = String::new(), "nats_url is empty");
        refused(|c| c.api_keys = vec!["k".into(), String::new()], "api_keys holds an empty key");
    }

    /// Every setting is documented in the README's configuration table.
    #[test]
    fn the_readme_documents_every_key() {
        let readme = include_str!("../../README.md");
        let config = Config {
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            api_nats_user: Some("publisher".into()),
            api_nats_password: Some("secret".into()),
            ..Config::default()
        };
        let keys = serde_json::to_value(config).expect("config serializes");
        for key in keys.as_object().expect("a flat map").keys() {
            assert!(readme.contains(&format!("`{key}`")), "README.md lacks the setting `{key}`");
        }
    }
}
