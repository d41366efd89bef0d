//! See `herald_gateway::fuzzing::centrifugal_command` for the input and the properties checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_gateway::fuzzing::centrifugal_command(data));
