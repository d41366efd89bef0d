//! See `herald_gateway::fuzzing::sse_last_event_id` for the input and the properties checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_gateway::fuzzing::sse_last_event_id(data));
