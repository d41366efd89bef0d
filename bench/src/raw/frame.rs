//! WebSocket frames as the server sends them: final, unmasked text frames, encoded once and
//! shared by every socket they go to.

use bytes::{BufMut, Bytes, BytesMut};

/// The frame every socket gets once it is registered, so its client knows it is live.
pub(crate) const READY: &[u8] = b"\x81\x05ready";

/// A final, unmasked text frame holding `payload`.
pub(crate) fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(framed_len(payload.len()));
    put_text_frame(&mut frame, payload);
    frame.freeze()
}

/// Appends a final, unmasked text frame holding `payload` to `out`.
pub(crate) fn put_text_frame(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(framed_len(payload.len()));
    out.put_u8(0x81);
    match payload.len() {
        len @ 0..=125 => out.put_u8(len as u8),
        len @ 126..=0xffff => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        len => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    out.put_slice(payload);
}

/// Bytes of a frame holding `payload_len` bytes.
pub(crate) fn framed_len(payload_len: usize) -> usize {
    let head = match payload_len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    };
    head + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ws::{Frame, OP_TEXT, Parsed, parse};

    #[test]
    fn frames_parse_back() {
        for len in [0, 100, 125, 126, 200, 0xffff, 70_000] {
            let payload = vec![b'p'; len];
            let frame = text_frame(&payload);
            assert_eq!(frame.len(), framed_len(len));
            assert_eq!(
                parse(&frame),
                Parsed::Frame(Frame { fin: true, opcode: OP_TEXT, payload: &payload }, frame.len())
            );
        }
    }

    #[test]
    fn ready_is_a_text_frame() {
        assert_eq!(READY, &text_frame(b"ready")[..]);
    }
}
