//! A burst: the messages the router appended to one broadcast log in one go. Their frames in one
//! encoding ([`FrameKey`]: a wire format, or a STOMP subscription's head) are written into one
//! buffer, by the first session that sends one of them that way, and every session of that key
//! sends them from it. A session that sends several of them in a row sends one slice: one
//! reference count and one entry of a vectored write, whatever the protocol. The buffer's slices
//! are cut in place ([`Bytes::from_owner`]: truncating one does not clone it).

use std::ops::Range;
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;

use super::message::Message;
use crate::codec::stomp::{MessageHead, Transport};
use crate::codec::{self, FrameKey, WireFormat};

/// STOMP heads (subscription id and destination) whose frames a burst keeps; a gateway's STOMP
/// clients mostly share a few (stomp.js numbers its subscriptions `sub-0`, `sub-1`…). A session
/// with another one writes its frames alone.
const MAX_HEADS: usize = 8;

pub(crate) struct Burst {
    /// Weak: the messages hold the burst. One the log dropped is not encoded any more.
    messages: Box<[Weak<Message>]>,
    formats: [OnceLock<Frames>; WireFormat::COUNT],
    /// Filled in order; read without a lock (each session of a STOMP head looks once per burst).
    heads: [OnceLock<HeadFrames>; MAX_HEADS],
}

/// The frames for one STOMP head.
struct HeadFrames {
    text: Box<[u8]>,
    transport: Transport,
    acked: bool,
    escaped: bool,
    frames: Frames,
}

impl HeadFrames {
    fn is_for(&self, head: &MessageHead<'_>) -> bool {
        *self.text == *head.text
            && (self.transport, self.acked, self.escaped) == (head.transport, head.acked, head.escaped)
    }
}

/// The frames of a burst's messages in one encoding, back to back in one buffer.
pub(crate) struct Frames {
    buffer: Bytes,
    /// Where each message's frame ends (a message dropped before the encoding has an empty one).
    ends: Box<[usize]>,
}

impl Frames {
    /// Where the frame of the burst's `index`th message is in [`Frames::buffer`].
    pub(crate) fn range(&self, index: usize) -> Range<usize> {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        start..self.ends[index]
    }

    pub(crate) fn buffer(&self) -> &Bytes {
        &self.buffer
    }
}

impl std::fmt::Debug for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Burst").field("messages", &self.messages.len()).finish_non_exhaustive()
    }
}

impl Burst {
    /// Makes `messages` (in log order) one burst.
    pub(crate) fn tie(messages: &[&Arc<Message>]) {
        let burst = Arc::new(Burst {
            messages: messages.iter().map(|message| Arc::downgrade(message)).collect(),
            formats: Default::default(),
            heads: Default::default(),
        });
        for (index, message) in messages.iter().enumerate() {
            message.tie_to(&burst, index);
        }
    }

    /// How many messages the burst has.
    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }

    /// The burst's frames for `key`, encoded on first use; none for a STOMP head past the few a
    /// burst keeps.
    pub(crate) fn frames(&self, key: &FrameKey<'_>) -> Option<&Frames> {
        match key {
            FrameKey::Format(format) => Some(self.formats[format.index()].get_or_init(|| self.encode(key))),
            FrameKey::StompHead(head) => {
                for slot in &self.heads {
                    // An empty slot takes this head, unless another session fills it first.
                    let kept = slot.get_or_init(|| HeadFrames {
                        text: Box::from(head.text),
                        transport: head.transport,
                        acked: head.acked,
                        escaped: head.escaped,
                        frames: self.encode(key),
                    });
                    if kept.is_for(head) {
                        return Some(&kept.frames);
                    }
                }
                None
            }
        }
    }

    fn encode(&self, key: &FrameKey<'_>) -> Frames {
        let mut buffer = Vec::new();
        let mut scratch = Vec::new();
        let mut ends = Vec::with_capacity(self.messages.len());
        for message in &self.messages {
            if let Some(message) = message.upgrade() {
                codec::append_frame(key, &message, &mut buffer, &mut scratch);
            }
            ends.push(buffer.len());
        }
        Frames { buffer: Bytes::from_owner(buffer), ends: ends.into() }
    }
}

#[cfg(test)]
mod tests {
    use herald_shared::subject::Audience;

    use super::*;

    fn message(seq: u64) -> Arc<Message> {
        Arc::new(Message::new(seq, Audience::All, "", "", "t", Bytes::from(seq.to_string())))
    }

    #[test]
    fn each_encoding_of_a_burst_is_one_buffer_made_once() {
        let messages = [message(1), message(2), message(3)];
        Burst::tie(&messages.iter().collect::<Vec<_>>());
        let (burst, index) = messages[1].burst().unwrap();
        assert_eq!(index, 1);
        let key = FrameKey::Format(WireFormat::Herald);
        let frames = burst.frames(&key).unwrap();
        assert!(std::ptr::eq(frames, burst.frames(&key).unwrap()), "encoded once");
        assert_eq!(burst.len(), 3);
        for (index, message) in messages.iter().enumerate() {
            let alone = codec::encode_message(WireFormat::Herald, message);
            assert_eq!(frames.buffer()[frames.range(index)], alone[..]);
        }
    }

    #[test]
    fn a_few_stomp_heads_are_kept_and_a_dropped_message_leaves_an_empty_frame() {
        let (first, second) = (message(1), message(2));
        Burst::tie(&[&first, &second]);
        drop(first);
        let (burst, _) = second.burst().unwrap();
        let heads: Vec<String> = (0..=MAX_HEADS).map(|n| format!("MESSAGE\nsubscription:sub-{n}\n")).collect();
        for head in &heads[..MAX_HEADS] {
            let frames = burst.frames(&stomp_key(head, false)).unwrap();
            assert!(frames.range(0).is_empty());
            assert!(contains(&frames.buffer()[frames.range(1)], head));
        }
        assert!(burst.frames(&stomp_key(&heads[MAX_HEADS], false)).is_none());
        assert!(burst.frames(&stomp_key(&heads[0], false)).is_some());
    }

    #[test]
    fn a_head_with_acks_has_frames_of_its_own() {
        let (first, second) = (message(1), message(2));
        Burst::tie(&[&first, &second]);
        let head = "MESSAGE\nsubscription:sub-0\n";
        let plain = first.burst().unwrap().0.frames(&stomp_key(head, false)).unwrap();
        let acked = first.burst().unwrap().0.frames(&stomp_key(head, true)).unwrap();
        assert!(!std::ptr::eq(plain, acked));
        assert!(!contains(plain.buffer(), "ack:"));
        for (index, seq) in [(0, 1), (1, 2)] {
            let frame = &acked.buffer()[acked.range(index)];
            assert!(contains(frame, &format!("{head}ack:{seq}\n")), "{:?}", String::from_utf8_lossy(frame));
        }
    }

    fn stomp_key(text: &str, acked: bool) -> FrameKey<'_> {
        FrameKey::StompHead(MessageHead {
            text: text.as_bytes(),
            transport: Transport::WebSocket,
            acked,
            escaped: true,
        })
    }

    fn contains(bytes: &[u8], text: &str) -> bool {
        bytes.windows(text.len()).any(|window| window == text.as_bytes())
    }
}
