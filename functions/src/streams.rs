//! The streams the runtime needs: the events stream its durable functions consume and the
//! dead-letter stream.

use async_nats::jetstream::{self, stream};

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
        ..Default::default()
    };
    let dlq = stream::Config {
        name: config.dlq_stream.clone(),
        description: Some("Herald: events push functions gave up on".into()),
        subjects: vec![DLQ_SUBJECTS.to_string()],
        storage: stream::StorageType::File,
        max_age: config.dlq_max_age,
        num_replicas: replicas,
        ..Default::default()
    };
    for config in [events, dlq] {
        let name = config.name.clone();
        js.create_or_update_stream(config).await.map_err(|e| StartError::Nats(format!("stream {name}: {e}")))?;
    }
    Ok(())
}
