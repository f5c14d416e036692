//! hopmesh benchmarks. The criterion micro-benches live in `benches/`; run them with
//! `cargo bench -p hopmesh-benches`. Each group carries a baseline measured in the same run
//! (raw HMAC-SHA256, raw Ed25519 verify, raw postcard) so results read as ratios and survive
//! noisy shared machines.
