//! The HTTP side: the WebSocket listener's routes ([`server`]), what is decided before an upgrade
//! ([`auth`], [`limits`]), the HTTP API ([`api`]), readiness ([`health`]), [`metrics`] and
//! the count of [`refusals`].

pub(crate) mod admitted;
pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod body;
pub(crate) mod body_pipe;
pub(crate) mod centrifugal;
pub(crate) mod cors;
pub(crate) mod edge;
pub(crate) mod engineio;
pub(crate) mod handshake;
pub(crate) mod health;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod ratelimit;
pub(crate) mod refusals;
pub(crate) mod server;
pub(crate) mod socketio;
pub(crate) mod sockjs;
pub(crate) mod sse;
pub(crate) mod stomp;
pub(crate) mod tap;
