//! What the fuzz targets (`fuzz/`) call: the gateway's parsers of untrusted input, driven the way
//! the gateway drives them, each with the properties that must hold whatever the input. A broken
//! property panics, which is what a fuzzer reports.
//!
//! Hidden from the documentation: not an API, only what `fuzz/` needs of the crate's internals.

mod websocket;

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
