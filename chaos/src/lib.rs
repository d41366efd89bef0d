//! `herald-chaos`: Herald under failure, counted. It starts a three-node NATS cluster in containers
//! (the stream at three replicas), two or three gateway processes, one WebSocket client per user
//! and publishers that retry until acknowledged; it kills gateways (SIGKILL, or a rolling SIGTERM
//! restart), kills NATS nodes (any, or the stream's leader) and cuts nodes off, one fault at a
//! time; then it counts, for every client, what it was owed against what it received.
//!
//! - [`cluster`]: the NATS containers and their networks ([`docker`] drives them);
//! - [`gateways`]: the gateway processes;
//! - [`clients`]: the WebSocket clients, which resume with `since` after every close;
//! - [`publisher`]: paced JetStream publishes, each retried with its `Nats-Msg-Id` until acked;
//! - [`faults`]: the seeded fault schedule;
//! - [`report`]: the count and its rendering; [`run`] puts the phases together.
//!
//! See docs/operations.md ("Chaos runs") for the commands and how to read the output.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clients;
pub mod clock;
pub mod cluster;
pub mod docker;
pub mod faults;
pub mod gateways;
pub mod http;
pub mod publisher;
pub mod report;
pub mod run;

pub use cli::Options;
pub use report::Report;
pub use run::run;
