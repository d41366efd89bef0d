//! The one client implementation every target is measured with: a minimal WebSocket client
//! ([`ws`]), a minimal Server-Sent Events client ([`sse`]) over the bits of HTTP/1.1 both need
//! ([`http`]), the protocols spoken over them ([`protocol`]), one task per connection ([`conn`])
//! and fleets of them ([`fleet`]).

pub mod conn;
pub mod fleet;
pub mod http;
pub mod protocol;
pub mod sse;
pub mod ws;

pub use conn::{ClientReport, ClientSpec};
pub use fleet::{Counts, Fleet, FleetOptions, Percentiles};
pub use protocol::Protocol;
