//! WebSocket framing (RFC 6455, server side): reading client frames ([`reader`]), building server
//! frames ([`frame`]), and sockets made of in-memory pipes for HTTP transports ([`piped`]).

pub(crate) mod frame;
pub(crate) mod piped;
pub(crate) mod reader;

#[cfg(test)]
mod conformance;
