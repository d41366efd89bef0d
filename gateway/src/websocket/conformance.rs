//! RFC 6455 conformance of the reader, server side, no extension: the cases the Autobahn testsuite
//! checks of a server (1.x-7.x, and 9.x's size limit), each row naming the RFC section it checks.
//!
//! Every row is read whole, in one-byte reads, in reads of 997 bytes (Autobahn's "chopped"), and
//! split in two at every byte boundary (for the longest rows, near the ends only), with the read
//! future dropped each time it waits: the reader must decide the same every time.

use crate::fuzzing::{Message, read_websocket};

/// The size limit of these cases: Autobahn's largest framing case (1.1.7) just fits.
const LIMIT: usize = 65536;

/// The stream ran out with the connection open (the reader reports 1006, "connection lost").
const OPEN: Option<u16> = Some(1006);
/// The reader refuses, and the connection is closed with this code.
const PROTOCOL_ERROR: Option<u16> = Some(1002);
const INVALID_DATA: Option<u16> = Some(1007);
const POLICY: Option<u16> = Some(1008);
const TOO_BIG: Option<u16> = Some(1009);
/// The client closed: nothing more is read.
const CLOSED: Option<u16> = None;

struct Case {
    /// The section of RFC 6455 the row checks.
    rfc: &'static str,
    /// The Autobahn testsuite case it follows, if one does.
    autobahn: &'static str,
    what: String,
    sent: Vec<u8>,
    messages: Vec<Message>,
    end: Option<u16>,
}

fn case(
    rfc: &'static str,
    autobahn: &'static str,
    what: impl Into<String>,
    sent: Vec<Vec<u8>>,
    messages: Vec<Message>,
    end: Option<u16>,
) -> Case {
    Case { rfc, autobahn, what: what.into(), sent: sent.concat(), messages, end }
}

// Client frames (masked, shortest length form unless said otherwise).

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

#[derive(Clone, Copy)]
enum Length {
    Shortest,
    Bits16,
    Bits64,
}

fn frame_with(first: u8, payload: &[u8], length: Length, mask: Option<[u8; 4]>) -> Vec<u8> {
    let masked = if mask.is_some() { 0x80 } else { 0 };
    let length = match (length, payload.len()) {
        (Length::Shortest, len) if len < 126 => Length::Shortest,
        (Length::Shortest, len) if len <= 0xFFFF => Length::Bits16,
        (Length::Shortest, _) => Length::Bits64,
        (chosen, _) => chosen,
    };
    let mut out = vec![first];
    match length {
        Length::Shortest => out.push(masked | payload.len() as u8),
        Length::Bits16 => {
            out.push(masked | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        Length::Bits64 => {
            out.push(masked | 127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    let key = mask.unwrap_or([0; 4]);
    if mask.is_some() {
        out.extend_from_slice(&key);
    }
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(first, payload, Length::Shortest, Some(MASK))
}

/// A whole text message in one frame.
fn text(payload: &[u8]) -> Vec<u8> {
    frame(FIN | 0x1, payload)
}
/// The first frame of a fragmented text message.
fn first(payload: &[u8]) -> Vec<u8> {
    frame(0x1, payload)
}
/// A continuation frame, more to come.
fn more(payload: &[u8]) -> Vec<u8> {
    frame(0x0, payload)
}
/// The last continuation frame.
fn last(payload: &[u8]) -> Vec<u8> {
    frame(FIN, payload)
}
fn binary(payload: &[u8]) -> Vec<u8> {
    frame(FIN | 0x2, payload)
}
fn ping(payload: &[u8]) -> Vec<u8> {
    frame(FIN | 0x9, payload)
}
fn pong(payload: &[u8]) -> Vec<u8> {
    frame(FIN | 0xA, payload)
}
fn close(payload: &[u8]) -> Vec<u8> {
    frame(FIN | 0x8, payload)
}
fn close_with(code: u16, reason: &[u8]) -> Vec<u8> {
    close(&[&code.to_be_bytes()[..], reason].concat())
}
/// A frame header with a 64-bit length and a mask, and no payload (yet).
fn header_claiming(first: u8, len: u64) -> Vec<u8> {
    [&[first, 0x80 | 127][..], &len.to_be_bytes(), &MASK].concat()
}

// What the reader returns.

fn got_text(text: &[u8]) -> Message {
    Message::Text(text.to_vec())
}
fn got_ping(payload: &[u8]) -> Message {
    Message::Ping(payload.to_vec())
}
const GOT_PONG: Message = Message::Pong;
fn got_close(code: u16) -> Message {
    Message::Close(Some(code))
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let x = |n: usize| vec![b'*'; n];
    let mut cases = vec![
        // Framing: the three length forms at their edges.
        case("5.2", "1.1.1", "text, 0 bytes", vec![text(b"")], vec![got_text(b"")], OPEN),
        case("5.2", "1.1.2", "text, 125 bytes: the longest 7-bit length", vec![text(&x(125))], vec![got_text(&x(125))], OPEN),
        case("5.2", "1.1.3", "text, 126 bytes: the shortest 16-bit length", vec![text(&x(126))], vec![got_text(&x(126))], OPEN),
        case("5.2", "1.1.4", "text, 127 bytes", vec![text(&x(127))], vec![got_text(&x(127))], OPEN),
        case("5.2", "1.1.5", "text, 128 bytes", vec![text(&x(128))], vec![got_text(&x(128))], OPEN),
        case("5.2", "1.1.6", "text, 65535 bytes: the longest 16-bit length", vec![text(&x(65535))], vec![got_text(&x(65535))], OPEN),
        case("5.2", "1.1.7", "text, 65536 bytes: a 64-bit length", vec![text(&x(65536))], vec![got_text(&x(65536))], OPEN),
        case("5.2", "1.2.1", "binary, 0 bytes: refused by Herald's contract", vec![binary(b"")], vec![], POLICY),
        case("5.2", "1.2.3", "binary, 126 bytes: refused by Herald's contract", vec![binary(&x(126))], vec![], POLICY),
        case("5.2", "", "a 16-bit length for 5 bytes (not minimal): accepted", vec![frame_with(FIN | 1, b"hello", Length::Bits16, Some(MASK))], vec![got_text(b"hello")], OPEN),
        case("5.2", "", "a 64-bit length for 5 bytes (not minimal): accepted", vec![frame_with(FIN | 1, b"hello", Length::Bits64, Some(MASK))], vec![got_text(b"hello")], OPEN),
        case("5.2", "", "a 64-bit length with its most significant bit set", vec![header_claiming(FIN | 0x1, 1 << 63)], vec![], PROTOCOL_ERROR),
        case("5.3", "", "a mask of zeros is still a mask", vec![frame_with(FIN | 1, b"hi", Length::Shortest, Some([0; 4]))], vec![got_text(b"hi")], OPEN),
        case("5.1", "", "an unmasked client frame", vec![frame_with(FIN | 1, b"hi", Length::Shortest, None)], vec![], PROTOCOL_ERROR),
        case("5.1", "", "an unmasked ping after a text", vec![text(b"a"), frame_with(FIN | 9, b"", Length::Shortest, None)], vec![got_text(b"a")], PROTOCOL_ERROR),
        // Reserved bits: no extension is negotiated.
        case("5.2", "3.1", "RSV1 on a text", vec![frame(FIN | RSV1 | 1, b"Hello")], vec![], PROTOCOL_ERROR),
        case("5.2", "3.2", "RSV2 on a text after a good one", vec![text(b"Hello"), frame(FIN | RSV2 | 1, b"Hello"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "3.3", "RSV1+RSV2 on a text after a good one", vec![text(b"Hello"), frame(FIN | RSV1 | RSV2 | 1, b"Hello"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "3.4", "RSV3 on a text after a good one", vec![text(b"Hello"), frame(FIN | RSV3 | 1, b"Hello"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "3.5", "RSV1+RSV3 on a binary", vec![frame(FIN | RSV1 | RSV3 | 2, b"\x00\xff")], vec![], PROTOCOL_ERROR),
        case("5.2", "3.6", "RSV2+RSV3 on a ping", vec![frame(FIN | RSV2 | RSV3 | 9, b"Hello")], vec![], PROTOCOL_ERROR),
        case("5.2", "3.7", "all RSV bits on a close", vec![frame(FIN | RSV1 | RSV2 | RSV3 | 8, b"")], vec![], PROTOCOL_ERROR),
        // Control frames.
        case("5.5.2", "2.1", "a ping, no payload", vec![ping(b"")], vec![got_ping(b"")], OPEN),
        case("5.5.2", "2.2", "a ping with a text payload", vec![ping(b"Hello, world!")], vec![got_ping(b"Hello, world!")], OPEN),
        case("5.5.2", "2.3", "a ping with a binary payload", vec![ping(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff")], vec![got_ping(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff")], OPEN),
        case("5.5", "2.4", "a ping of 125 bytes", vec![ping(&[0xfe; 125])], vec![got_ping(&[0xfe; 125])], OPEN),
        case("5.5", "2.5", "a ping of 126 bytes", vec![ping(&[0xfe; 126])], vec![], PROTOCOL_ERROR),
        case("5.5", "", "a ping claiming 2^40 bytes, refused from its header", vec![header_claiming(FIN | 0x9, 1 << 40)], vec![], PROTOCOL_ERROR),
        case("5.5.3", "2.7", "an unsolicited pong, no payload", vec![pong(b"")], vec![GOT_PONG], OPEN),
        case("5.5.3", "2.8", "an unsolicited pong with a payload", vec![pong(b"unsolicited pong payload")], vec![GOT_PONG], OPEN),
        case("5.5.3", "2.9", "a pong, then a ping", vec![pong(b"unsolicited"), ping(b"ping payload")], vec![GOT_PONG, got_ping(b"ping payload")], OPEN),
        case("5.5.2", "2.10", "ten pings", vec![ping(b"payload"); 10], vec![got_ping(b"payload"); 10], OPEN),
        case("5.4", "5.1", "a fragmented ping", vec![frame(0x9, b"frag"), last(b"ment")], vec![], PROTOCOL_ERROR),
        case("5.4", "5.2", "a fragmented pong", vec![frame(0xA, b"frag"), last(b"ment")], vec![], PROTOCOL_ERROR),
        // Opcodes 0x3-0x7 and 0xB-0xF are reserved.
        case("5.2", "4.1.1", "reserved data opcode 0x3", vec![frame(FIN | 0x3, b"")], vec![], PROTOCOL_ERROR),
        case("5.2", "4.1.2", "reserved data opcode 0x4 with a payload", vec![frame(FIN | 0x4, b"reserved opcode payload")], vec![], PROTOCOL_ERROR),
        case("5.2", "4.1.3", "a text, reserved data opcode 0x5, a ping", vec![text(b"Hello"), frame(FIN | 0x5, b""), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "4.1.4", "a text, reserved data opcode 0x6 with a payload, a ping", vec![text(b"Hello"), frame(FIN | 0x6, b"x"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "4.1.5", "a text, reserved data opcode 0x7, a ping", vec![text(b"Hello"), frame(FIN | 0x7, b"x"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "4.2.1", "reserved control opcode 0xB", vec![frame(FIN | 0xB, b"")], vec![], PROTOCOL_ERROR),
        case("5.2", "4.2.2", "reserved control opcode 0xC with a payload", vec![frame(FIN | 0xC, b"reserved opcode payload")], vec![], PROTOCOL_ERROR),
        case("5.2", "4.2.3", "a text, reserved control opcode 0xD, a ping", vec![text(b"Hello"), frame(FIN | 0xD, b""), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "4.2.4", "a text, reserved control opcode 0xE, a ping", vec![text(b"Hello"), frame(FIN | 0xE, b"x"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        case("5.2", "4.2.5", "a text, reserved control opcode 0xF, a ping", vec![text(b"Hello"), frame(FIN | 0xF, b"x"), ping(b"")], vec![got_text(b"Hello")], PROTOCOL_ERROR),
        // Fragmentation.
        case("5.4", "5.3", "a text in two fragments", vec![first(b"fragment1"), last(b"fragment2")], vec![got_text(b"fragment1fragment2")], OPEN),
        case("5.4", "5.6", "a ping between two fragments", vec![first(b"fragment1"), ping(b"ping payload"), last(b"fragment2")], vec![got_ping(b"ping payload"), got_text(b"fragment1fragment2")], OPEN),
        case("5.4", "", "a pong between two fragments", vec![first(b"fragment1"), pong(b""), last(b"fragment2")], vec![GOT_PONG, got_text(b"fragment1fragment2")], OPEN),
        case("5.4", "5.19", "five fragments, pings between", vec![first(b"1"), more(b"2"), ping(b"a"), more(b"3"), more(b"4"), ping(b"b"), last(b"5")], vec![got_ping(b"a"), got_ping(b"b"), got_text(b"12345")], OPEN),
        case("5.4", "6.1.2", "three empty fragments", vec![first(b""), more(b""), last(b"")], vec![got_text(b"")], OPEN),
        case("5.4", "5.9", "a final continuation without a message", vec![last(b"fragment1"), text(b"fragment2")], vec![], PROTOCOL_ERROR),
        case("5.4", "5.12", "a continuation, more to come, without a message", vec![more(b"fragment1"), text(b"fragment2")], vec![], PROTOCOL_ERROR),
        case("5.4", "5.15", "a continuation after the message ended", vec![first(b"fragment1"), last(b"fragment2"), more(b"fragment3"), last(b"fragment4")], vec![got_text(b"fragment1fragment2")], PROTOCOL_ERROR),
        case("5.4", "5.18", "a new text inside a fragmented one", vec![first(b"fragment1"), text(b"fragment2")], vec![], PROTOCOL_ERROR),
        case("5.4", "", "a binary inside a fragmented text", vec![first(b"fragment1"), binary(b"fragment2")], vec![], PROTOCOL_ERROR),
        case("5.4", "", "a fragment claiming 2^40 bytes inside a message, refused from its header", vec![first(b"a"), header_claiming(FIN, 1 << 40)], vec![], TOO_BIG),
        case("5.4", "7.1.5", "a close between fragments", vec![first(b"fragment1"), close_with(1000, b""), last(b"fragment2")], vec![got_close(1000)], CLOSED),
        // Text must be UTF-8, checked fragment by fragment.
        case("8.1", "6.2.1", "valid UTF-8 in one frame", vec![text("Hello-µ@ßöäüàá-UTF-8!!".as_bytes())], vec![got_text("Hello-µ@ßöäüàá-UTF-8!!".as_bytes())], OPEN),
        case("8.1", "6.2.4", "a code point split across fragments is valid", vec![first(b"\xce"), last(b"\xba\xe1\xbd\xb9")], vec![got_text(b"\xce\xba\xe1\xbd\xb9")], OPEN),
        case("8.1", "6.2.4", "a four-byte code point in three fragments", vec![first(b"\xf0"), more(b"\x9f"), ping(b""), last(b"\x98\x80")], vec![got_ping(b""), got_text("😀".as_bytes())], OPEN),
        case("8.1", "6.22.1", "U+FFFE, a noncharacter, is valid UTF-8", vec![text(b"\xef\xbf\xbe")], vec![got_text(b"\xef\xbf\xbe")], OPEN),
        case("8.1", "6.9.4", "U+10FFFF, the last code point", vec![text(b"\xf4\x8f\xbf\xbf")], vec![got_text(b"\xf4\x8f\xbf\xbf")], OPEN),
        case("8.1", "6.11.5", "U+110000 is past the last code point", vec![text(b"\xf4\x90\x80\x80")], vec![], INVALID_DATA),
        case("8.1", "6.8.1", "a five-byte sequence", vec![text(b"\xf8\x88\x80\x80\x80")], vec![], INVALID_DATA),
        case("8.1", "6.3.1", "invalid UTF-8 in one frame", vec![text(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")], vec![], INVALID_DATA),
        case("8.1", "6.3.2", "invalid UTF-8 in fragments", vec![first(b"\xce\xba\xe1\xbd\xb9\xcf"), last(b"\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")], vec![], INVALID_DATA),
        case("8.1", "6.4.1", "fails at the invalid fragment, before the message ends", vec![first("κόσμε".as_bytes()), more(b"\xf4\x90\x80\x80")], vec![], INVALID_DATA),
        case("8.1", "6.4.2", "fails inside a code point, before the message ends", vec![first(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4"), more(b"\x90")], vec![], INVALID_DATA),
        case("8.1", "", "fails at the first fragment when it is invalid already", vec![first(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80")], vec![], INVALID_DATA),
        case("8.1", "", "a message may not end inside a code point", vec![first(b"a"), last(b"\xce")], vec![], INVALID_DATA),
        case("8.1", "6.17.1", "an overlong encoding", vec![text(b"\xc0\xaf")], vec![], INVALID_DATA),
        case("8.1", "6.20.1", "a UTF-16 surrogate", vec![text(b"\xed\xa0\x80")], vec![], INVALID_DATA),
        case("8.1", "6.12.1", "a lone continuation byte", vec![text(b"\x80")], vec![], INVALID_DATA),
        // Close frames.
        case("5.5.1", "7.3.1", "a close without a payload", vec![close(b"")], vec![Message::Close(None)], CLOSED),
        case("5.5.1", "7.3.2", "a close of one byte", vec![close(b"\x03")], vec![], PROTOCOL_ERROR),
        case("5.5.1", "7.3.3", "a close with a code, no reason", vec![close_with(1000, b"")], vec![got_close(1000)], CLOSED),
        case("5.5.1", "7.3.4", "a close with a code and a reason", vec![close_with(1000, b"Hello World!")], vec![got_close(1000)], CLOSED),
        case("5.5.1", "7.3.5", "a close with a reason of 123 bytes", vec![close_with(1000, &x(123))], vec![got_close(1000)], CLOSED),
        case("5.5", "7.3.6", "a close with a reason of 124 bytes (126 in all)", vec![close_with(1000, &x(124))], vec![], PROTOCOL_ERROR),
        case("5.5.1", "7.5.1", "a close reason that is not UTF-8", vec![close_with(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")], vec![], INVALID_DATA),
        case("5.5.1", "7.1.4", "nothing is read after a close", vec![close_with(1000, b""), text(b"after"), b"\xff\xff".to_vec()], vec![got_close(1000)], CLOSED),
        // The size limit counts a message's fragments together, and refuses from the header.
        case("10.4", "9.1.1", "text of 65537 bytes, over the limit", vec![text(&x(LIMIT + 1))], vec![], TOO_BIG),
        case("10.4", "", "fragments adding up to the limit", vec![first(&x(LIMIT / 2)), last(&x(LIMIT / 2))], vec![got_text(&x(LIMIT))], OPEN),
        case("10.4", "", "fragments adding up to one byte over", vec![first(&x(LIMIT / 2)), more(&x(LIMIT / 2)), last(b"!")], vec![], TOO_BIG),
        case("10.4", "", "a text claiming 2^40 bytes, refused before its payload", vec![header_claiming(FIN | 0x1, 1 << 40)], vec![], TOO_BIG),
    ];
    // Status codes a peer may send are echoed by the session; the others fail the connection.
    for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
        let what = format!("close code {code} may be sent");
        cases.push(case("7.4.1", "7.7", what, vec![close_with(code, b"")], vec![got_close(code)], CLOSED));
    }
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let what = format!("close code {code} may not be sent");
        cases.push(case("7.4.2", "7.9 and 7.13", what, vec![close_with(code, b"")], vec![], PROTOCOL_ERROR));
    }
    cases
}

/// The reads a case is tried with: all at once, byte by byte, Autobahn's chops of 997 bytes, and
/// every split in two (near the ends only, for long cases).
fn read_patterns(len: usize) -> Vec<Vec<usize>> {
    let mut patterns = vec![vec![], vec![1], vec![997]];
    let splits: Vec<usize> = if len <= 1024 { (1..len).collect() } else { (1..16).chain(len - 16..len).collect() };
    patterns.extend(splits.into_iter().map(|at| vec![at, len]));
    patterns
}

#[test]
fn the_reader_follows_rfc_6455() {
    for case in cases() {
        for reads in read_patterns(case.sent.len()) {
            let got = read_websocket(&case.sent, &reads, LIMIT);
            let reads = reads.first().map_or("all at once".to_string(), |first| format!("first read {first}"));
            assert_eq!(
                (&got.messages, got.end),
                (&case.messages, case.end),
                "RFC 6455 §{} (Autobahn {}): {}, {reads}",
                case.rfc,
                case.autobahn,
                case.what
            );
        }
    }
}
