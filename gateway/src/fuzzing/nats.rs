//! The NATS protocol parser of the delivery feed on what a server may send.

use bytes::BytesMut;

use super::Rng;
use crate::delivery::feed::proto::{self, ServerOp};

/// Any bytes from the server, in any pieces: `parse` never panics, finds the same operations
/// whatever the pieces, and a message it returns reads back the same once written out again.
///
/// The input: a byte that seeds the piece sizes (0: all at once, n: pieces of 1 to n bytes), then
/// the stream.
pub fn nats_parse(data: &[u8]) {
    let [seed, stream @ ..] = data else { return };
    let whole = parse_in_pieces(stream, stream.len().max(1), &mut Rng::new(0));
    if *seed != 0 {
        let pieces = parse_in_pieces(stream, usize::from(*seed), &mut Rng::new(*seed));
        assert_eq!(whole, pieces, "read whole and in pieces of at most {seed}");
    }
    for op in &whole.0 {
        let ServerOp::Msg(message) = op else { continue };
        assert!(!message.subject.is_empty(), "an empty subject");
        let mut written = BytesMut::new();
        written.extend_from_slice(
            format!(
                "HMSG {} {} {} {}\r\n",
                String::from_utf8_lossy(&message.subject),
                message.sid,
                message.headers.len(),
                message.headers.len() + message.payload.len()
            )
            .as_bytes(),
        );
        written.extend_from_slice(&message.headers);
        written.extend_from_slice(&message.payload);
        written.extend_from_slice(b"\r\n");
        let again = proto::parse(&mut written);
        assert_eq!(again, Ok(Some(op.clone())), "a message read back differently");
        assert!(written.is_empty());
        // Reading headers never fails, whatever the block holds.
        let _ = (message.status(), message.header("Nats-Sequence"));
        let name = String::from_utf8_lossy(&message.payload);
        let _ = proto::header(&message.headers, &name);
    }
}

/// The operations parsed and how it ended: an error, or the bytes left waiting for more.
#[derive(Debug, PartialEq, Eq)]
struct Parsed(Vec<ServerOp>, Result<usize, proto::ProtocolError>);

fn parse_in_pieces(stream: &[u8], max: usize, rng: &mut Rng) -> Parsed {
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    let mut rest = stream;
    loop {
        let (piece, after) = rest.split_at(rng.between_one_and(max).min(rest.len()));
        buf.extend_from_slice(piece);
        rest = after;
        loop {
            match proto::parse(&mut buf) {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => break,
                Err(error) => return Parsed(ops, Err(error)),
            }
        }
        if rest.is_empty() {
            return Parsed(ops, Ok(buf.len()));
        }
    }
}
