//! WebSocket framing (RFC 6455, server side): reading client frames ([`reader`]) and building server
//! frames ([`frame`]).

pub(crate) mod frame;
pub(crate) mod reader;

#[cfg(test)]
mod conformance;
