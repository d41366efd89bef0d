//! The WebSocket wire, client side (RFC 6455), kept to what a load tool needs: the upgrade
//! handshake, parsing server frames in place (never masked), and writing masked client frames.
//! No allocation per frame; the caller owns the buffers.

use anyhow::{Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::http;

/// A continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// A text frame.
pub const OP_TEXT: u8 = 0x1;
/// A binary frame.
pub const OP_BINARY: u8 = 0x2;
/// A close frame.
pub const OP_CLOSE: u8 = 0x8;
/// A ping frame.
pub const OP_PING: u8 = 0x9;
/// A pong frame.
pub const OP_PONG: u8 = 0xA;

/// The masking key of every client frame; RFC 6455 wants it unpredictable against proxies, which
/// do not exist on loopback.
const MASK: [u8; 4] = [0x5a, 0x3c, 0x96, 0xe1];

/// One server frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The final fragment of a message.
    pub fin: bool,
    /// The opcode (`OP_*`).
    pub opcode: u8,
    /// The (unmasked) payload.
    pub payload: &'a [u8],
}

/// The result of parsing the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole frame and the bytes it took.
    Frame(Frame<'a>, usize),
    /// The buffer ends inside a frame.
    Incomplete,
    /// Not a frame a server may send.
    Invalid(&'static str),
}

/// Parses the frame at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    let [b0, b1, ..] = *buf else { return Parsed::Incomplete };
    if b1 & 0x80 != 0 {
        return Parsed::Invalid("masked server frame");
    }
    let Some((len, head)) = header(buf) else { return Parsed::Incomplete };
    let Ok(len) = usize::try_from(len) else { return Parsed::Invalid("frame too large") };
    match buf.get(head..head + len) {
        Some(payload) => Parsed::Frame(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, payload }, head + len),
        None => Parsed::Incomplete,
    }
}

/// The whole length (head and payload) of the frame whose start `head` holds, once `head` holds
/// its whole header.
pub fn frame_len(head: &[u8]) -> Option<usize> {
    let (len, head_len) = header(head)?;
    usize::try_from(len).ok()?.checked_add(head_len)
}

/// The payload length and the header's length of the frame at the start of `buf`, once `buf`
/// holds its whole header.
fn header(buf: &[u8]) -> Option<(u64, usize)> {
    let [_, b1, ..] = *buf else { return None };
    Some(match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        short => (short as u64, 2),
    })
}

/// Appends a masked, final client frame to `out`.
pub fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ MASK[i % 4]));
}

/// Sends the upgrade request for `path` and reads the `101` response; returns the bytes read past
/// the response head (the first frames). Any other answer is an error carrying its status line and
/// the start of its body.
pub async fn handshake(stream: &mut TcpStream, host: &str, path: &str) -> Result<Vec<u8>> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: aGVyYWxkLWJlbmNoLWtleQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let head = http::read_head(stream, "the WebSocket handshake").await?;
    let status_line = head.status_line();
    if !status_line.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {status_line} {}", head.quoted_body());
    }
    Ok(head.into_rest())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(len as u8),
            len @ 126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_every_length_form_and_waits_for_whole_frames() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let bytes = server_frame(OP_TEXT, &payload);
            assert_eq!(
                parse(&bytes),
                Parsed::Frame(Frame { fin: true, opcode: OP_TEXT, payload: &payload }, bytes.len())
            );
            assert_eq!(parse(&bytes[..bytes.len() - 1]), Parsed::Incomplete, "{len}");
        }
        assert_eq!(parse(&[0x81]), Parsed::Incomplete);
        assert_eq!(parse(&[0x81, 0x85]), Parsed::Invalid("masked server frame"));
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        encode(OP_TEXT, b"PING\r\n", &mut out);
        assert_eq!(out[..2], [0x81, 0x80 | 6]);
        let unmasked: Vec<u8> = out[6..].iter().enumerate().map(|(i, b)| b ^ out[2 + i % 4]).collect();
        assert_eq!(unmasked, b"PING\r\n");
        let mut long = Vec::new();
        encode(OP_BINARY, &[0; 200], &mut long);
        assert_eq!(long[..4], [0x82, 0x80 | 126, 0, 200]);
        assert_eq!(long.len(), 4 + 4 + 200);
    }
}
