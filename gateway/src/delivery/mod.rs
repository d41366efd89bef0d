//! The delivery path: the [`feed`] reads the stream's republish in order; the [`router`] puts each
//! [`message`] where its sessions read it: a user's own messages in the [`mailbox`] of each of the
//! user's sessions, `push.all` and topic messages once in a broadcast [`log`] that every
//! interested session reads at its own position, each [`burst`] of them encoded once per wire
//! format in one buffer. [`reach`] keeps the feed on a server that reaches the stream; [`leader`]
//! asks a new leader of the stream what it stores; [`replies`] reads the stream back for replays.

pub(crate) mod burst;
pub(crate) mod feed;
pub(crate) mod leader;
pub(crate) mod log;
pub(crate) mod mailbox;
pub(crate) mod message;
pub(crate) mod reach;
pub(crate) mod replies;
pub(crate) mod router;
