//! See `herald_gateway::fuzzing::stomp_frame` for the input and the properties checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_gateway::fuzzing::stomp_frame(data));
