//! Herald's push functions: small stateless handlers run by any number of copies of the
//! `herald-functions` binary, sharing work through NATS queue groups and JetStream durable
//! consumers.
//!
//! A [`Function`] is a handler plus a trigger:
//! - [`Function::rpc`]: request/reply on `herald.fn.<name>` ([`rpc`]), called by clients' `rpc`
//!   frames through the gateway, registered as a NATS micro service endpoint;
//! - [`Function::lifecycle`]: the gateways' connect and disconnect events ([`events`]);
//! - [`Function::events`]: business events from the events stream, at least once, with retries
//!   ([`retry`]) and dead letters ([`durable`]).
//!
//! [`Runtime`] starts functions and stops them ([`runtime`]); [`Pusher`] pushes idempotently
//! ([`push`]).
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
pub mod streams;

pub use config::Config;
pub use error::HandlerError;
pub use events::{Event, EventHandler};
pub use function::Function;
pub use push::{PushAck, PushError, Pusher};
pub use rpc::{RpcHandler, RpcReply, RpcRequest};
pub use runtime::{Runtime, StartError};
