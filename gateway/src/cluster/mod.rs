//! What the gateways of a cluster share through NATS: session policies, users' preferences, device
//! cursors, Socket.IO states, lifecycle events and presence, and the local sessions they are about.

pub(crate) mod cursor;
pub(crate) mod events;
pub(crate) mod forward;
pub(crate) mod gather;
pub(crate) mod inbox;
pub(crate) mod policy;
pub(crate) mod prefs;
pub(crate) mod recovery;
pub(crate) mod registry;
pub(crate) mod user;
pub(crate) mod watch;
