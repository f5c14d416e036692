#!/usr/bin/env bash
# The end-to-end benchmark (performance issue): direct TCP vs `ssh -D` vs hopmesh.
#
#   benches/run.sh [OUT_DIR] [hopmesh-bench run flags...]     (OUT_DIR: benches/results/latest)
#
# 1. builds the release binaries;
# 2. `hopmesh-bench run`: backend, OpenSSH and hopmesh meshes as real processes on loopback,
#    workloads 1-4 and 6-8 with the systems interleaved in every round;
# 3. workload 5, the lossy link, in network namespaces (`netns/run.sh bench_lossy`, root);
# 4. `hopmesh-bench report`: OUT_DIR/results.md and SVG plots from OUT_DIR/results.json.
# Needs OpenSSH (client and server) and, for workload 5, root with iproute2, nftables, curl and
# python3; as root, missing Debian packages are installed. Talks only to loopback and to
# namespaces it creates; every process it starts is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benches/results/latest}
shift || true
BIN=${CARGO_TARGET_DIR:-target}/release

if ! { command -v sshd || [ -x /usr/sbin/sshd ]; } >/dev/null || ! command -v ssh >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq openssh-server openssh-client >/dev/null
    else
        echo "benches/run.sh: OpenSSH missing: apt-get install openssh-server openssh-client" >&2
        exit 1
    fi
fi
cargo build --release --bins
mkdir -p "$OUT"
# Only this benchmark's own files: the simulator's reports (sim*.md, sim-*/) share the directory.
rm -f "$OUT"/results.json "$OUT"/results.md "$OUT"/{throughput,latency_w2,latency_w3,scale}.svg
"$BIN/hopmesh-bench" run --out "$OUT" "$@"
if [ "$(id -u)" = 0 ]; then
    for tool in ip nft conntrack curl; do
        command -v "$tool" >/dev/null || apt-get install -y -qq iproute2 nftables conntrack curl >/dev/null
    done
    BENCH_OUT=$(realpath "$OUT") HOPMESH_BIN="$BIN" netns/run.sh bench_lossy
else
    echo "benches/run.sh: workload 5 (lossy link) needs root for network namespaces; reported as not run" >&2
fi
"$BIN/hopmesh-bench" report --out "$OUT"
