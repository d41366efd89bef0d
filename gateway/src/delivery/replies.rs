//! Reading the stream back: the replays' direct gets and the inbox's, on a NATS connection of their
//! own, read by the gateway's own protocol reader (the delivery [`feed`](super::feed)'s). async-nats
//! drops its whole connection on a message whose headers it cannot parse (a line that is not
//! UTF-8, or has no `:`), which any publisher may send and the stream stores: every replay of that
//! message failed, for as long as it was stored, and took the gateway's control connection down each
//! time. Here such a message is read like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_shared::nats::NatsSettings;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::feed::{Delivered, Feed, FeedEvent, RequestError};

/// Messages waiting between the connection and the task that hands them to their readers.
const EVENTS: usize = 1024;

/// Where each inbox's messages go, by subscription id, with the connection it opened on.
type Routes = Arc<Mutex<HashMap<u64, Route>>>;

struct Route {
    generation: u64,
    to: mpsc::UnboundedSender<Delivered>,
}

/// The connection, shared by every replay of the gateway.
#[derive(Clone)]
pub(crate) struct Replies {
    feed: Feed,
    routes: Routes,
    inbox_prefix: String,
}

impl Replies {
    /// Connects (and reconnects until `shutdown`) with `settings`.
    pub(crate) fn start(settings: &NatsSettings, name: String, shutdown: CancellationToken) -> Replies {
        let (events, mut arriving) = mpsc::channel(EVENTS);
        let feed = Feed::start(settings, name, events, false, shutdown);
        let routes = Routes::default();
        let handed = routes.clone();
        tokio::spawn(async move {
            while let Some(event) = arriving.recv().await {
                match event {
                    FeedEvent::Message(message) => {
                        if let Some(route) = lock(&handed).get(&message.sid) {
                            let _ = route.to.send(message);
                        }
                    }
                    // The answers to requests sent on that connection never come: their readers
                    // hear it at once (and open again) instead of waiting out their timeouts.
                    FeedEvent::Lost { generation } => lock(&handed).retain(|_, route| route.generation > generation),
                    FeedEvent::Connected | FeedEvent::LeaderElected => {}
                }
            }
        });
        let inbox_prefix = format!("{}.replies.{}", settings.nats_inbox_prefix, crate::id::random_id(12));
        Replies { feed, routes, inbox_prefix }
    }

    /// A reply subject of its own (`inbox` and every subject under it) and what arrives there,
    /// until the [`ReplyInbox`] is dropped.
    pub(crate) fn open(&self) -> ReplyInbox {
        let (sid, generation) = (self.feed.next_sid(), self.feed.generation());
        let (to, arriving) = mpsc::unbounded_channel();
        lock(&self.routes).insert(sid, Route { generation, to });
        let inbox = format!("{}.{sid}", self.inbox_prefix);
        self.feed.subscribe(sid, format!("{inbox}.>"));
        ReplyInbox { replies: self.clone(), sid, generation, inbox, arriving }
    }

    /// Whether the connection is up right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.feed.is_connected()
    }

    /// A request with one answer, whole (headers, status).
    pub(crate) async fn request(&self, subject: String, payload: Bytes) -> Result<Delivered, RequestError> {
        self.feed.request_message(subject, payload).await
    }
}

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
    routes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A reply subject and what arrives there.
pub(crate) struct ReplyInbox {
    replies: Replies,
    sid: u64,
    /// The connection it opened on: answers come only while that one lives.
    generation: u64,
    pub(crate) inbox: String,
    arriving: mpsc::UnboundedReceiver<Delivered>,
}

impl ReplyInbox {
    /// Publishes a request whose answers come to `reply` (this inbox, or a subject under it); sent
    /// after the inbox's subscription. Fails once the connection it opened on is down.
    pub(crate) fn publish(&self, subject: String, reply: String, payload: Bytes) -> Result<(), RequestError> {
        let feed = &self.replies.feed;
        if !feed.is_connected() || feed.generation() != self.generation {
            return Err(RequestError::Disconnected);
        }
        self.replies.feed.publish(subject, reply, payload);
        Ok(())
    }

    /// The next answer; none once the connection it opened on was lost.
    pub(crate) async fn next(&mut self) -> Option<Delivered> {
        self.arriving.recv().await
    }
}

impl Drop for ReplyInbox {
    fn drop(&mut self) {
        lock(&self.replies.routes).remove(&self.sid);
        self.replies.feed.unsubscribe(self.sid);
    }
}
