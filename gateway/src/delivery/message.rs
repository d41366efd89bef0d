//! A stored message as the gateway handles it: live from the stream's republish, or read back for a
//! replay. It is encoded at most once per wire format, by the first session that sends it in that
//! format, and the bytes are shared by every session that sends it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use herald_shared::subject::{Audience, header};

use super::burst::Burst;
use super::feed::Delivered;
use crate::codec::{self, WireFormat};
use crate::session::replay::Stored;

/// One stored message.
#[derive(Debug)]
pub(crate) struct Message {
    /// Stream sequence: the resume point.
    pub(crate) seq: u64,
    /// Who it was published to.
    pub(crate) audience: Audience,
    /// The publisher's `Herald-Type`, or empty.
    pub(crate) kind: Box<str>,
    /// The publisher's `Nats-Msg-Id`, or empty.
    pub(crate) id: Box<str>,
    /// When the stream stored it (RFC 3339).
    pub(crate) ts: Box<str>,
    pub(crate) payload: Bytes,
    /// The message in each wire format, once some session needed it.
    encoded: [OnceLock<Bytes>; WireFormat::COUNT],
    /// Whether the payload is UTF-8, once some session asked.
    text: OnceLock<bool>,
    /// The broadcast burst it came in, and its place there.
    burst: OnceLock<(Arc<Burst>, usize)>,
}

impl Message {
    /// A message; a `kind` or `id` holding a control character (which no protocol's headers can
    /// carry: a NUL ends a STOMP frame) is left out, live and replayed alike.
    pub(crate) fn new(seq: u64, audience: Audience, kind: &str, id: &str, ts: &str, payload: Bytes) -> Message {
        let printable = |text: &str| if text.chars().any(char::is_control) { "" } else { text }.into();
        Message {
            seq,
            audience,
            kind: printable(kind),
            id: printable(id),
            ts: ts.into(),
            payload,
            encoded: Default::default(),
            text: OnceLock::new(),
            burst: OnceLock::new(),
        }
    }

    /// Whether the payload is UTF-8: a protocol that carries it as it is can use a text frame.
    pub(crate) fn is_text(&self) -> bool {
        *self.text.get_or_init(|| std::str::from_utf8(&self.payload).is_ok())
    }

    /// The message's bytes in `format`, encoded on first use.
    pub(crate) fn encoded(&self, format: WireFormat) -> &Bytes {
        self.encoded[format.index()].get_or_init(|| codec::encode_message(format, self))
    }

    /// Makes the message the `index`th of `burst` (once).
    pub(crate) fn tie_to(&self, burst: &Arc<Burst>, index: usize) {
        let _ = self.burst.set((burst.clone(), index));
    }

    /// The broadcast burst the message came in, and its place there.
    pub(crate) fn burst(&self) -> Option<(&Arc<Burst>, usize)> {
        self.burst.get().map(|(burst, index)| (burst, *index))
    }

    /// Whether the message is of one of the `muted` kinds.
    pub(crate) fn is_muted(&self, muted: &[Box<str>]) -> bool {
        is_muted(&self.kind, muted)
    }
}

/// Whether a message of `kind` is of one of the `muted` kinds (a message with no kind never is).
pub(crate) fn is_muted(kind: &str, muted: &[Box<str>]) -> bool {
    !kind.is_empty() && muted.iter().any(|muted| **muted == *kind)
}

/// A message the stream republished, with what the republish says about its subject.
#[derive(Debug)]
pub(crate) struct Republished {
    pub(crate) message: Message,
    /// The previous sequence on the same subject (`Nats-Last-Sequence`), when the stream said.
    pub(crate) previous_on_subject: Option<u64>,
}

/// Reads a message the stream republished to a `herald.deliver.…` subject; `None` without a
/// stream sequence.
pub(crate) fn from_live(delivered: &Delivered, audience: &Audience) -> Option<Republished> {
    let number = |name: &str| delivered.header(name)?.parse::<u64>().ok();
    let text = |name: &str| delivered.header(name).unwrap_or("");
    let message = Message::new(
        number(header::NATS_SEQUENCE)?,
        audience.clone(),
        text(header::HERALD_TYPE),
        text(header::NATS_MSG_ID),
        text(header::NATS_TIME_STAMP),
        delivered.payload.clone(),
    );
    Some(Republished { message, previous_on_subject: number(header::NATS_LAST_SEQUENCE) })
}

/// A message read back from the stream.
pub(crate) fn from_stored(stored: Stored) -> Message {
    Message::new(stored.seq, stored.audience, &stored.kind, &stored.id, &stored.ts, stored.payload)
}

/// What a session finds in its live sources: a message, or a gap the router saw on one of its
/// subjects.
#[derive(Debug, Clone)]
pub(crate) enum Live {
    Message(std::sync::Arc<Message>),
    /// Messages of `audience`'s subject between `first` and `last` (that one at least) never
    /// reached the gateway.
    Gap {
        first: u64,
        last: u64,
        audience: Audience,
        /// Found by a route's first message: owed only to the sessions that replay up to bounds
        /// read after attaching (see `router::Attaching`), not to a `sub` without `since`.
        first_on_route: bool,
    },
}

impl Live {
    /// Where the entry sits in stream order: its sequence (a gap: its first missing one).
    pub(crate) fn key(&self) -> u64 {
        match self {
            Live::Message(message) => message.seq,
            Live::Gap { first, .. } => *first,
        }
    }

    /// One gap spanning the gaps `a` and `b` of one subject: what a bounded queue keeps of two
    /// gaps when it cannot keep both, for a session that read neither. Such a session sent nothing
    /// live in between (it reads in stream order), so a message there that it did not get from a
    /// replay is one it lost.
    pub(crate) fn span(a: &Live, b: &Live) -> Live {
        match (a, b) {
            (
                Live::Gap { first, last, audience, first_on_route },
                Live::Gap { first: other_first, last: other_last, first_on_route: other_first_on_route, .. },
            ) => Live::Gap {
                first: (*first).min(*other_first),
                last: (*last).max(*other_last),
                audience: audience.clone(),
                first_on_route: *first_on_route && *other_first_on_route,
            },
            (gap @ Live::Gap { .. }, _) | (_, gap) => gap.clone(),
        }
    }

    /// What the entry counts toward a queue's byte limit.
    pub(crate) fn cost(&self) -> usize {
        match self {
            Live::Message(message) => message.payload.len() + 160,
            Live::Gap { .. } => 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republished_message_is_read_from_its_headers() {
        let headers = "NATS/1.0\r\nNats-Sequence: 125\r\nNats-Last-Sequence: 120\r\n\
                       Nats-Time-Stamp: 2026-11-22T10:00:00.123456789Z\r\nNats-Msg-Id: order-7\r\n\
                       Herald-Type: mail\r\n\r\n";
        let delivered = Delivered {
            sid: 2,
            subject: Bytes::from_static(b"herald.deliver.user.42"),
            headers: Bytes::from(headers),
            payload: Bytes::from_static(br#"{"text":"hi"}"#),
        };
        let live = from_live(&delivered, &Audience::User("42".into())).unwrap();
        assert_eq!(live.previous_on_subject, Some(120));
        let message = live.message;
        assert_eq!((message.seq, &*message.kind, &*message.id), (125, "mail", "order-7"));
        assert_eq!(&*message.ts, "2026-11-22T10:00:00.123456789Z");
        assert!(message.is_muted(&["mail".into()]));
        assert!(!message.is_muted(&["ads".into()]));
        let without = Delivered { headers: Bytes::from_static(b"NATS/1.0\r\n\r\n"), ..delivered };
        assert!(from_live(&without, &Audience::All).is_none());
    }

    #[test]
    fn a_message_is_encoded_once_per_format() {
        let message = Message::new(1, Audience::All, "", "", "t", Bytes::from_static(b"1"));
        let first = message.encoded(WireFormat::Herald).clone();
        assert_eq!(first.as_ptr(), message.encoded(WireFormat::Herald).as_ptr());
        assert!(!message.is_muted(&["mail".into()]), "a message without a kind is never muted");
    }
}
