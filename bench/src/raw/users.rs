//! The unicast path: which mailboxes belong to which user, and the feed that moves every
//! `push.user.<id>` message into the mailboxes of that user's sockets.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;

use super::frame::text_frame;
use super::mailbox::Mailbox;

/// The mailboxes of every user with a socket. The feed reads it under the read lock; sockets come
/// and go under the write lock.
#[derive(Default)]
pub(crate) struct Users {
    mailboxes: RwLock<HashMap<String, Vec<Arc<Mailbox>>>>,
}

/// A socket's mailbox, listed under its user until dropped.
pub(crate) struct Registration {
    users: Arc<Users>,
    user: String,
    mailbox: Arc<Mailbox>,
}

impl Users {
    /// Lists a new mailbox (of `limit` bytes) under `user`.
    pub(crate) fn register(self: &Arc<Users>, user: String, limit: usize) -> Registration {
        let mailbox = Arc::new(Mailbox::new(limit));
        let mut mailboxes = self.mailboxes.write().unwrap_or_else(|p| p.into_inner());
        mailboxes.entry(user.clone()).or_default().push(mailbox.clone());
        drop(mailboxes);
        Registration { users: self.clone(), user, mailbox }
    }

    /// Queues `payload`, as a frame, in the mailbox of every socket of `user`.
    pub(crate) fn send(&self, user: &str, payload: &[u8]) {
        let mailboxes = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
        let Some(sockets) = mailboxes.get(user) else { return };
        let frame = text_frame(payload);
        for mailbox in sockets {
            mailbox.push(frame.clone());
        }
    }
}

impl Registration {
    /// The mailbox.
    pub(crate) fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut mailboxes = self.users.mailboxes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(sockets) = mailboxes.get_mut(&self.user) {
            sockets.retain(|mailbox| !Arc::ptr_eq(mailbox, &self.mailbox));
            if sockets.is_empty() {
                mailboxes.remove(&self.user);
            }
        }
    }
}

/// Moves every message of the `push.user.*` subscription to the mailboxes of its user.
pub(crate) async fn feed(mut subscription: async_nats::Subscriber, users: Arc<Users>) {
    while let Some(message) = subscription.next().await {
        if let Some(user) = message.subject.as_str().strip_prefix("push.user.") {
            users.send(user, &message.payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::batch::Batch;

    fn taken(registration: &Registration) -> usize {
        let mut batch = Batch::new(100, 1 << 20);
        registration.mailbox().take(&mut batch).unwrap();
        batch.frames().len()
    }

    #[test]
    fn sends_to_every_socket_of_the_user_only() {
        let users = Arc::new(Users::default());
        let (a1, a2, b) =
            (users.register("a".into(), 1000), users.register("a".into(), 1000), users.register("b".into(), 1000));
        users.send("a", b"hi");
        users.send("nobody", b"hi");
        assert_eq!((taken(&a1), taken(&a2), taken(&b)), (1, 1, 0));
    }

    #[test]
    fn forgets_dropped_sockets() {
        let users = Arc::new(Users::default());
        let first = users.register("a".into(), 1000);
        let second = users.register("a".into(), 1000);
        drop(first);
        users.send("a", b"hi");
        assert_eq!(taken(&second), 1);
        drop(second);
        assert!(users.mailboxes.read().unwrap().is_empty());
    }
}
