//! The sessions open on this gateway, by connection and by user: what session policies, presence,
//! preferences and operators ask about. Not on the message path (the router has its own tables).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::close::Close;
use crate::delivery::mailbox::{Event, Mailbox};

/// One open session.
#[derive(Clone)]
pub(crate) struct LocalSession {
    pub(crate) conn: String,
    pub(crate) user: Arc<str>,
    pub(crate) mailbox: Arc<Mailbox>,
    /// What operators see about it (`GET /v1/users/<user>`).
    pub(crate) about: Arc<SocketInfo>,
}

/// What an operator sees of a socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct SocketInfo {
    pub(crate) conn: String,
    pub(crate) device: String,
    pub(crate) address: String,
    /// When it was accepted (RFC 3339).
    pub(crate) since: String,
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_conn: HashMap<String, LocalSession>,
    by_user: HashMap<Arc<str>, Vec<String>>,
}

/// Counts for presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) users: usize,
    pub(crate) connections: usize,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, session: LocalSession) {
        let mut inner = self.lock();
        // Sized for one: a user rarely has two connections on one gateway.
        inner.by_user.entry(session.user.clone()).or_insert_with(|| Vec::with_capacity(1)).push(session.conn.clone());
        inner.by_conn.insert(session.conn.clone(), session);
    }

    pub(crate) fn remove(&self, conn: &str) {
        let mut inner = self.lock();
        let Some(session) = inner.by_conn.remove(conn) else { return };
        if let Some(conns) = inner.by_user.get_mut(&session.user) {
            conns.retain(|c| c != conn);
            if conns.is_empty() {
                inner.by_user.remove(&session.user);
            }
        }
    }

    /// The sessions of `user` on this gateway.
    pub(crate) fn of_user(&self, user: &str) -> Vec<LocalSession> {
        let inner = self.lock();
        inner
            .by_user
            .get(user)
            .map(|conns| conns.iter().filter_map(|c| inner.by_conn.get(c).cloned()).collect())
            .unwrap_or_default()
    }

    /// Whether `user` has a session here.
    pub(crate) fn has_user(&self, user: &str) -> bool {
        self.lock().by_user.contains_key(user)
    }

    /// The users with a session here, each once.
    pub(crate) fn users(&self) -> Vec<Arc<str>> {
        self.lock().by_user.keys().cloned().collect()
    }

    pub(crate) fn counts(&self) -> Counts {
        let inner = self.lock();
        Counts { users: inner.by_user.len(), connections: inner.by_conn.len() }
    }

    /// Closes every session on this gateway with `close` (the gateway stops).
    pub(crate) fn close_all(&self, close: &Close) {
        for session in self.lock().by_conn.values() {
            session.mailbox.close(close.clone());
        }
    }

    /// Gives `event` to the sessions of `user`'s `device` other than connection `except`; returns
    /// how many.
    pub(crate) fn tell_device(&self, user: &str, device: &str, except: &str, event: impl Fn() -> Event) -> usize {
        let sessions = self.of_user(user);
        let told = sessions.iter().filter(|session| session.about.device == device && session.conn != except);
        told.map(|session| session.mailbox.push_event(event())).count()
    }

    /// Closes every session of `user` (or only connection `conn`) with `close`; returns how many.
    pub(crate) fn close_matching(&self, user: &str, conn: Option<&str>, close: &Close) -> usize {
        let sessions: Vec<LocalSession> =
            self.of_user(user).into_iter().filter(|s| conn.is_none_or(|c| c == s.conn)).collect();
        for session in &sessions {
            session.mailbox.close(close.clone());
        }
        sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(conn: &str, user: &str) -> LocalSession {
        on_device(conn, user, "d")
    }

    fn on_device(conn: &str, user: &str, device: &str) -> LocalSession {
        let about =
            SocketInfo { conn: conn.into(), device: device.into(), address: "::1".into(), since: String::new() };
        LocalSession {
            conn: conn.into(),
            user: user.into(),
            mailbox: Arc::new(Mailbox::new(64)),
            about: Arc::new(about),
        }
    }

    #[test]
    fn tracks_sessions_by_user() {
        let registry = Registry::default();
        registry.insert(session("c1", "alice"));
        registry.insert(session("c2", "alice"));
        registry.insert(session("c3", "bob"));
        assert_eq!(registry.counts(), Counts { users: 2, connections: 3 });
        let mut users = registry.users();
        users.sort();
        assert_eq!(users, [Arc::from("alice"), Arc::from("bob")]);
        assert_eq!(registry.of_user("alice").len(), 2);
        assert_eq!(
            registry.close_matching("alice", Some("c2"), &Close::new(crate::close::CloseCode::Disconnected, "bye")),
            1
        );
        assert_eq!(
            registry.of_user("alice").iter().filter(|s| s.mailbox.inbox().close_requested().is_some()).count(),
            1
        );
        assert_eq!(registry.close_matching("bob", None, &Close::new(crate::close::CloseCode::Disconnected, "bye")), 1);
        registry.remove("c1");
        registry.remove("c2");
        assert!(!registry.has_user("alice"));
        assert_eq!(registry.counts(), Counts { users: 1, connections: 1 });
    }

    #[test]
    fn tells_a_devices_sessions_except_the_one_named() {
        let registry = Registry::default();
        registry.insert(on_device("noted", "ann", "phone"));
        registry.insert(on_device("resumed", "ann", "phone"));
        registry.insert(on_device("laptop", "ann", "laptop"));
        registry.insert(on_device("other", "bob", "phone"));
        assert_eq!(registry.tell_device("ann", "phone", "noted", || Event::Repair), 1);
        let told = |conn: &str| {
            let sessions = registry.of_user("ann").into_iter().chain(registry.of_user("bob"));
            sessions.filter(|s| s.conn == conn).map(|s| s.mailbox.inbox().take_events().len()).sum::<usize>()
        };
        assert_eq!(["noted", "resumed", "laptop", "other"].map(told), [0, 1, 0, 0]);
    }
}
