//! Engine.IO packets as a Socket.IO client sends them: a long-polling POST's payload (packets
//! joined by the record separator 0x1E), relayed into the session's reader as WebSocket frames, and
//! the codec that reads each packet.

use crate::codec::{Codec, Refusal, SocketIoCodec};
use crate::http::engineio::SEPARATOR;
use crate::http::socketio::connect_auth;
use crate::websocket::piped::client_frame;

use super::websocket::{Message, read_websocket};

/// Any POST body: the session's reader gets each packet as one text message, in order, until a
/// packet that is not UTF-8 (1007) or is over the size limit (1009); the first packet is accepted
/// as a connection's CONNECT only when it is `40` or `40{…}` (or `40/,`, `40/,{…}`); the codec never panics and makes at
/// most one outcome of each packet.
///
/// The input: a byte for the size limit (0-127, or 1 MiB from 128 on), then the body.
pub fn socketio_payload(data: &[u8]) {
    let [limit, body @ ..] = data else { return };
    let limit = if *limit < 128 { usize::from(*limit) } else { 1 << 20 };
    let packets: Vec<&[u8]> = body.split(|byte| *byte == SEPARATOR).collect();
    let stream: Vec<u8> = packets.iter().flat_map(|packet| client_frame(0x1, packet)).collect();
    let outcome = read_websocket(&stream, &[], limit);
    let mut expected = Vec::new();
    let mut end = Some(1006);
    for packet in &packets {
        if packet.len() > limit {
            end = Some(1009);
            break;
        }
        if std::str::from_utf8(packet).is_err() {
            end = Some(1007);
            break;
        }
        expected.push(Message::Text(packet.to_vec()));
    }
    assert_eq!((&outcome.messages, outcome.end), (&expected, end), "the packets of {body:?}");

    if let Some(Message::Text(first)) = outcome.messages.first()
        && connect_auth(first).is_ok()
    {
        // `/` written out (`40/,`) is the default namespace too.
        let auth = first.strip_prefix(b"40").map(|rest| rest.strip_prefix(b"/,").unwrap_or(rest));
        let auth = auth.unwrap_or(b"x");
        assert!(
            auth.is_empty() || (auth.starts_with(b"{") && auth.trim_ascii_end().ends_with(b"}")),
            "CONNECT {first:?}"
        );
    }
    let mut codec = Codec::SocketIo(Box::new(SocketIoCodec::new(crate::codec::socketio::Pid::new("pid"), false)));
    for message in &outcome.messages {
        let Message::Text(packet) = message else { continue };
        let decoded = codec.decode(packet);
        assert!(decoded.len() <= 1, "{} outcomes of {packet:?}", decoded.len());
        if matches!(decoded.as_slice(), [Err(Refusal::Close(_))]) {
            return;
        }
    }
}
