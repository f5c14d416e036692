#![no_main]
//! Fuzz target: see `hopmesh_protocol::replica_bundle::fuzz_decoders` for the properties
//! checked (both decoders of the replica bundle; never `open`, whose KDF is slow).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hopmesh_protocol::replica_bundle::fuzz_decoders(data);
});
