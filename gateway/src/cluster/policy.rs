//! Session policies, enforced across every gateway through KV `herald-sessions`.
//!
//! The policy itself is the cluster's, in KV `herald-config` (key `session_policy`): the first
//! gateway to start writes its own setting there, every gateway adopts what it finds before it
//! takes its first socket, and keeps it until it restarts (so that claims made under one policy are
//! released under the same one). An operator changes it with `nats kv put` and a rolling restart.
//!
//! - `multi`: the key is `<k(user)>.<k(device)>`; `single`: `<k(user)>`. A new session puts its
//!   connection id under its key; every gateway watches the bucket, and a session whose key gets a
//!   newer revision from another connection is closed with 4009. The KV revision orders concurrent
//!   connects, so exactly the newest survives wherever each one is.
//! - `reject`: the key is `<k(user)>`, created atomically before the upgrade; a second connect finds
//!   it and gets 409. The owner refreshes it while open and deletes it at close; entries expire
//!   after `sessions_max_age` if a gateway dies. An entry `single` left under the key (after the
//!   cluster switched policies) is taken over, not a reason to refuse.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::id::kv_key;
use herald_shared::stream::{StreamSettings, ensure_config_bucket};
use herald_shared::subject::{CONFIG_SESSION_POLICY, KV_SESSIONS};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::close::{Close, CloseCode};
use crate::cluster::watch::{Backoff, watch_from};
use crate::config::SessionPolicy;
use crate::delivery::mailbox::Mailbox;
use crate::http::health::Health;

/// A connect refused by the `reject` policy, or a KV failure while checking.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("user already connected (session policy reject)")]
    Taken,
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

struct Claim {
    conn: String,
    mailbox: Arc<Mailbox>,
    /// Our own revision, once known.
    revision: Option<u64>,
    /// The newest revision another connection wrote while ours was unknown.
    newest_other: u64,
}

pub(crate) struct Policies {
    /// This gateway's setting: what it writes to `herald-config` if the cluster has no policy yet.
    configured: SessionPolicy,
    /// The cluster's policy, once read (before the gateway is ready).
    adopted: OnceLock<SessionPolicy>,
    settings: StreamSettings,
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
    /// Claims of local sessions by KV key.
    claims: Mutex<HashMap<String, Vec<Claim>>>,
}

impl Policies {
    pub(crate) fn new(configured: SessionPolicy, settings: StreamSettings, js: jetstream::Context) -> Policies {
        Policies {
            configured,
            adopted: OnceLock::new(),
            settings,
            js,
            bucket: OnceCell::new(),
            claims: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force: the cluster's once adopted (sockets are only taken after that).
    pub(crate) fn policy(&self) -> SessionPolicy {
        self.adopted.get().copied().unwrap_or(self.configured)
    }

    /// Reads the cluster's policy from `herald-config`, writing this gateway's setting first if
    /// there is none; a different one found there wins over the setting.
    async fn adopt(&self) -> Result<SessionPolicy, PolicyError> {
        if let Some(policy) = self.adopted.get() {
            return Ok(*policy);
        }
        let unavailable = |e: &dyn std::fmt::Display| PolicyError::Unavailable(format!("herald-config: {e}"));
        let bucket = ensure_config_bucket(&self.js, &self.settings).await.map_err(|e| unavailable(&e))?;
        let mine = Bytes::from_static(self.configured.as_str().as_bytes());
        let policy = match bucket.create(CONFIG_SESSION_POLICY, mine).await {
            Ok(_) => self.configured,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let value = bucket.get(CONFIG_SESSION_POLICY).await.map_err(|e| unavailable(&e))?;
                let text = value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                match SessionPolicy::parse(text.trim()) {
                    Some(policy) => policy,
                    None => {
                        warn!(value = %text, "herald-config session_policy is not multi, single or reject: using this gateway's setting");
                        self.configured
                    }
                }
            }
            Err(e) => return Err(unavailable(&e)),
        };
        if policy != self.configured {
            warn!(
                cluster = policy.as_str(),
                setting = self.configured.as_str(),
                "following the cluster's session policy"
            );
        }
        info!(policy = policy.as_str(), "session policy");
        Ok(*self.adopted.get_or_init(|| policy))
    }

    fn key(&self, user: &str, device: &str) -> String {
        match self.policy() {
            SessionPolicy::Multi => format!("{}.{}", kv_key(user), kv_key(device)),
            SessionPolicy::Single | SessionPolicy::Reject => kv_key(user),
        }
    }

    async fn bucket(&self) -> Result<&kv::Store, PolicyError> {
        self.bucket
            .get_or_try_init(|| async { self.js.get_key_value(KV_SESSIONS).await })
            .await
            .map_err(|e| PolicyError::Unavailable(e.to_string()))
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Claim>>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before the upgrade: under `reject`, takes the user's slot for `conn` or refuses.
    pub(crate) async fn reserve(&self, user: &str, conn: &str) -> Result<(), PolicyError> {
        if self.policy() != SessionPolicy::Reject {
            return Ok(());
        }
        let bucket = self.bucket().await?;
        let key = kv_key(user);
        match bucket.create(&key, slot(conn)).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => take_over_leftover(bucket, &key, conn).await,
            Err(e) => Err(PolicyError::Unavailable(e.to_string())),
        }
    }

    /// Once the session is open: under `multi` and `single`, announces it so older sessions with
    /// the same key close, wherever they are (and closes this one if a newer one already exists).
    /// Under `multi`, a session that `shares_device` neither closes nor is closed by the others.
    pub(crate) async fn claim(&self, user: &str, device: &str, conn: &str, mailbox: Arc<Mailbox>, shares_device: bool) {
        if shares_device && self.policy() == SessionPolicy::Multi {
            return;
        }
        let key = self.key(user, device);
        let claim = Claim { conn: conn.to_string(), mailbox, revision: None, newest_other: 0 };
        // Sized for one: a key rarely has two sessions at once.
        self.claims().entry(key.clone()).or_insert_with(|| Vec::with_capacity(1)).push(claim);
        if self.policy() == SessionPolicy::Reject {
            return;
        }
        let revision = match self.bucket().await {
            Ok(bucket) => bucket.put(&key, Bytes::from(conn.to_string())).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let revision = match revision {
            Ok(revision) => revision,
            Err(error) => {
                warn!(%key, %error, "session policy not enforced for this connection");
                return;
            }
        };
        let mut claims = self.claims();
        if let Some(claim) = claims.get_mut(&key).and_then(|list| list.iter_mut().find(|c| c.conn == conn)) {
            claim.revision = Some(revision);
            if claim.newest_other > revision {
                claim.mailbox.close(replaced());
            }
        }
    }

    /// The session closed: forget its claim (and free the slot under `reject`).
    pub(crate) async fn release(&self, user: &str, device: &str, conn: &str) {
        let key = self.key(user, device);
        {
            let mut claims = self.claims();
            if let Some(list) = claims.get_mut(&key) {
                list.retain(|c| c.conn != conn);
                if list.is_empty() {
                    claims.remove(&key);
                }
            }
        }
        if self.policy() == SessionPolicy::Reject {
            self.free_slot(&key, conn).await;
        }
    }

    /// Deletes the `reject` slot if `conn` still holds it.
    pub(crate) async fn free_slot(&self, key: &str, conn: &str) {
        let Ok(bucket) = self.bucket().await else { return };
        if let Ok(Some(entry)) = bucket.entry(key).await
            && entry.operation == kv::Operation::Put
            && entry.value == slot(conn)
        {
            let _ = bucket.delete_expect_revision(key, Some(entry.revision)).await;
        }
    }

    /// Frees a slot reserved for a connection that never opened.
    pub(crate) async fn cancel_reservation(&self, user: &str, conn: &str) {
        if self.policy() == SessionPolicy::Reject {
            self.free_slot(&kv_key(user), conn).await;
        }
    }

    /// Keeps the policy working until `shutdown`: watches claims (`multi`, `single`) or refreshes
    /// the slots of local sessions (`reject`). `health` says whether it is running.
    pub(crate) async fn run(self: Arc<Self>, health: Arc<Health>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut last_revision = 0;
        while !shutdown.is_cancelled() {
            let result = match self.adopt().await {
                Ok(SessionPolicy::Reject) => self.refresh_slots(&health, &shutdown).await,
                Ok(_) => self.watch_claims(&health, &mut last_revision, &shutdown).await,
                Err(error) => Err(error),
            };
            let was_running = health.policy_watch.swap(false, Ordering::AcqRel);
            // Stopping: the connection's drain ends the watch, as it should.
            if let Err(error) = result
                && !shutdown.is_cancelled()
            {
                if backoff.failed(was_running) {
                    warn!(%error, "session policy watch restarting");
                } else {
                    debug!(%error, "session policy watch not running yet");
                }
            }
            backoff.wait(&shutdown).await;
        }
    }

    async fn watch_claims(
        &self,
        health: &Health,
        last_revision: &mut u64,
        shutdown: &CancellationToken,
    ) -> Result<(), PolicyError> {
        let mut recreated = health.recreations();
        let mut updates = watch_from(self.bucket().await?, *last_revision)
            .await
            .map_err(|e| PolicyError::Unavailable(e.to_string()))?;
        health.policy_watch.store(true, Ordering::Release);
        loop {
            let entry = tokio::select! {
                entry = updates.next() => entry,
                _ = recreated.changed() => return Err(PolicyError::Unavailable("the bucket was recreated".into())),
                _ = shutdown.cancelled() => return Ok(()),
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(PolicyError::Unavailable(e.to_string())),
                None => return Err(PolicyError::Unavailable("watch ended".into())),
            };
            *last_revision = entry.revision;
            if entry.operation == kv::Operation::Put {
                self.newer_claim(&entry.key, &entry.value, entry.revision);
            }
        }
    }

    /// Another connection claimed `key` at `revision`: older local sessions under it are replaced.
    fn newer_claim(&self, key: &str, conn: &[u8], revision: u64) {
        let mut claims = self.claims();
        let Some(list) = claims.get_mut(key) else { return };
        for claim in list.iter_mut().filter(|c| c.conn.as_bytes() != conn) {
            match claim.revision {
                Some(own) if own < revision => {
                    info!(%key, conn = %claim.conn, "replaced by a newer session");
                    claim.mailbox.close(replaced());
                }
                Some(_) => {}
                None => claim.newest_other = claim.newest_other.max(revision),
            }
        }
    }

    async fn refresh_slots(&self, health: &Health, shutdown: &CancellationToken) -> Result<(), PolicyError> {
        let bucket = self.bucket().await?;
        health.policy_watch.store(true, Ordering::Release);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.sessions_max_age / 4) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            let slots: Vec<(String, String)> = self
                .claims()
                .iter()
                .flat_map(|(key, list)| list.iter().map(move |c| (key.clone(), c.conn.clone())))
                .collect();
            for (key, conn) in slots {
                if let Err(error) = bucket.put(&key, slot(&conn)).await {
                    warn!(%key, %error, "session slot not refreshed");
                }
            }
        }
    }
}

/// The value of a `reject` slot. It is marked because `single` claims the same key (`<k(user)>`)
/// without ever deleting it: after a switch from `single` to `reject`, such a leftover must not
/// refuse the user until it expires.
fn slot(conn: &str) -> Bytes {
    Bytes::from(format!("{SLOT_MARK}{conn}"))
}

const SLOT_MARK: &str = "reject ";

/// `key` exists: refuses if it is another connection's `reject` slot, takes it over if it is an
/// entry `single` left (a session still open on a gateway that runs `single` until its restart is
/// then replaced, as under `single`).
async fn take_over_leftover(bucket: &kv::Store, key: &str, conn: &str) -> Result<(), PolicyError> {
    let unavailable = |e: &dyn std::fmt::Display| PolicyError::Unavailable(e.to_string());
    let entry = bucket.entry(key).await.map_err(|e| unavailable(&e))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        // Gone meanwhile: try once more.
        return match bucket.create(key, slot(conn)).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(PolicyError::Taken),
            Err(e) => Err(unavailable(&e)),
        };
    };
    if entry.value.starts_with(SLOT_MARK.as_bytes()) {
        return Err(PolicyError::Taken);
    }
    info!(%key, "taking over a session entry left by another session policy");
    match bucket.update(key, slot(conn), entry.revision).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(PolicyError::Taken),
        Err(e) => Err(unavailable(&e)),
    }
}

fn replaced() -> Close {
    Close::new(CloseCode::Replaced, "replaced by a newer session")
}
