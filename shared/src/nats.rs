//! NATS connection settings shared by every Herald binary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Event;

use serde::{Deserialize, Serialize};

/// How often a service (gateway, functions) pings its NATS server (as the gateway's delivery
/// connection does).
const SERVICE_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How to reach and authenticate to NATS. Credentials come from files or the environment; the
/// defaults (no credentials) only fit a local development server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// User name, with `nats_password`. Default none.
    pub nats_user: Option<String>,
    /// Password for `nats_user`. Default none.
    pub nats_password: Option<String>,
    /// A `.creds` file (JWT + NKey seed). Default none.
    pub nats_creds: Option<PathBuf>,
    /// A PEM file of the authorities that sign the NATS servers' TLS certificates, trusted besides
    /// the system's (a private CA). TLS itself is used when the server requires it or the URL says
    /// `tls://`. Default none.
    pub nats_tls_ca: Option<PathBuf>,
    /// Prefix of this process's reply subjects. Each Herald role has its own (`_INBOX_gateway`,
    /// `_INBOX_functions`), so NATS permissions can keep one role from reading another's replies.
    /// Default `_INBOX`.
    pub nats_inbox_prefix: String,
    /// Messages buffered per NATS subscription inside this process (async-nats drops what
    /// overflows). The gateway's delivery connection is its own: there it is the buffer between that
    /// connection and the dispatcher, which stops reading from NATS while it is full. Default 65536.
    pub nats_subscription_capacity: usize,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            nats_tls_ca: None,
            nats_inbox_prefix: "_INBOX".into(),
            nats_subscription_capacity: 65536,
        }
    }
}

impl NatsSettings {
    /// The defaults, with `inbox_prefix` for this role's replies.
    pub fn for_role(inbox_prefix: &str) -> NatsSettings {
        NatsSettings { nats_inbox_prefix: inbox_prefix.to_string(), ..NatsSettings::default() }
    }

    /// Connect options for a long-lived service connection: named, retrying its first connection and
    /// every later one forever, with the configured credentials; connection events are logged.
    pub async fn options(&self, name: &str) -> std::io::Result<async_nats::ConnectOptions> {
        self.options_with_events(name, Arc::new(|_| {})).await
    }

    /// Like [`NatsSettings::options`], also calling `on_event` for every connection event.
    pub async fn options_with_events(
        &self,
        name: &str,
        on_event: Arc<dyn Fn(&Event) + Send + Sync>,
    ) -> std::io::Result<async_nats::ConnectOptions> {
        let connection = name.to_string();
        let user = self.nats_user.clone();
        Ok(self
            .identity(name)
            .await?
            .retry_on_initial_connect()
            // A server that hangs (its sockets open, nothing answered) is left after two unanswered
            // pings: 20 s or so, where async-nats's default takes two minutes while every request
            // on the connection times out.
            .ping_interval(SERVICE_PING_INTERVAL)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| Duration::from_millis((100 * attempt as u64).min(2000)))
            .subscription_capacity(self.nats_subscription_capacity.max(1))
            .event_callback(move |event| {
                log_event(&connection, user.as_deref(), &event);
                on_event(&event);
                std::future::ready(())
            }))
    }

    /// Connect options for a command-line tool: one try to connect, whose error (a refused password,
    /// no server) is returned at once rather than retried.
    pub async fn one_shot_options(&self, name: &str) -> std::io::Result<async_nats::ConnectOptions> {
        Ok(self.identity(name).await?.connection_timeout(Duration::from_secs(5)))
    }

    /// Options with the name, credentials, trusted authorities and reply prefix.
    async fn identity(&self, name: &str) -> std::io::Result<async_nats::ConnectOptions> {
        let mut options = match &self.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path).await?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &self.nats_tls_ca {
            // Read only when a TLS connection is made: a path that leads nowhere is told now.
            let opened = std::fs::File::open(ca).and_then(|file| file.metadata());
            let file = opened.and_then(|found| match found.is_file() {
                true => Ok(()),
                false => Err(std::io::Error::other("not a file")),
            });
            if let Err(error) = file {
                return Err(std::io::Error::new(error.kind(), format!("nats_tls_ca {}: {error}", ca.display())));
            }
            options = options.add_root_certificates(ca.clone());
        }
        Ok(options.name(name).custom_inbox_prefix(&self.nats_inbox_prefix))
    }

    /// The server addresses of `nats_url`.
    pub fn addresses(&self) -> Result<Vec<async_nats::ServerAddr>, async_nats::Error> {
        self.nats_url.split(',').map(|url| url.trim().parse::<async_nats::ServerAddr>().map_err(Into::into)).collect()
    }
}

/// Whether NATS refused to store a published message for want of storage: the stream is not full
/// (it drops its oldest), JetStream's storage is.
pub fn out_of_storage(error: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|error| error.error_code() == async_nats::jetstream::ErrorCode::INSUFFICIENT_RESOURCES)
}

/// What a message [`out_of_storage`] refused means.
pub const OUT_OF_STORAGE: &str = "JetStream has no room for the message (NATS: insufficient resources), which \
                                  was not stored: a retry succeeds once an operator frees or grows JetStream's \
                                  storage (max_file_store)";

/// Whether `event` says that NATS refused the connection's credentials (an authorization
/// violation: while connecting, a client error; on a live connection, a server error).
pub fn refuses_credentials(event: &Event) -> bool {
    match event {
        Event::ServerError(async_nats::ServerError::AuthorizationViolation) => true,
        Event::ClientError(async_nats::ClientError::Other(text)) => text.contains("authorization violation"),
        _ => false,
    }
}

/// Logs an event of the NATS connection named `connection`, which logs in as `user`, at a level
/// that fits it.
fn log_event(connection: &str, user: Option<&str>, event: &Event) {
    match event {
        Event::Connected => tracing::info!(connection, "connected to NATS"),
        Event::Disconnected => tracing::warn!(connection, "disconnected from NATS; reconnecting"),
        Event::SlowConsumer(sid) => {
            tracing::warn!(connection, sid, "NATS subscription buffer full: messages dropped")
        }
        // Retried for ever like any refusal, but no retry helps: say what to check.
        event if refuses_credentials(event) => tracing::error!(
            connection,
            user = user.unwrap_or("(none)"),
            "NATS refused this connection's credentials: check its NATS user and password (or creds file)"
        ),
        Event::ServerError(error) => tracing::warn!(connection, %error, "NATS server error"),
        Event::ClientError(error) => tracing::debug!(connection, %error, "NATS client error"),
        other => tracing::info!(connection, event = %other, "NATS event"),
    }
}
