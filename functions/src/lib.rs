//! Herald's push functions: small stateless handlers run by any number of copies of the
//! `herald-functions` binary, sharing work through NATS queue groups and JetStream durable
//! consumers.
//!
//! A [`Function`] is a handler plus a trigger:
//! - [`Function::rpc`]: request/reply on `herald.fn.<name>` ([`rpc`]), called by clients' `rpc`
//!   frames through the gateway, an endpoint of the runtime's NATS micro service ([`service`],
//!   which lists every function);
//! - [`Function::lifecycle`]: the gateways' connect and disconnect events ([`events`]);
//! - [`Function::events`]: business events from the events stream, at least once, with retries
//!   ([`retry`]) and dead letters ([`durable`]).
//!
//! [`Runtime`] starts functions and stops them ([`runtime`]); [`Pusher`] pushes idempotently
//! ([`push`]); [`builtin`] holds `notify`, `prefs`, `presence` and `relay`; [`start`] runs the
//! built-in functions as the binary does.
//!
//! ```no_run
//! use herald_functions::{Config, Function, Runtime, RpcReply, RpcRequest};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let hello = Function::rpc("hello", |request: RpcRequest| async move {
//!     RpcReply::json(&serde_json::json!({"hello": request.user()?}))
//! });
//! let runtime = Runtime::start(client, &Config::default(), vec![hello]).await?;
//! runtime.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod builtin;
pub mod config;
pub mod durable;
mod error;
pub mod events;
mod function;
mod metrics;
pub mod push;
pub mod retry;
pub mod rpc;
pub mod runtime;
pub mod service;
pub mod streams;
mod unreadable;
mod worker;

pub use config::Config;
pub use error::HandlerError;
pub use events::{Event, EventHandler};
pub use function::Function;
pub use push::{PushAck, PushError, Pusher};
pub use rpc::{RpcHandler, RpcReply, RpcRequest};
pub use runtime::{Runtime, StartError};

/// Connects to NATS as `config` says, makes sure the `HERALD` stream exists, and starts the
/// built-in functions `config` enables (the binary's work).
pub async fn start(config: &Config) -> Result<Runtime, StartError> {
    config.check().map_err(StartError::Config)?;
    let client = connect(config).await?;
    streams::ensure_push_stream(&async_nats::jetstream::new(client.clone()), config).await?;
    let functions = builtin::functions(config, &client).await?;
    Runtime::start(client, config, functions).await
}

/// How long a start waits for NATS before it says it cannot connect (and is tried again).
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection to NATS, once it is up: a NATS out of reach is an error naming the URL and why
/// (each start attempt says so), not a start that waits in silence on its first requests.
async fn connect(config: &Config) -> Result<async_nats::Client, StartError> {
    use std::sync::{Arc, Mutex};
    // A URL that cannot be read or a credentials file that cannot be loaded will not be better on
    // the next attempt: the process ends (status 2), as the gateway's does.
    let setting = |e: &dyn std::fmt::Display| StartError::Config(format!("bad NATS settings: {e}"));
    let addresses = config.nats.addresses().map_err(|e| setting(&e))?;
    let connected = Arc::new(tokio::sync::Notify::new());
    let last_error = Arc::new(Mutex::new(None::<String>));
    let on_event = {
        let (connected, last_error) = (connected.clone(), last_error.clone());
        Arc::new(move |event: &async_nats::Event| match event {
            async_nats::Event::Connected => connected.notify_one(),
            // A refused password comes as the server's error, an unreachable server as the client's.
            async_nats::Event::ClientError(_) | async_nats::Event::ServerError(_) => {
                *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(event.to_string());
            }
            _ => {}
        })
    };
    let options = config.nats.options_with_events("herald-functions", on_event).await.map_err(|e| setting(&e))?;
    let client = options.connect(addresses).await.map_err(|e| StartError::Nats(e.to_string()))?;
    let up = client.connection_state() == async_nats::connection::State::Connected;
    if !up && tokio::time::timeout(CONNECT_WAIT, connected.notified()).await.is_err() {
        let why = last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let why = why.unwrap_or_else(|| "no answer".into());
        return Err(StartError::Nats(format!("cannot connect to NATS at {}: {why}", config.nats.nats_url)));
    }
    Ok(client)
}
