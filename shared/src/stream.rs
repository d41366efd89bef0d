//! Idempotent creation and update of the `HERALD` stream and the KV buckets.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};

use crate::subject::{KV_CONFIG, KV_CURSORS, KV_PREFS, KV_READS, KV_SESSIONS, KV_SOCKETIO, STREAM, STREAM_SUBJECTS};

/// Retention and durability of the stream (and replicas of the buckets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Messages older than this are removed. Default `7d`.
    #[serde(with = "crate::config::duration")]
    pub stream_max_age: Duration,
    /// Messages kept per subject (per user, per topic, and for `push.all`): the offline inbox size.
    /// Default 1000.
    pub stream_max_msgs_per_subject: i64,
    /// Total size bound of the stream in bytes; -1 for none. Default -1.
    pub stream_max_bytes: i64,
    /// A publish repeating a `Nats-Msg-Id` seen within this window is stored once. Default `2m`.
    #[serde(with = "crate::config::duration")]
    pub stream_duplicate_window: Duration,
    /// Replicas of the stream and the buckets (3 on a three-node cluster). Default 1.
    pub stream_replicas: usize,
    /// Entries of `herald-sessions` (session policies) live this long unless their owner refreshes
    /// them (every quarter of it), so that the claims of a gateway that died expire. Default `2m`.
    #[serde(with = "crate::config::duration")]
    pub sessions_max_age: Duration,
    /// How long a Socket.IO connection's state (its topics) is kept after the connection closes,
    /// for the client to recover it, as socket.io's `maxDisconnectionDuration` (the max age of KV
    /// `herald-socketio`). Default `2m`.
    #[serde(with = "crate::config::duration")]
    pub socketio_recovery_window: Duration,
    /// A device's cursor in `herald-cursors` that was not written for this long (the device neither
    /// connected nor acknowledged anything) is removed, so that device ids clients make up do not
    /// pile up for ever; the device's next connection is then a new device's. `0`: kept for ever.
    /// Default `30d`.
    #[serde(with = "crate::config::duration")]
    pub cursors_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            stream_max_msgs_per_subject: 1000,
            stream_max_bytes: -1,
            stream_duplicate_window: Duration::from_secs(120),
            sessions_max_age: Duration::from_secs(120),
            socketio_recovery_window: Duration::from_secs(120),
            cursors_max_age: Duration::from_secs(30 * 24 * 3600),
            stream_replicas: 1,
        }
    }
}

impl StreamSettings {
    /// JetStream refuses a duplicate window longer than the max age (0: no max age).
    fn duplicate_window(&self) -> Duration {
        if self.stream_max_age.is_zero() {
            self.stream_duplicate_window
        } else {
            self.stream_duplicate_window.min(self.stream_max_age)
        }
    }

    /// The stream's configuration.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: STREAM.to_string(),
            description: Some("Herald: every push, republished to herald.deliver.>".into()),
            subjects: STREAM_SUBJECTS.iter().map(|s| s.to_string()).collect(),
            storage: stream::StorageType::File,
            max_age: self.stream_max_age,
            max_messages_per_subject: self.stream_max_msgs_per_subject,
            max_bytes: self.stream_max_bytes,
            duplicate_window: self.duplicate_window(),
            num_replicas: self.stream_replicas,
            allow_direct: true,
            allow_message_ttl: true,
            republish: Some(stream::Republish {
                source: "push.>".into(),
                destination: "herald.deliver.>".into(),
                headers_only: false,
            }),
            ..Default::default()
        }
    }
}

/// Creates the stream, or updates it to `settings` (never to fewer replicas than it has); safe to
/// run from every process at every start.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Info, jetstream::context::CreateStreamError> {
    let mut config = settings.stream_config();
    config.num_replicas = replicas_to_keep(js, STREAM, config.num_replicas).await;
    if let Ok(existing) = js.get_stream(STREAM).await {
        for (setting, from, to) in retention_changes(&existing.cached_info().config, &config) {
            tracing::warn!(
                setting,
                %from,
                %to,
                "stream HERALD's limit changes to this process's setting, for every gateway: give them all the same"
            );
        }
    }
    js.create_or_update_stream(config).await
}

/// The retention limits that differ between the stream as it is and as `wanted`, as (setting,
/// from, to); values NATS reads alike (0 or -1: no limit; a 0 duplicate window: its default) count
/// as equal.
fn retention_changes(existing: &stream::Config, wanted: &stream::Config) -> Vec<(&'static str, String, String)> {
    let count = |n: i64| if n <= 0 { "none".to_string() } else { n.to_string() };
    let age = |d: Duration| if d.is_zero() { "none".to_string() } else { format!("{d:?}") };
    let window = |d: Duration| format!("{:?}", if d.is_zero() { Duration::from_secs(120) } else { d });
    [
        ("stream_max_age", age(existing.max_age), age(wanted.max_age)),
        (
            "stream_max_msgs_per_subject",
            count(existing.max_messages_per_subject),
            count(wanted.max_messages_per_subject),
        ),
        ("stream_max_bytes", count(existing.max_bytes), count(wanted.max_bytes)),
        ("stream_duplicate_window", window(existing.duplicate_window), window(wanted.duplicate_window)),
    ]
    .into_iter()
    .filter(|(_, from, to)| from != to)
    .collect()
}

/// `configured` replicas for stream `name`, or the stream's own when it has more: a process started
/// without the cluster's `stream_replicas` must not take replicas away from every other one's streams.
pub async fn replicas_to_keep(js: &jetstream::Context, name: &str, configured: usize) -> usize {
    let Ok(existing) = js.get_stream(name).await else { return configured };
    let replicas = existing.cached_info().config.num_replicas;
    if configured < replicas {
        tracing::warn!(stream = name, replicas, configured, "stream_replicas is lower than the stream's: kept at its");
    }
    configured.max(replicas)
}

/// The KV buckets Herald uses.
#[derive(Clone)]
pub struct Buckets {
    /// Device cursors.
    pub cursors: kv::Store,
    /// Muted kinds per user.
    pub prefs: kv::Store,
    /// Read positions per user.
    pub reads: kv::Store,
    /// Session ownership for session policies.
    pub sessions: kv::Store,
    /// Settings shared by every gateway (the session policy).
    pub config: kv::Store,
    /// Socket.IO connection states, for recovery.
    pub socketio: kv::Store,
}

fn bucket_config(settings: &StreamSettings, name: &str, description: &str) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: settings.stream_replicas,
        ..Default::default()
    }
}

/// Creates or updates the bucket of cluster-wide settings.
pub async fn ensure_config_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    ensure_bucket(js, bucket_config(settings, KV_CONFIG, "settings every gateway shares")).await
}

/// The bucket of muted kinds, made when missing; never changes an existing one. For the push
/// functions, which need only this bucket: the gateways own the buckets' settings, and a process
/// started with other settings (replicas, say) must not change them.
pub async fn prefs_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    if let Ok(bucket) = js.get_key_value(KV_PREFS).await {
        return Ok(bucket);
    }
    match js.create_key_value(bucket_config(settings, KV_PREFS, PREFS_DESCRIPTION)).await {
        Ok(bucket) => Ok(bucket),
        // Made meanwhile (by a gateway, or another copy), perhaps with other settings: theirs stay.
        Err(error) => js.get_key_value(KV_PREFS).await.map_err(|_| error),
    }
}

const PREFS_DESCRIPTION: &str = "muted kinds per user";

/// Creates or updates the KV buckets (never to fewer replicas than they have).
pub async fn ensure_buckets(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Buckets, jetstream::context::CreateKeyValueError> {
    let bucket = |name: &str, description: &str| bucket_config(settings, name, description);
    let sessions = kv::Config {
        // Claims of a gateway that died expire instead of holding a slot forever.
        max_age: settings.sessions_max_age,
        ..bucket(KV_SESSIONS, "which connection owns a user's session")
    };
    let socketio = kv::Config {
        // A state is kept this long after its connection last wrote it (at its close).
        max_age: settings.socketio_recovery_window,
        ..bucket(KV_SOCKETIO, "Socket.IO connection states kept for recovery")
    };
    let cursors = kv::Config {
        max_age: settings.cursors_max_age,
        ..bucket(KV_CURSORS, "last acknowledged seq per user and device")
    };
    Ok(Buckets {
        cursors: ensure_bucket(js, cursors).await?,
        prefs: ensure_bucket(js, bucket(KV_PREFS, PREFS_DESCRIPTION)).await?,
        reads: ensure_bucket(js, bucket(KV_READS, "highest personal seq read per user")).await?,
        sessions: ensure_bucket(js, sessions).await?,
        config: ensure_config_bucket(js, settings).await?,
        socketio: ensure_bucket(js, socketio).await?,
    })
}

async fn ensure_bucket(
    js: &jetstream::Context,
    mut config: kv::Config,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    config.num_replicas = replicas_to_keep(js, &format!("KV_{}", config.bucket), config.num_replicas).await;
    js.create_or_update_key_value(config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_changes_are_named_and_what_nats_reads_alike_is_no_change() {
        let ours = StreamSettings::default().stream_config();
        assert!(retention_changes(&ours, &ours).is_empty());
        let unlimited = stream::Config { max_messages_per_subject: 0, ..ours.clone() };
        let minus_one = stream::Config { max_messages_per_subject: -1, ..ours.clone() };
        assert!(retention_changes(&unlimited, &minus_one).is_empty(), "0 and -1 are both no limit");
        let trimmed = stream::Config { max_messages_per_subject: 2, ..ours.clone() };
        assert_eq!(
            retention_changes(&ours, &trimmed),
            [("stream_max_msgs_per_subject", "1000".to_string(), "2".to_string())]
        );
    }

    #[test]
    fn the_duplicate_window_is_capped_by_a_max_age_and_kept_without_one() {
        let settings = |max_age, window| StreamSettings {
            stream_max_age: Duration::from_secs(max_age),
            stream_duplicate_window: Duration::from_secs(window),
            ..StreamSettings::default()
        };
        assert_eq!(settings(60, 600).stream_config().duplicate_window, Duration::from_secs(60));
        assert_eq!(settings(0, 600).stream_config().duplicate_window, Duration::from_secs(600));
    }
}
