#![no_main]
//! Fuzz target: see `hopmesh_protocol::fuzzing::policy` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hopmesh_protocol::fuzzing::policy(data);
});
