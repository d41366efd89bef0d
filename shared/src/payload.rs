//! How a message body becomes the `data` of a frame: the payload itself when it is valid JSON, a
//! JSON string when it is other UTF-8 text, and `{"$base64":"..."}` when it is not UTF-8.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Appends `payload`, encoded as the contract says, to a JSON document being written into `out`.
pub fn write_data(out: &mut Vec<u8>, payload: &[u8]) {
    if is_json(payload) {
        out.extend_from_slice(payload);
    } else if let Ok(text) = std::str::from_utf8(payload) {
        write_json_string(out, text);
    } else {
        out.extend_from_slice(b"{\"$base64\":\"");
        let start = out.len();
        out.resize(start + base64::encoded_len(payload.len(), true).unwrap_or(0), 0);
        let written = STANDARD.encode_slice(payload, &mut out[start..]).unwrap_or(0);
        out.truncate(start + written);
        out.extend_from_slice(b"\"}");
    }
}

/// The `data` value of `payload` as an owned JSON value (for code off the hot path).
pub fn data_value(payload: &[u8]) -> serde_json::Value {
    let mut out = Vec::with_capacity(payload.len() + 2);
    write_data(&mut out, payload);
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}

/// The bytes a client's `data` stands for: the reverse of [`write_data`], for tools and tests.
pub fn data_bytes(data: &serde_json::Value) -> Vec<u8> {
    match data {
        serde_json::Value::String(text) => text.clone().into_bytes(),
        serde_json::Value::Object(map) if map.len() == 1 && map.contains_key("$base64") => {
            map["$base64"].as_str().and_then(|b64| STANDARD.decode(b64).ok()).unwrap_or_default()
        }
        other => other.to_string().into_bytes(),
    }
}

/// `bytes` in standard base64 (a dead letter's payload).
pub fn to_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of standard base64 `text`.
pub fn from_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD.decode(text)
}

/// Whether `payload` is a JSON text that a text frame can carry as it is. The parser skips what
/// it ignores without checking its UTF-8, so that is checked first.
fn is_json(payload: &[u8]) -> bool {
    !payload.is_empty()
        && std::str::from_utf8(payload).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// Appends `text` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(payload: &[u8]) -> String {
        let mut out = Vec::new();
        write_data(&mut out, payload);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_passes_through() {
        assert_eq!(encode(br#"{"text":"hi"}"#), r#"{"text":"hi"}"#);
        assert_eq!(encode(b"42"), "42");
    }

    #[test]
    fn text_becomes_a_string() {
        assert_eq!(encode(b"hello \"world\""), r#""hello \"world\"""#);
        assert_eq!(encode(b""), r#""""#);
        assert_eq!(encode(br#"{"broken":"#), r#""{\"broken\":""#);
    }

    #[test]
    fn binary_becomes_base64() {
        assert_eq!(encode(&[0xff, 0x00, 0x01]), r#"{"$base64":"/wAB"}"#);
        // JSON in form, not UTF-8 inside a string: a text frame cannot carry it.
        assert_eq!(encode(b"{\"a\":\"\xff\"}"), r#"{"$base64":"eyJhIjoi/yJ9"}"#);
        assert_eq!(data_bytes(&data_value(&[0xff, 0x00, 0x01])), vec![0xff, 0x00, 0x01]);
    }
}
