//! Which sockets a message goes to: every socket for `push.all`, a user's sockets for
//! `push.user.<id>`. Feeds read it under a read lock; sockets come and go under the write lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use super::outbound::Outbound;

#[derive(Default)]
pub(crate) struct Registry {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Every socket, in a vector to iterate fast.
    all: Vec<(u64, Arc<Outbound>)>,
    /// Position of each socket in `all`, to remove it in O(1).
    position: HashMap<u64, usize>,
    users: HashMap<String, Vec<(u64, Arc<Outbound>)>>,
}

impl Registry {
    /// Adds a socket (of `user`, if given); returns its id.
    pub(crate) fn add(&self, outbound: Arc<Outbound>, user: Option<&str>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let at = inner.all.len();
        inner.position.insert(id, at);
        inner.all.push((id, outbound.clone()));
        if let Some(user) = user {
            inner.users.entry(user.to_string()).or_default().push((id, outbound));
        }
        id
    }

    /// Removes socket `id` (of `user`).
    pub(crate) fn remove(&self, id: u64, user: Option<&str>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = inner.position.remove(&id) {
            inner.all.swap_remove(at);
            if let Some((moved, _)) = inner.all.get(at) {
                let moved = *moved;
                inner.position.insert(moved, at);
            }
        }
        if let Some(user) = user
            && let Some(sockets) = inner.users.get_mut(user)
        {
            sockets.retain(|(socket, _)| *socket != id);
            if sockets.is_empty() {
                inner.users.remove(user);
            }
        }
    }

    /// Queues `frame` on every socket.
    pub(crate) fn broadcast(&self, frame: &Bytes) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        for (_, outbound) in &inner.all {
            outbound.push(frame);
        }
    }

    /// Queues `frame` on the sockets of `user`.
    pub(crate) fn unicast(&self, user: &str, frame: &Bytes) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        for (_, outbound) in inner.users.get(user).into_iter().flatten() {
            outbound.push(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_everyone_or_to_a_user() {
        let registry = Registry::default();
        let (a, b) = (Arc::new(Outbound::new(1000)), Arc::new(Outbound::new(1000)));
        let id_a = registry.add(a.clone(), Some("u1"));
        registry.add(b.clone(), None);
        registry.broadcast(&Bytes::from_static(b"all"));
        registry.unicast("u1", &Bytes::from_static(b"one"));
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        a.take(&mut got_a, 10, 1000);
        b.take(&mut got_b, 10, 1000);
        assert_eq!((got_a.len(), got_b.len()), (2, 1));
        registry.remove(id_a, Some("u1"));
        registry.broadcast(&Bytes::from_static(b"all"));
        got_a.clear();
        a.take(&mut got_a, 10, 1000);
        assert!(got_a.is_empty());
    }
}
