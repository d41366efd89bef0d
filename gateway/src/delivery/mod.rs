//! The delivery path: the [`feed`] reads the stream's republish in order, the [`router`] routes each
//! message to the sessions it is for, [`message`] encodes it once, and each session's [`outbox`]
//! queues it for the socket's writer.

pub(crate) mod feed;
pub(crate) mod message;
pub(crate) mod outbox;
pub(crate) mod router;
