//! The messages the tool publishes: JSON of a fixed size carrying the publish time, so a receiver in
//! the same process measures publish→receive latency on one monotonic clock.
//!
//! `{"t":<nanoseconds since the tool started>,"p":"xxxx…"}`, padded to the requested size. It is
//! valid JSON, so Herald embeds it as is in a `msg` frame's `data`, and the receiver finds `"t":`
//! the same way in a Herald frame, a NATS `MSG` payload and a raw frame.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;

/// The marker before the timestamp. `"ts":` (Herald's own field) does not match it.
const MARK: &[u8] = b"\"t\":";
/// The marker in a frame that carries the payload inside a JSON string (SockJS).
const ESCAPED_MARK: &[u8] = b"\\\"t\\\":";

/// Nanoseconds since the first call in this process (a monotonic clock).
pub fn now_ns() -> u64 {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    ANCHOR.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A payload of exactly `size` bytes (or the smallest that holds the timestamp) stamped with
/// `stamp_ns`.
pub fn stamped(stamp_ns: u64, size: usize) -> Bytes {
    let head = format!("{{\"t\":{stamp_ns},\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    Bytes::from(out)
}

/// The timestamp in a payload (or in a frame that embeds one), if any.
pub fn stamp_in(bytes: &[u8]) -> Option<u64> {
    let start = match memchr::memmem::find(bytes, MARK) {
        Some(at) => at + MARK.len(),
        None => memchr::memmem::find(bytes, ESCAPED_MARK)? + ESCAPED_MARK.len(),
    };
    let digits = bytes[start..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[start..start + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_has_its_size_and_gives_its_stamp_back() {
        let payload = stamped(123_456_789, 100);
        assert_eq!(payload.len(), 100);
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["t"], 123_456_789);
        let frame = format!(
            r#"{{"type":"msg","seq":1,"to":"user","ts":"2026","data":{}}}"#,
            std::str::from_utf8(&payload).unwrap()
        );
        assert_eq!(stamp_in(frame.as_bytes()), Some(123_456_789));
        assert_eq!(stamp_in(b"{\"ts\":\"x\"}"), None);
        assert_eq!(stamp_in(br#"a["MESSAGE\n\n{\"t\":42,\"p\":\"x\"}\u0000"]"#), Some(42));
        assert_eq!(stamped(u64::MAX, 3).len(), 33);
    }
}
