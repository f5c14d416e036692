#![no_main]
//! Fuzz target: see `hopmesh_protocol::fuzzing::flow_record` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hopmesh_protocol::fuzzing::flow_record(data);
});
