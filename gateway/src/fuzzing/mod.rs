//! What the fuzz targets (`fuzz/`) call: the gateway's parsers of untrusted input, driven the way
//! the gateway drives them, each with the properties that must hold whatever the input. A broken
//! property panics, which is what a fuzzer reports. The seed corpus and every input a fuzzer found
//! are replayed by this crate's tests.
//!
//! Hidden from the documentation: not an API, only what `fuzz/` needs of the crate's internals.

mod auth;
mod centrifugal;
mod nats;
mod socketio;
mod sse;
mod stomp;
mod websocket;

pub use auth::{authorize, verify_token};
pub use centrifugal::centrifugal_command;
pub use nats::nats_parse;
pub use socketio::socketio_payload;
pub use sse::sse_last_event_id;
pub use stomp::stomp_frame;
pub use websocket::{Message, Outcome, read_websocket, websocket_reader};

/// A tiny deterministic generator (xorshift), for what a fuzz input derives from one seed byte.
pub(crate) struct Rng(u32);

impl Rng {
    pub(crate) fn new(seed: u8) -> Rng {
        Rng(0x9E37_79B9 ^ u32::from(seed))
    }

    /// A number in `1..=max`.
    pub(crate) fn between_one_and(&mut self, max: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        1 + self.0 as usize % max.max(1)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/corpus/<target>` (the seeds) and `fuzz/regressions/<target>` (inputs a
    /// fuzzer found), so that `cargo test` keeps them passing without a fuzzer.
    fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut found = Vec::new();
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else { continue };
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).expect("a readable corpus file");
                found.push((entry.path(), bytes));
            }
        }
        found
    }

    fn replay(target: &str, property: fn(&[u8])) {
        let inputs = inputs(target);
        assert!(!inputs.is_empty(), "no seed corpus for {target}");
        for (path, bytes) in inputs {
            let outcome = std::panic::catch_unwind(|| property(&bytes));
            assert!(outcome.is_ok(), "{} breaks a property of {target}", path.display());
        }
    }

    #[test]
    fn the_websocket_reader_corpus_holds() {
        replay("websocket_reader", super::websocket_reader);
    }

    #[test]
    fn the_nats_parser_corpus_holds() {
        replay("nats_parse", super::nats_parse);
    }

    #[test]
    fn the_token_corpus_holds() {
        replay("verify_token", super::verify_token);
    }

    #[test]
    fn the_authorize_corpus_holds() {
        replay("authorize", super::authorize);
    }

    #[test]
    fn the_stomp_corpus_holds() {
        replay("stomp_frame", super::stomp_frame);
    }

    #[test]
    fn the_last_event_id_corpus_holds() {
        replay("sse_last_event_id", super::sse_last_event_id);
    }

    #[test]
    fn the_socketio_corpus_holds() {
        replay("socketio_payload", super::socketio_payload);
    }

    #[test]
    fn the_centrifugal_corpus_holds() {
        replay("centrifugal_command", super::centrifugal_command);
    }
}
