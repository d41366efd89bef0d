//! Publishing as a backend does: JetStream publishes, with the stored sequence returned.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};

/// A JetStream publisher.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    /// Publishes as the `publisher` user, as a backend would.
    pub async fn new(nats: &crate::TestNats) -> Publisher {
        let client = nats.client_as(crate::nats::Role::Publisher).await.expect("connect as publisher");
        Publisher { js: jetstream::new(client) }
    }

    /// Publishes `body` to `subject` and returns its stream sequence.
    pub async fn publish(&self, subject: &str, body: &str) -> u64 {
        self.publish_with(subject, &[], body).await.0
    }

    /// Publishes with headers; returns the sequence and whether the stream saw it as a duplicate.
    pub async fn publish_with(&self, subject: &str, headers: &[(&str, &str)], body: &str) -> (u64, bool) {
        let ack = self.send(subject, headers, body).await.await.expect("publish acknowledged");
        (ack.sequence, ack.duplicate)
    }

    /// Sends without waiting for the acknowledgement (for fast, pipelined publishing).
    pub async fn send(&self, subject: &str, headers: &[(&str, &str)], body: &str) -> PublishAckFuture {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.js.publish_with_headers(subject.to_string(), map, body.to_string().into()).await.expect("publish sent")
    }

    /// The underlying JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}
