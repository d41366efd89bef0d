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
    let nats = |e: &dyn std::fmt::Display| StartError::Nats(e.to_string());
    let addresses = config.nats.addresses().map_err(|e| nats(&e))?;
    let client = config.nats.options("herald-functions").await.map_err(|e| nats(&e))?.connect(addresses).await;
    let client = client.map_err(|e| nats(&e))?;
    streams::ensure_push_stream(&async_nats::jetstream::new(client.clone()), config).await?;
    let functions = builtin::functions(config, &client).await?;
    Runtime::start(client, config, functions).await
}
