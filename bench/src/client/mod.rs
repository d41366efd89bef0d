//! The one client implementation every target is measured with: a minimal WebSocket client
//! ([`ws`]), the three protocols spoken over it ([`protocol`]), one task per connection ([`conn`])
//! and fleets of them ([`fleet`]).

pub mod conn;
pub mod fleet;
pub mod protocol;
pub mod ws;

pub use conn::{ClientReport, ClientSpec};
pub use fleet::{Counts, Fleet, FleetOptions, Percentiles};
pub use protocol::Protocol;
