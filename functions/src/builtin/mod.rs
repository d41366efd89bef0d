//! The built-in functions, enabled by the `builtins` setting:
//!
//! - [`notify`]: business events on `events.notify.>` become pushes;
//! - [`prefs`]: `prefs.get` / `prefs.set`, the caller's muted kinds;
//! - [`presence`]: who is online, counted across every gateway;
//! - [`relay`]: business events POSTed to an HTTP endpoint.

pub mod notify;
pub mod prefs;
pub mod presence;
pub mod relay;

use async_nats::jetstream;
use herald_shared::stream::prefs_bucket;
use tracing::info;

use crate::config::{BUILTINS, Config};
use crate::function::Function;
use crate::push::Pusher;
use crate::runtime::StartError;

/// The built-in functions `config` enables, with what they need (the prefs bucket) set up.
pub async fn functions(config: &Config, client: &async_nats::Client) -> Result<Vec<Function>, StartError> {
    if let Some(unknown) = config.builtins.iter().find(|name| !BUILTINS.contains(&name.as_str())) {
        return Err(StartError::Config(format!("unknown built-in function {unknown:?}; known: {BUILTINS:?}")));
    }
    let js = jetstream::new(client.clone());
    let mut functions = Vec::new();
    if config.builtin_enabled("notify") {
        functions.push(notify::function(config, Pusher::new(js.clone())));
    }
    if config.builtin_enabled("prefs") {
        let prefs = prefs_bucket(&js, &config.stream).await.map_err(|e| StartError::Nats(format!("KV bucket: {e}")))?;
        functions.extend(prefs::functions(prefs));
    }
    if config.builtin_enabled("presence") {
        functions.push(presence::function(config, client.clone()));
    }
    if config.builtin_enabled("relay") {
        match &config.relay_url {
            Some(_) => functions.push(relay::function(config)?),
            // The default configuration: relay is on only where an endpoint is configured.
            None => info!("relay off: no relay_url"),
        }
    }
    Ok(functions)
}
