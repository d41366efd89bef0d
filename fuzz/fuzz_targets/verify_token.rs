//! See `herald_gateway::fuzzing::verify_token` for the input and the properties checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_gateway::fuzzing::verify_token(data));
