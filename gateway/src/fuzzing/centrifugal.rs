//! Centrifugal v2 commands as a client sends them: JSON objects, one per line and possibly several
//! per frame, or length-prefixed Protobuf `Command` messages in a binary frame.

use serde_json::Value;

use crate::codec::centrifugal::{ServerSub, parse_connect, proto_commands};
use crate::codec::{CentrifugalCodec, Codec, Command, Refusal};

/// Any frame: reading it as a first frame (`connect`) or on a connected session never panics; the
/// codec makes at most one outcome of each command (a JSON line that is not blank, or a Protobuf
/// message), each Protobuf command is read as a JSON object, and the codec never subscribes to a
/// `#` channel (the user's own is subscribed on connect, anyone else's refused).
///
/// The input: a byte whose lowest bit chooses the encoding (1: Protobuf), then the frame.
pub fn centrifugal_command(data: &[u8]) {
    let [encoding, frame @ ..] = data else { return };
    let protobuf = encoding & 1 == 1;
    let subs = vec![ServerSub { channel: "#42".into(), recover_from: None, was_recovering: false }];
    let codec = CentrifugalCodec::new("42", "epoch".into(), u64::MAX, 1, subs, protobuf);
    let mut codec = Codec::Centrifugal(Box::new(codec));
    let commands = if protobuf {
        match proto_commands(frame) {
            Some(commands) => commands,
            None => {
                let decoded = codec.decode(frame);
                assert!(matches!(decoded.as_slice(), [Err(Refusal::Close(_))]), "not Protobuf: {decoded:?}");
                return;
            }
        }
    } else {
        frame
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect()
    };
    if protobuf {
        for command in &commands {
            let json = serde_json::from_slice::<Value>(command);
            assert!(matches!(json, Ok(Value::Object(_))), "a Protobuf command read as {command:?}");
        }
    }
    if let Some(first) = commands.first() {
        let _ = parse_connect(first);
    }
    let decoded = codec.decode(frame);
    assert!(decoded.len() <= commands.len(), "{} outcomes of {} commands", decoded.len(), commands.len());
    for outcome in &decoded {
        if let Ok(Command::Subscribe { topic, .. }) = outcome {
            assert!(!topic.starts_with('#'), "subscribed to {topic:?}");
        }
    }
}
