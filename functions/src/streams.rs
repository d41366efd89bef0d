//! The streams the runtime needs: the events stream its durable functions consume, the dead-letter
//! stream, and (for the built-in functions) the `HERALD` stream pushes go to.

use async_nats::jetstream::{self, stream};
use herald_shared::subject::STREAM;
use tracing::warn;

use crate::config::Config;
use crate::runtime::StartError;

/// The subjects dead letters are published on.
pub const DLQ_SUBJECTS: &str = "herald.dlq.>";

/// Creates or updates the events stream and the dead-letter stream.
pub(crate) async fn ensure_events(js: &jetstream::Context, config: &Config) -> Result<(), StartError> {
    let replicas = config.stream.stream_replicas;
    let events = stream::Config {
        name: config.events_stream.clone(),
        description: Some("Herald: business events for push functions".into()),
        subjects: config.events_subjects.clone(),
        storage: stream::StorageType::File,
        max_age: config.events_max_age,
        num_replicas: replicas,
        allow_direct: true,
        ..Default::default()
    };
    let dlq = stream::Config {
        name: config.dlq_stream.clone(),
        description: Some("Herald: events push functions gave up on".into()),
        subjects: vec![DLQ_SUBJECTS.to_string()],
        storage: stream::StorageType::File,
        max_age: config.dlq_max_age,
        num_replicas: replicas,
        allow_direct: true,
        ..Default::default()
    };
    for mut config in [events, dlq] {
        let name = config.name.clone();
        keep_replicas(js, &mut config).await;
        js.create_or_update_stream(config).await.map_err(|e| StartError::Nats(format!("stream {name}: {e}")))?;
    }
    Ok(())
}

/// Never fewer replicas than an existing stream has: one copy started without the cluster's
/// `stream_replicas` would otherwise take every copy's streams down to its own count, silently.
async fn keep_replicas(js: &jetstream::Context, config: &mut stream::Config) {
    let Ok(existing) = js.get_stream(&config.name).await else { return };
    let replicas = existing.cached_info().config.num_replicas;
    if config.num_replicas < replicas {
        warn!(
            stream = %config.name,
            replicas,
            configured = config.num_replicas,
            "stream_replicas is lower than the stream's replicas: kept at the stream's"
        );
        config.num_replicas = replicas;
    }
}

/// Creates the `HERALD` stream when it is missing; never changes an existing one (the gateway owns
/// its settings).
pub(crate) async fn ensure_push_stream(js: &jetstream::Context, config: &Config) -> Result<(), StartError> {
    if js.get_stream(STREAM).await.is_ok() {
        return Ok(());
    }
    // Create only: a gateway may have made it meanwhile, and its settings win.
    match js.create_stream(config.stream.stream_config()).await {
        Ok(_) => Ok(()),
        Err(_) if js.get_stream(STREAM).await.is_ok() => Ok(()),
        Err(e) => Err(StartError::Nats(format!("stream {STREAM}: {e}"))),
    }
}
