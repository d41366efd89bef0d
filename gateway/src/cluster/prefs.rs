//! Muted kinds: each user's entry in KV `herald-prefs` (`{"muted":["marketing",...]}`), loaded when
//! the user's first socket opens here and followed live through one watch per gateway, so a change
//! takes effect without a reconnect.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use herald_shared::id::{kv_key, kv_key_decode};
use herald_shared::subject::KV_PREFS;
use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::registry::Registry;
use crate::cluster::user::LocalUser;
use crate::cluster::watch::{Backoff, watch_from};
use crate::delivery::router::Router;
use crate::http::health::Health;

#[derive(Deserialize, Default)]
struct PrefsEntry {
    #[serde(default)]
    muted: Vec<String>,
}

pub(crate) struct Prefs {
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
}

fn muted_kinds(value: &[u8]) -> Vec<String> {
    serde_json::from_slice::<PrefsEntry>(value).map(|entry| entry.muted).unwrap_or_default()
}

impl Prefs {
    pub(crate) fn new(js: jetstream::Context) -> Prefs {
        Prefs { js, bucket: OnceCell::new() }
    }

    async fn bucket(&self) -> Result<&kv::Store, String> {
        self.bucket.get_or_try_init(|| async { self.js.get_key_value(KV_PREFS).await }).await.map_err(|e| e.to_string())
    }

    /// The kinds `user` muted, read from KV now (for users who may have no socket here).
    pub(crate) async fn muted(&self, user: &str) -> Result<Vec<Box<str>>, String> {
        let entry = self.bucket().await?.entry(kv_key(user)).await.map_err(|e| e.to_string())?;
        Ok(match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                muted_kinds(&entry.value).into_iter().map(String::into_boxed_str).collect()
            }
            _ => Vec::new(),
        })
    }

    /// Loads `user`'s muted kinds into `local`, the user's state on this gateway.
    pub(crate) async fn load(&self, local: &LocalUser, user: &str) -> Result<(), String> {
        let entry = self.bucket().await?.entry(kv_key(user)).await.map_err(|e| e.to_string())?;
        if let Some(entry) = entry
            && entry.operation == kv::Operation::Put
        {
            local.set_muted(&muted_kinds(&entry.value), entry.revision);
        }
        Ok(())
    }

    /// Follows every change to the bucket and applies those of local users, until `shutdown`. A
    /// broken watch resumes after the last revision it saw, so no change is missed.
    pub(crate) async fn watch(
        self: Arc<Self>,
        router: Router,
        registry: Arc<Registry>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        let mut last_revision = 0;
        while !shutdown.is_cancelled() {
            let result = self.follow(&router, &registry, &health, &mut last_revision, &shutdown).await;
            let was_running = health.prefs_watch.swap(false, Ordering::AcqRel);
            // Stopping: the connection's drain ends the watch, as it should.
            if let Err(error) = result
                && !shutdown.is_cancelled()
            {
                if backoff.failed(was_running) {
                    warn!(%error, "prefs watch restarting");
                } else {
                    debug!(%error, "prefs watch not running yet");
                }
            }
            backoff.wait(&shutdown).await;
        }
    }

    async fn follow(
        &self,
        router: &Router,
        registry: &Registry,
        health: &Health,
        last_revision: &mut u64,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let mut recreated = health.recreations();
        let mut updates = watch_from(self.bucket().await?, *last_revision).await.map_err(|e| e.to_string())?;
        health.prefs_watch.store(true, Ordering::Release);
        loop {
            let entry = tokio::select! {
                entry = updates.next() => entry,
                _ = recreated.changed() => return Err("the bucket was recreated".into()),
                _ = shutdown.cancelled() => return Ok(()),
            };
            let entry = entry.ok_or("watch ended")?.map_err(|e| e.to_string())?;
            *last_revision = entry.revision;
            let Some(user) = kv_key_decode(&entry.key) else { continue };
            if !registry.has_user(&user) {
                continue;
            }
            let kinds = match entry.operation {
                kv::Operation::Put => muted_kinds(&entry.value),
                kv::Operation::Delete | kv::Operation::Purge => Vec::new(),
            };
            router.set_muted(user.into(), kinds, entry.revision).await;
        }
    }
}
