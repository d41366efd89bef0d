//! WebSocket frames as bytes ready for the socket (RFC 6455, server side: never masked).
//!
//! A frame is built once, header and payload in one buffer, and shared as [`Bytes`] by every socket
//! it goes to; the writer sends queued frames with one vectored write.

use bytes::Bytes;

/// Room reserved in front of a payload for the longest server frame header (2 + 8 bytes).
const HEAD_ROOM: usize = 10;

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A frame under construction: write the payload into [`FrameBuf::body`], then finish it.
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    /// A buffer for a payload of about `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> FrameBuf {
        let mut buf = Vec::with_capacity(HEAD_ROOM + capacity);
        buf.resize(HEAD_ROOM, 0);
        FrameBuf { buf }
    }

    /// The payload so far; append to it.
    pub(crate) fn body(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// A final text frame holding the payload.
    pub(crate) fn finish_text(self) -> Bytes {
        self.finish(OP_TEXT)
    }

    pub(crate) fn finish_binary(self) -> Bytes {
        self.finish(OP_BINARY)
    }

    fn finish(mut self, opcode: u8) -> Bytes {
        let (head, head_len) = header(opcode, self.buf.len() - HEAD_ROOM);
        let start = HEAD_ROOM - head_len;
        self.buf[start..HEAD_ROOM].copy_from_slice(&head[..head_len]);
        Bytes::from(self.buf).slice(start..)
    }
}

/// The header of a final frame with `opcode` and a payload of `len` bytes, and its length.
fn header(opcode: u8, len: usize) -> ([u8; HEAD_ROOM], usize) {
    let mut head = [0u8; HEAD_ROOM];
    head[0] = 0x80 | opcode;
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

/// Appends a text frame holding `payload` to `out` (frames written one after the other into one
/// buffer go out as one slice).
pub(crate) fn append_text(out: &mut Vec<u8>, payload: &[u8]) {
    let (head, head_len) = header(OP_TEXT, payload.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(payload);
}

/// The header of a text frame (`text`) or else a binary frame whose payload has `len` bytes (the
/// payload follows in other slices), and its length.
pub(crate) fn data_header(text: bool, len: usize) -> ([u8; HEAD_ROOM], usize) {
    header(if text { OP_TEXT } else { OP_BINARY }, len)
}

/// A text frame holding `json`.
pub(crate) fn text(json: &[u8]) -> Bytes {
    let mut frame = FrameBuf::with_capacity(json.len());
    frame.body().extend_from_slice(json);
    frame.finish_text()
}

/// A binary frame holding `bytes`.
pub(crate) fn binary(bytes: &[u8]) -> Bytes {
    let mut frame = FrameBuf::with_capacity(bytes.len());
    frame.body().extend_from_slice(bytes);
    frame.finish_binary()
}

/// A close frame with `code` and a reason (cut to fit a control frame).
pub(crate) fn close(code: u16, reason: &str) -> Bytes {
    let mut reason = &reason.as_bytes()[..reason.len().min(123)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    let mut frame = FrameBuf::with_capacity(2 + reason.len());
    frame.body().extend_from_slice(&code.to_be_bytes());
    frame.body().extend_from_slice(reason);
    frame.finish(OP_CLOSE)
}

/// A ping control frame.
pub(crate) fn ping() -> Bytes {
    Bytes::from_static(&[0x80 | OP_PING, 0])
}

/// A pong control frame echoing `payload` (at most 125 bytes, as the reader guarantees).
pub(crate) fn pong(payload: &[u8]) -> Bytes {
    let mut frame = FrameBuf::with_capacity(payload.len());
    frame.body().extend_from_slice(&payload[..payload.len().min(125)]);
    frame.finish(OP_PONG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_form() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let medium = text(&[b'x'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let large = text(&vec![b'x'; 70_000]);
        assert_eq!(&large[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(large.len(), 70_010);
    }

    #[test]
    fn control_frames() {
        assert_eq!(&close(1012, "restart")[..], &[0x88, 9, 0x03, 0xF4, b'r', b'e', b's', b't', b'a', b'r', b't']);
        assert_eq!(close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
        assert_eq!(&ping()[..], &[0x89, 0]);
        assert_eq!(&pong(b"ab")[..], &[0x8A, 2, b'a', b'b']);
    }
}
