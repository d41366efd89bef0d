//! The HTTP side: the WebSocket listener's routes ([`server`]), what is decided before an upgrade
//! ([`auth`], [`limits`]), the HTTP API ([`api`]), readiness ([`health`]) and [`metrics`].

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod centrifugal;
pub(crate) mod edge;
pub(crate) mod engineio;
pub(crate) mod handshake;
pub(crate) mod health;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod ratelimit;
pub(crate) mod server;
pub(crate) mod socketio;
