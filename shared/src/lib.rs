//! Herald's wire contract, shared by the gateway, the push functions, the tests and the tools.
//!
//! - [`id`]: the rule every user id, device id, topic and function name obeys, and KV key escaping;
//! - [`subject`]: the NATS subjects publishers, gateways and functions use;
//! - [`frame`]: the JSON frames exchanged over the WebSocket, and the close codes;
//! - [`payload`]: how an opaque message body becomes the `data` of a frame;
//! - [`token`]: connect tokens (JWT) and their verification;
//! - [`nats`]: NATS connection settings shared by every binary;
//! - [`stream`]: idempotent setup of the `HERALD` stream and the KV buckets;
//! - [`config`]: layered configuration loading (defaults, file, environment);
//! - [`functions`]: what gateways and push functions exchange (lifecycle events, presence, dead letters).
#![forbid(unsafe_code)]

pub mod config;
pub mod frame;
pub mod functions;
pub mod id;
pub mod log;
pub mod nats;
pub mod payload;
pub mod stream;
pub mod subject;
pub mod token;
