//! hopmesh benchmarks.
//!
//! - Criterion micro-benches in `benches/` (`cargo bench -p hopmesh-benches`). Each group carries
//!   a baseline measured in the same run (raw HMAC-SHA256, raw Ed25519 verify, raw postcard), so
//!   results read as ratios and survive noisy shared machines.
//! - The end-to-end benchmark `hopmesh-bench` (`benches/run.sh`): direct TCP vs `ssh -D` vs
//!   hopmesh on the same workloads, interleaved in rounds; see [`report`] for the targets.
//! - The control-plane simulator `hopmesh-bench sim` ([`sim`]): N simulated nodes against one
//!   real verifier.

pub mod load;
pub mod procs;
pub mod report;
pub mod results;
pub mod sim;
pub mod stats;
pub mod systems;
