//! What this gateway knows about a user who has sockets on it, shared by those sockets' sessions:
//! the kinds the user muted (from KV `herald-prefs`, followed live).

use std::sync::{Arc, Mutex};

/// A user with at least one session on this gateway.
#[derive(Debug, Default)]
pub(crate) struct LocalUser {
    muted: Mutex<Muted>,
}

#[derive(Debug, Default)]
struct Muted {
    /// The KV revision the kinds come from; older revisions are ignored.
    revision: u64,
    kinds: Arc<[Box<str>]>,
}

impl LocalUser {
    /// The kinds the user muted: their `msg`s are not delivered.
    pub(crate) fn muted(&self) -> Arc<[Box<str>]> {
        self.lock().kinds.clone()
    }

    /// Sets the muted kinds as of KV `revision`, unless a newer revision is known.
    pub(crate) fn set_muted(&self, kinds: &[String], revision: u64) {
        let mut muted = self.lock();
        if muted.revision > revision {
            return;
        }
        muted.revision = revision;
        muted.kinds = kinds.iter().map(|kind| kind.as_str().into()).collect();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Muted> {
        self.muted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_revision_does_not_undo_a_newer_one() {
        let user = LocalUser::default();
        assert!(user.muted().is_empty());
        user.set_muted(&["ads".into()], 5);
        user.set_muted(&[], 4);
        assert_eq!(&*user.muted(), &["ads".into()] as &[Box<str>]);
        user.set_muted(&[], 6);
        assert!(user.muted().is_empty());
    }
}
