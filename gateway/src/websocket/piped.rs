//! A session's socket as a pair of in-memory pipes, for transports over plain HTTP requests
//! (Engine.IO polling, SockJS's transports over HTTP requests): the session reads WebSocket frames and writes
//! WebSocket frames as on any socket; the HTTP side writes the client's messages into its reader as
//! client frames ([`client_frame`]) and reads the server frames it wrote ([`frame_at`]).

/// A masked client frame with opcode `opcode` (the session's reader requires masking; a zero key
/// leaves the payload as it is).
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// The opcode and payload range of the server frame at the start of `bytes`, if it is whole.
pub(crate) fn frame_at(bytes: &[u8]) -> Option<(u8, usize, usize)> {
    let (&first, rest) = bytes.split_first()?;
    let (&second, _) = rest.split_first()?;
    let (start, len) = match second & 0x7f {
        126 => (4, u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize),
        127 => (10, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize),
        len => (2, len as usize),
    };
    (bytes.len() >= start + len).then_some((first & 0x0f, start, start + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame;

    #[test]
    fn server_frames_are_found_whole_and_client_frames_are_masked() {
        let long = frame::text(&[b'x'; 300]);
        assert_eq!(frame_at(&long), Some((0x1, 4, 304)));
        assert_eq!(frame_at(&long[..303]), None);
        assert_eq!(frame_at(&frame::text(b"o")), Some((0x1, 2, 3)));
        assert_eq!(client_frame(0xA, b"p"), [0x8A, 0x81, 0, 0, 0, 0, b'p']);
    }
}
