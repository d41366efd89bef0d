//! The Protobuf encoding of the Centrifugal protocol (subprotocol `centrifuge-protobuf`, the one
//! centrifuge-swift, centrifuge-java and centrifuge-dart speak). The codec builds every reply as
//! the JSON the JSON encoding sends; this module transcodes between that JSON and the protocol's
//! Protobuf messages (field numbers from the protocol's `client.proto`). Each command and reply is
//! prefixed by its length as a varint; several may share one binary WebSocket frame.

use base64::Engine;
use serde_json::{Map, Value};

/// How a field is written.
#[derive(Clone, Copy)]
enum Kind {
    Varint,
    Bool,
    Str,
    /// Bytes that the JSON encoding embeds as JSON (`data`): the payload itself here.
    Data,
    Message(&'static str),
    Repeated(&'static str),
    /// `map<string, Message>`.
    MapOf(&'static str),
    /// `map<string, string>`.
    StringMap,
}

/// The fields of the messages Herald reads or writes: (name, number, kind).
fn fields(message: &str) -> &'static [(&'static str, u32, Kind)] {
    use Kind::*;
    match message {
        "Command" => &[
            ("id", 1, Varint),
            ("connect", 4, Message("ConnectRequest")),
            ("subscribe", 5, Message("SubscribeRequest")),
            ("unsubscribe", 6, Message("UnsubscribeRequest")),
            ("publish", 7, Message("Empty")),
            ("presence", 8, Message("Empty")),
            ("presence_stats", 9, Message("ChannelRequest")),
            ("history", 10, Message("Empty")),
            ("ping", 11, Message("Empty")),
            ("send", 12, Message("Empty")),
            ("rpc", 13, Message("RPCRequest")),
            ("refresh", 14, Message("RefreshRequest")),
            ("sub_refresh", 15, Message("Empty")),
        ],
        "Reply" => &[
            ("id", 1, Varint),
            ("error", 2, Message("Error")),
            ("push", 4, Message("Push")),
            ("connect", 5, Message("ConnectResult")),
            ("subscribe", 6, Message("SubscribeResult")),
            ("unsubscribe", 7, Message("Empty")),
            ("presence_stats", 10, Message("PresenceStatsResult")),
            ("rpc", 13, Message("RPCResult")),
            ("refresh", 14, Message("RefreshResult")),
        ],
        "Error" => &[("code", 1, Varint), ("message", 2, Str), ("temporary", 3, Bool)],
        "Push" => &[("channel", 2, Str), ("pub", 4, Message("Publication"))],
        "Publication" => &[("data", 4, Data), ("offset", 6, Varint), ("tags", 7, StringMap)],
        "ConnectRequest" => &[("token", 1, Str), ("subs", 3, MapOf("SubscribeRequest")), ("name", 4, Str)],
        "ConnectResult" => &[
            ("client", 1, Str),
            ("version", 2, Str),
            ("expires", 3, Bool),
            ("ttl", 4, Varint),
            ("subs", 6, MapOf("SubscribeResult")),
            ("ping", 7, Varint),
            ("pong", 8, Bool),
        ],
        "SubscribeRequest" => &[
            ("channel", 1, Str),
            ("recover", 3, Bool),
            ("epoch", 6, Str),
            ("offset", 7, Varint),
            // Read only to refuse it.
            ("tf", 13, Message("Empty")),
            ("flag", 14, Varint),
        ],
        "SubscribeResult" => &[
            ("expires", 1, Bool),
            ("ttl", 2, Varint),
            ("recoverable", 3, Bool),
            ("epoch", 6, Str),
            ("publications", 7, Repeated("Publication")),
            ("recovered", 8, Bool),
            ("offset", 9, Varint),
            ("positioned", 10, Bool),
            ("was_recovering", 12, Bool),
        ],
        "UnsubscribeRequest" | "ChannelRequest" => &[("channel", 1, Str)],
        "RPCRequest" => &[("data", 1, Data), ("method", 2, Str)],
        "RPCResult" => &[("data", 1, Data)],
        "RefreshRequest" => &[("token", 1, Str)],
        "RefreshResult" => &[("client", 1, Str), ("version", 2, Str), ("expires", 3, Bool), ("ttl", 4, Varint)],
        "PresenceStatsResult" => &[("num_clients", 1, Varint), ("num_users", 2, Varint)],
        _ => &[],
    }
}

pub(super) fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn write_len(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    write_varint(out, u64::from(number) << 3 | 2);
    write_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The payload a JSON `data` value stands for: a JSON string is text, `{"$base64"}` bytes, anything
/// else the JSON itself (the inverse of how the JSON encoding embeds a payload).
pub(super) fn payload_of(data: &Value) -> Vec<u8> {
    match data {
        Value::String(text) => text.clone().into_bytes(),
        Value::Object(object) if object.len() == 1 => match object.get("$base64").and_then(Value::as_str) {
            Some(encoded) => base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default(),
            None => data.to_string().into_bytes(),
        },
        other => other.to_string().into_bytes(),
    }
}

/// The key of an object that stands for a message already encoded: its bytes, in base64.
pub(super) const ENCODED: &str = "\u{0}encoded";

/// Encodes the JSON `value` as Protobuf `message`.
pub(super) fn encode(message: &str, value: &Value) -> Vec<u8> {
    if let Some(encoded) = value.get(ENCODED).and_then(Value::as_str) {
        return base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default();
    }
    let mut out = Vec::new();
    let Value::Object(object) = value else { return out };
    for &(name, number, kind) in fields(message) {
        let Some(field) = object.get(name).filter(|field| !field.is_null()) else { continue };
        match kind {
            Kind::Varint => {
                if let Some(n) = field.as_u64().filter(|n| *n != 0) {
                    write_varint(&mut out, u64::from(number) << 3);
                    write_varint(&mut out, n);
                }
            }
            Kind::Bool => {
                if field.as_bool() == Some(true) {
                    write_varint(&mut out, u64::from(number) << 3);
                    out.push(1);
                }
            }
            Kind::Str => write_len(&mut out, number, field.as_str().unwrap_or_default().as_bytes()),
            Kind::Data => write_len(&mut out, number, &payload_of(field)),
            Kind::Message(inner) => write_len(&mut out, number, &encode(inner, field)),
            Kind::Repeated(inner) => {
                for item in field.as_array().into_iter().flatten() {
                    write_len(&mut out, number, &encode(inner, item));
                }
            }
            Kind::MapOf(inner) => {
                for (key, item) in field.as_object().into_iter().flatten() {
                    let mut entry = Vec::new();
                    write_len(&mut entry, 1, key.as_bytes());
                    write_len(&mut entry, 2, &encode(inner, item));
                    write_len(&mut out, number, &entry);
                }
            }
            Kind::StringMap => {
                for (key, item) in field.as_object().into_iter().flatten() {
                    let mut entry = Vec::new();
                    write_len(&mut entry, 1, key.as_bytes());
                    write_len(&mut entry, 2, item.as_str().unwrap_or_default().as_bytes());
                    write_len(&mut out, number, &entry);
                }
            }
        }
    }
    out
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Decodes Protobuf `message` into the JSON the JSON encoding would carry; `None` when the bytes
/// are not a valid message.
pub(super) fn decode(message: &str, bytes: &[u8]) -> Option<Value> {
    let mut object = Map::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = read_varint(bytes, &mut at)?;
        let (number, wire) = ((key >> 3) as u32, key & 7);
        let field = fields(message).iter().find(|(_, n, _)| *n == number);
        let value = match wire {
            0 => Value::from(read_varint(bytes, &mut at)?),
            2 => {
                let len = usize::try_from(read_varint(bytes, &mut at)?).ok()?;
                let slice = bytes.get(at..at.checked_add(len)?)?;
                at += len;
                match field.map(|(_, _, kind)| *kind) {
                    Some(Kind::Str) => Value::String(String::from_utf8(slice.to_vec()).ok()?),
                    Some(Kind::Data) => serde_json::from_slice(slice)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(slice).into_owned())),
                    Some(Kind::Message(inner)) => decode(inner, slice)?,
                    Some(Kind::MapOf(inner)) => {
                        let (key, item) = map_entry(slice, inner)?;
                        let name = field?.0.to_string();
                        let map = object.entry(name).or_insert_with(|| Value::Object(Map::new()));
                        map.as_object_mut()?.insert(key, item);
                        continue;
                    }
                    _ => Value::Null,
                }
            }
            1 => {
                at = at.checked_add(8)?;
                Value::Null
            }
            5 => {
                at = at.checked_add(4)?;
                Value::Null
            }
            _ => return None,
        };
        if let Some((name, _, kind)) = field {
            let value = match kind {
                Kind::Bool => Value::Bool(value.as_u64().unwrap_or(0) != 0),
                _ => value,
            };
            object.insert((*name).to_string(), value);
        }
    }
    (at == bytes.len()).then_some(Value::Object(object))
}

/// A `map<string, inner>` entry: key (field 1) and value (field 2).
fn map_entry(bytes: &[u8], inner: &str) -> Option<(String, Value)> {
    let (mut key, mut value) = (String::new(), Value::Object(Map::new()));
    let mut at = 0;
    while at < bytes.len() {
        let tag = read_varint(bytes, &mut at)?;
        if tag & 7 != 2 {
            return None;
        }
        let len = usize::try_from(read_varint(bytes, &mut at)?).ok()?;
        let slice = bytes.get(at..at.checked_add(len)?)?;
        at += len;
        match tag >> 3 {
            1 => key = String::from_utf8(slice.to_vec()).ok()?,
            2 => value = decode(inner, slice)?,
            _ => {}
        }
    }
    Some((key, value))
}

/// The publication push of `message` as a length-prefixed `Reply`, with the payload itself as data.
pub(super) fn push(channel: &str, message: &crate::delivery::message::Message) -> Vec<u8> {
    push_of(channel, &publication(message))
}

/// The Publication of `message`: its payload as published.
pub(super) fn publication(message: &crate::delivery::message::Message) -> Vec<u8> {
    let mut publication = Vec::with_capacity(message.payload.len() + 48);
    write_len(&mut publication, 4, &message.payload);
    write_varint(&mut publication, 6 << 3);
    write_varint(&mut publication, message.seq);
    for (name, value) in [("kind", &*message.kind), ("id", &*message.id)] {
        if !value.is_empty() {
            let mut entry = Vec::new();
            write_len(&mut entry, 1, name.as_bytes());
            write_len(&mut entry, 2, value.as_bytes());
            write_len(&mut publication, 7, &entry);
        }
    }
    publication
}

/// A Reply holding the push of `publication` (a Publication's bytes) in `channel`, length-prefixed.
pub(super) fn push_of(channel: &str, publication: &[u8]) -> Vec<u8> {
    let mut push = Vec::with_capacity(publication.len() + channel.len() + 8);
    write_len(&mut push, 2, channel.as_bytes());
    write_len(&mut push, 4, publication);
    let mut reply = Vec::with_capacity(push.len() + 6);
    write_len(&mut reply, 4, &push);
    delimited(&reply)
}

/// Splits length-prefixed messages.
pub(super) fn split(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut messages = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = usize::try_from(read_varint(bytes, &mut at)?).ok()?;
        messages.push(bytes.get(at..at.checked_add(len)?)?);
        at += len;
    }
    Some(messages)
}

/// `message` with its length prefix.
pub(super) fn delimited(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    write_varint(&mut out, message.len() as u64);
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_and_replies_survive_the_round_trip() {
        let connect =
            json!({"id": 1, "connect": {"token": "t", "subs": {"#42": {"recover": true, "offset": 7, "epoch": "e"}}}});
        assert_eq!(decode("Command", &encode("Command", &connect)), Some(connect));
        let rpc = json!({"id": 3, "rpc": {"method": "echo", "data": {"a": 1}}});
        assert_eq!(decode("Command", &encode("Command", &rpc)), Some(rpc));
        assert_eq!(decode("Command", &[]), Some(json!({})));
        assert_eq!(decode("Command", &[0x0a, 0x05]), None);
    }

    #[test]
    fn a_push_carries_the_payload_itself() {
        let push = json!({"push": {"channel": "news", "pub": {"data": "hi", "offset": 5, "tags": {"kind": "mail"}}}});
        let bytes = encode("Reply", &push);
        // push (4) → publication (4) → data (4) = "hi"
        assert!(bytes.windows(4).any(|w| w == [0x22, 0x02, b'h', b'i']));
    }
}
