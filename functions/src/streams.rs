//! The streams the runtime needs: the events stream its durable functions consume, the dead-letter
//! stream, and (for the built-in functions) the `HERALD` stream pushes go to.

use async_nats::jetstream::{self, stream};
use herald_shared::stream::replicas_to_keep;
use herald_shared::subject::STREAM;

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
        config.num_replicas = replicas_to_keep(js, &config.name, config.num_replicas).await;
        js.create_or_update_stream(config).await.map_err(|e| StartError::Nats(format!("stream {name}: {e}")))?;
    }
    Ok(())
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
