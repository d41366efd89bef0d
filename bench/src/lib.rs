//! `herald-bench`: a load tool that measures Herald side by side with nats-server's own WebSocket
//! listener and a bare broadcaster, on the same machine, in the same run, with the same client code.
//!
//! - [`targets`] start the systems under test as separate processes (so their memory and CPU are
//!   their own) and stop them, also on errors and Ctrl-C ([`process`]);
//! - [`client`] is the one client all targets are measured with (WebSocket, or Server-Sent Events
//!   for `herald-sse`), cheap per connection;
//! - [`publish`] sends load through NATS, with [`payload`]s carrying their publish time;
//! - [`scenarios`] are the measurements; [`report`] prints and stores their figures with
//!   Herald/peer ratios; [`procfs`] reads memory and CPU of processes; [`limits`] deals with file
//!   descriptors and source addresses;
//! - [`raw`] is the bare broadcaster, run as `herald-bench raw-server`.
//!
//! See `docs/benchmarks.md` for what each scenario measures and what limits each figure.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod limits;
pub mod payload;
pub mod process;
pub mod procfs;
pub mod publish;
pub mod raw;
pub mod report;
pub mod scenarios;
pub mod targets;
