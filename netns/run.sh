#!/usr/bin/env bash
# hopmesh network-namespace suite: the real binaries in Linux network namespaces, as root.
#
#                       ┌──────────────── router (hmNr) ────────────────┐
#                       │ 192.0.2.1   198.51.100.1   203.0.113.1         │
#                       │ 192.0.2.65  198.51.100.65                      │
#                       └──┬──────────────┬─────────────┬───────┬──────┬─┘
#              cloud1 (hmNc1)   cloud2 (hmNc2)   cloud3 (hmNc3)  verifier  attacker
#              node a 192.0.2.2 node b           node c          (hmNv)    (hmNx)
#              seg s1           198.51.100.2     203.0.113.2     192.0.2.66 198.51.100.66
#              db backend       seg s1, api      seg s2, web     verifier  no attestation
#
# Every address is in a documentation range and exists only inside namespaces this script
# creates (N = this run's pid). Backends listen on each cloud's own 127.0.0.1; apps are real
# `curl --socks5-hostname` processes inside the clouds. Policy: s1 -> s1, s1 -> web.s2.
#
# Usage: netns/run.sh [SCENARIO...]      (all scenarios when none is named)
#        BENCH_OUT=DIR netns/run.sh bench_lossy   (workload 5 of benches/run.sh)
#   HOPMESH_BIN   directory with hopmesh-node, hopmesh-verifier, hopmesh-probe, hopmesh-replay,
#                 hopmesh-flood, hopmesh-stall (bench_lossy: also hopmesh-bench, hopmesh-linkemu)
#                 (target/release)
#   HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1   exit 0 with a notice when not root (never set in CI)
#   NETNS_LEAK_SELFTEST=1   no scenarios: plant a leak of every kind and prove the leak check
#                 fails on them and removes them (see leak_selftest)
# After the scenarios a `leak_check` row always runs: everything the run started is stopped,
# its namespaces deleted, and nothing may be left (processes, namespaces, listening sockets,
# nft tables; netns/leaks.py). It counts in the summary line like a scenario.
# Exit status 0 only if every scenario passed. One line per scenario with result and time.

set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${HOPMESH_BIN:-target/release}")
if [ "$(id -u)" != 0 ]; then
    if [ "${HOPMESH_NETNS_SKIP_IF_NOT_ROOT:-}" = 1 ]; then
        echo "netns suite: not root; skipped on request (HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1)"
        exit 0
    fi
    echo "netns suite: must run as root (network namespaces); set HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1 to skip" >&2
    exit 1
fi
for tool in ip nft conntrack curl sha256sum python3; do
    command -v "$tool" >/dev/null || { echo "netns suite: missing $tool" >&2; exit 1; }
done
for b in hopmesh-node hopmesh-verifier hopmesh-probe hopmesh-replay hopmesh-flood hopmesh-stall; do
    [ -x "$BIN/$b" ] || { echo "netns suite: $BIN/$b not built (cargo build --release --bins)" >&2; exit 1; }
done

P="hm$$"
R=${P}r; V=${P}v; C1=${P}c1; C2=${P}c2; C3=${P}c3; X=${P}x
ALL_NS="$R $V $C1 $C2 $C3 $X"
WORK=$(mktemp -d /tmp/hopmesh-netns.XXXXXX)
LOG="$WORK/suite.log"
declare -A NODE_NS=([a]=$C1 [b]=$C2 [c]=$C3)
declare -A NODE_IP=([a]=192.0.2.2 [b]=198.51.100.2 [c]=203.0.113.2)
VIP=192.0.2.66
NODE="$BIN/hopmesh-node"
VERIFIER="$BIN/hopmesh-verifier"

log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*" >>"$LOG"; }
# n NS CMD...: run CMD inside namespace NS, logged with the namespace.
n() { local ns=$1; shift; log "[$ns] $*"; ip netns exec "$ns" "$@"; }
fail() { echo "    FAIL: $*" | tee -a "$LOG" >&2; return 1; }

# ---------------------------------------------------------------------------- leak tracking
# Every process the suite starts in the background goes through bgn, which lists it in
# $WORK/pids (pid, start time, command); every namespace's inode goes to $WORK/netns; the
# host's listening sockets before the run go to $WORK/listen-baseline. netns/leaks.py reads
# them to find what a run left behind (see leak_check).
: >"$WORK/pids"
: >"$WORK/netns"
ss -Hlntup >"$WORK/listen-baseline" 2>/dev/null || true
track() { # track PID WHAT...
    local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}')
    echo "$1 ${st:--} ${*:2}" >>"$WORK/pids"
}
# bgn NS CMD...: CMD in namespace NS in the background, tracked. `ip netns exec` execs CMD,
# so $! afterwards is CMD's own pid (wait "$!" works as with `&`).
bgn() {
    local ns=$1; shift
    log "[$ns] $* &"
    ip netns exec "$ns" "$@" &
    track $! "[$ns] $*"
}
# The run's live tracked pids (same start time: a reused pid is not ours).
tracked_alive() {
    local pid st cmd
    while read -r pid st cmd; do
        [ "$st" != - ] && [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $20}')" = "$st" ] && echo "$pid"
    done <"$WORK/pids"
    return 0
}
# stop_all: SIGTERM to every tracked process and every process in the run's namespaces; wait
# (bounded) for them to exit. What is still there afterwards is the leak checker's business.
stop_all() {
    local pids ns deadline=$((SECONDS + 20))
    pids="$(tracked_alive) $(for ns in $ALL_NS; do ip netns pids "$ns" 2>/dev/null; done)"
    # shellcheck disable=SC2086
    [ -z "${pids// /}" ] || kill -TERM $pids 2>/dev/null || true
    while [ $SECONDS -lt $deadline ]; do
        pids="$(tracked_alive) $(for ns in $ALL_NS; do ip netns pids "$ns" 2>/dev/null; done)"
        [ -n "${pids// /}" ] || return 0
        sleep 0.1
    done
    log "stop_all: still running after SIGTERM and 20 s: $pids"
}
# leak_inside [--clean]: nothing of the run left inside its namespaces (processes, listening
# sockets, nft tables other than the router's `inet hopmesh`); call after stop_all.
leak_inside() {
    python3 "$PWD/netns/leaks.py" inside --work "$WORK" --allow-table "$R:inet:hopmesh" "$@" $ALL_NS
}
# leak_host [--namespaces-gone] [--clean]: nothing of the run left in the host (processes,
# listening sockets, nft tables; with --namespaces-gone also no namespace named $P*).
leak_host() {
    python3 "$PWD/netns/leaks.py" host --work "$WORK" --bin "$BIN" --prefix "$P" --root $$ "$@"
}
# leak_check: the whole check after the suite: stop everything, check inside the namespaces,
# delete them, check the host. Fails (and removes what it found) if anything was left.
LEAK_CHECKED=0
leak_check() {
    local rc=0
    stop_all
    leak_inside --clean || rc=1
    for ns in $ALL_NS; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done
    sleep 0.2
    for ns in $ALL_NS; do ip netns del "$ns" 2>/dev/null || true; done
    leak_host --namespaces-gone --clean || rc=1
    return $rc
}

cleanup() {
    local rc=$?
    if [ "$LEAK_CHECKED" = 0 ]; then
        # Ended early (a failure, a signal): still stop and remove everything of the run,
        # and say what had to be removed by force.
        LEAK_CHECKED=1
        leak_check >&2 || rc=1
    fi
    if [ "$rc" != 0 ]; then
        echo "---- last 60 log lines ($LOG) ----" >&2
        tail -60 "$LOG" >&2 || true
    fi
    if [ "${HOPMESH_NETNS_KEEP:-}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT

# wait_for SECONDS WHAT CMD...: poll CMD every 100 ms until it succeeds or the deadline passes.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then fail "timed out after ${secs}s waiting for $what"; return 1; fi
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------- topology
topology() {
    for ns in $ALL_NS; do
        ip netns add "$ns"
        echo "$ns $(stat -L -c %i "/run/netns/$ns")" >>"$WORK/netns"
        n "$ns" ip link set lo up
    done
    n "$R" sysctl -qw net.ipv4.ip_forward=1
    local i=0
    for spec in "$C1 192.0.2.1/26 192.0.2.2/26" "$C2 198.51.100.1/26 198.51.100.2/26" \
        "$C3 203.0.113.1/26 203.0.113.2/26" "$V 192.0.2.65/26 192.0.2.66/26" \
        "$X 198.51.100.65/26 198.51.100.66/26"; do
        set -- $spec
        local ns=$1 rip=$2 lip=$3
        i=$((i + 1))
        ip link add "${P}r$i" netns "$R" type veth peer name "${P}l$i" netns "$ns"
        n "$R" ip addr add "$rip" dev "${P}r$i"
        n "$R" ip link set "${P}r$i" up
        n "$ns" ip addr add "$lip" dev "${P}l$i"
        n "$ns" ip link set "${P}l$i" up
        n "$ns" ip route add default via "${rip%/*}"
    done
    # An nftables table in the router for impairments (loss, partitions), empty for now.
    n "$R" nft add table inet hopmesh
    n "$R" nft add chain inet hopmesh forward '{ type filter hook forward priority 0; policy accept; }'
}

# ---------------------------------------------------------------------------- mesh
# The standard test policy (tests/fixtures/standard-policy.toml, the one every test uses),
# pinned to the node binary's SHA-256; every backend on its cloud's own 127.0.0.1:8080.
policy() {
    local m; m=$(sha256sum "$NODE" | cut -d' ' -f1)
    sed -e "s/{measurement}/$m/" -e 's/{api}/127.0.0.1:8080/' -e 's/{db}/127.0.0.1:8080/' \
        -e 's/{web}/127.0.0.1:8080/' tests/fixtures/standard-policy.toml
}

# Extra `serve` flags for the mesh (e.g. --epoch 1 --generation 10 for the rotation scenario).
VERIFIER_FLAGS=()
start_verifier() {
    bgn "$V" "$VERIFIER" --data-dir "$WORK/v" serve --policy "$WORK/policy.toml" --listen "$VIP:7443" \
        --attestation-ttl "${TTL:-30}" "${VERIFIER_FLAGS[@]}" \
        >>"$WORK/verifier.out" 2>>"$WORK/verifier.err"
    wait_for 10 "verifier admin API" n "$V" "$VERIFIER" --data-dir "$WORK/v" nodes
}
stop_verifier() {
    ip netns pids "$V" | xargs -r kill -TERM
    wait_for 10 "verifier stopped" bash -c "[ -z \"\$(ip netns pids $V)\" ]"
}

vcli() { n "$V" "$VERIFIER" --data-dir "$WORK/v" "$@"; }

start_backend() {
    local name=$1 ns=${NODE_NS[$1]}
    mkdir -p "$WORK/www-$name"
    head -c $((8 << 20)) /dev/urandom >"$WORK/www-$name/blob"
    # Larger than every buffer on the path (QUIC windows, socket buffers): a cut is visible.
    [ "$name" != b ] || head -c $((64 << 20)) /dev/urandom >"$WORK/www-$name/big"
    [ "$name" != b ] || head -c $((16 << 20)) /dev/urandom >"$WORK/www-$name/mid"
    echo "hello from $name" >"$WORK/www-$name/hello"
    bgn "$ns" python3 -m http.server 8080 --bind 127.0.0.1 --directory "$WORK/www-$name" \
        >/dev/null 2>>"$WORK/backend-$name.log"
    wait_for 10 "backend $name" n "$ns" curl -sf -o /dev/null http://127.0.0.1:8080/hello
}

write_node_config() {
    local name=$1 offset=${2:-0}
    cat >"$WORK/$name.toml" <<EOF
data_dir = "$WORK/node-$name"
verifier = "$VIP:7443"
listen = "${NODE_IP[$name]}:4433"
advertise = ["${NODE_IP[$name]}:4433"]
socks = "127.0.0.1:1080"
clock_offset = $offset
EOF
}

# start_node NAME: run the node in its namespace (stdout and stderr to node-NAME.out/.err).
start_node() {
    local name=$1 ns=${NODE_NS[$1]}
    : >"$WORK/node-$name.out"
    bgn "$ns" "$NODE" run --config "$WORK/$name.toml" >>"$WORK/node-$name.out" 2>>"$WORK/node-$name.err"
}

# The node's own pid (a backgrounded shell function runs in a subshell, so not $!).
node_pid() { pgrep -f "hopmesh-node run --config $WORK/$1.toml" | head -1; }
not_running() { ! kill -0 "$1" 2>/dev/null; }

# stop_node NAME: SIGTERM; the node must drain, print its final {"stopped":true} line and exit.
stop_node() {
    local pid; pid=$(node_pid "$1")
    [ -n "$pid" ] || fail "node $1 is not running"
    kill -TERM "$pid"
    wait_for 15 "node $1 exits after SIGTERM" not_running "$pid"
    grep -q '"stopped":true' "$WORK/node-$1.out" || fail "node $1 did not shut down cleanly"
}
peer_down() { [ "$(field "$1" "any(p['connected'] for p in s['peers'] if p['name'] == '$2')")" = False ]; }

enroll_node() {
    local name=$1 ns=${NODE_NS[$1]} secret
    secret=$(vcli join-token create --name "$name" --ttl 120 | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    # The join secret on stdin, never on argv (other users can read /proc/PID/cmdline).
    printf '%s\n' "$secret" | n "$ns" "$NODE" enroll --data-dir "$WORK/node-$name" --verifier "$VIP:7443" --join-token-file - \
        --pins "$WORK/pins.json" --advertise "${NODE_IP[$name]}:4433" >>"$WORK/enroll.log"
    write_node_config "$name"
    start_node "$name"
}

# show NAME: the node's exact state (ctl show) as JSON.
show() { n "${NODE_NS[$1]}" "$NODE" ctl --data-dir "$WORK/node-$1" show; }
# field NAME PYEXPR: evaluate PYEXPR on the node's state `s`.
field() { show "$1" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }
ready() { [ "$(field "$1" 's["self_permit"] is None and s["verifier_connected"]')" = True ]; }

bring_up() {
    topology
    policy >"$WORK/policy.toml"
    ! grep -q '"{' "$WORK/policy.toml" || { echo "netns suite: a placeholder of the policy fixture is not filled" >&2; exit 1; }
    vcli init >"$WORK/pins.json"
    start_verifier
    for name in a b c; do start_backend "$name"; done
    for name in a b c; do enroll_node "$name"; done
    for name in a b c; do wait_for 20 "node $name ready" ready "$name"; done
}

# fetch NAME HOST PATH OUT: curl through NAME's SOCKS endpoint; prints curl's exit code.
fetch() {
    local rc=0
    n "${NODE_NS[$1]}" curl -sS --max-time "${FETCH_TIMEOUT:-30}" --socks5-hostname 127.0.0.1:1080 \
        -o "$4" "http://$2/$3" 2>>"$LOG" || rc=$?
    echo "$rc"
}

fetch_ok() { [ "$(FETCH_TIMEOUT=5 fetch "$@")" = 0 ]; }

backend_hits() { grep -c '"GET ' "$WORK/backend-$1.log" 2>/dev/null || true; }
audit_count() { python3 - "$WORK/node-$1/audit.jsonl" "$2" "$3" <<'EOF'
import json, sys
path, event, target = sys.argv[1:]
print(sum(1 for l in open(path) if (r := json.loads(l))["event"] == event and r.get("target") == target))
EOF
}

# ---------------------------------------------------------------------------- scenarios
scenario_bringup() {
    for name in a b c; do
        [ "$(field "$name" 's["attestation"]["valid"]')" = True ] || fail "$name not attested"
    done
    local rc; rc=$(fetch a api.s1.mesh blob "$WORK/got")
    [ "$rc" = 0 ] || fail "a -> api.s1.mesh: curl exit $rc"
    [ "$(sha256sum <"$WORK/got")" = "$(sha256sum <"$WORK/www-b/blob")" ] || fail "checksum mismatch"
    [ "$(field a 's["counters"]["streams_opened"]')" = 1 ] || fail "a streams_opened != 1"
    [ "$(field b 's["counters"]["streams_accepted"]')" = 1 ] || fail "b streams_accepted != 1"
    local a_in b_out a_out b_in
    a_in=$(field a 's["counters"]["bytes_in"]'); b_out=$(field b 's["counters"]["bytes_out"]')
    a_out=$(field a 's["counters"]["bytes_out"]'); b_in=$(field b 's["counters"]["bytes_in"]')
    [ "$a_in" = "$b_out" ] && [ "$a_out" = "$b_in" ] || fail "byte counters disagree: a in/out $a_in/$a_out, b out/in $b_out/$b_in"
    [ "$a_in" -gt $((8 << 20)) ] || fail "a received only $a_in bytes"
    [ "$(field a '[p["name"] for p in s["peers"] if p["connected"]]')" = "['b']" ] || fail "a's connected peers"
}

scenario_matrix() {
    # source node, name, allowed?
    local cells="a:api.s1.mesh:1 a:web.s2.mesh:1 b:db.s1.mesh:1 b:web.s2.mesh:1
                 c:api.s1.mesh:0 c:db.s1.mesh:0 a:db.s1.mesh:0 c:web.s2.mesh:0"
    for cell in $cells; do
        IFS=: read -r src host allowed <<<"$cell"
        local svc_node; case $host in api.*) svc_node=b ;; db.*) svc_node=a ;; web.*) svc_node=c ;; esac
        local before rc after; before=$(backend_hits "$svc_node")
        rc=$(fetch "$src" "$host" hello "$WORK/cell")
        after=$(backend_hits "$svc_node")
        if [ "$allowed" = 1 ]; then
            [ "$rc" = 0 ] || fail "$src -> $host must be allowed (curl $rc)"
            grep -q "hello from $svc_node" "$WORK/cell" || fail "$src -> $host wrong body"
        else
            [ "$rc" = 97 ] || fail "$src -> $host must be refused with REP 0x02 (curl $rc)"
            [ "$before" = "$after" ] || fail "$src -> $host reached the backend"
            [ "$(audit_count "$src" socks_refused "$host")" = 1 ] || fail "$src -> $host not audited exactly once"
        fi
    done
}

# Relays are blind (paths issue): with `[[route]] a -> c via b`, a's flows to web.s2 go through
# b, sealed end to end. b runs with the test hooks (node/src/relay_tap.rs): its dump of every
# relayed byte never holds the marker the served file is full of, and one byte flipped in the
# second relayed flow resets that flow at the end node (a, the download direction): curl gets
# an error, never a clean short file. Everything is restored afterwards.
MARKER=HOPMESH-PLAINTEXT-MARKER
counter() { field "$1" "s['counters']['$2']"; }
refused() { field "$1" "s['counters']['refused'].get('$2', 0)"; }
# path_is VIA: a's path to web.s2.mesh goes through VIA (None: direct).
path_is() { [ "$(field a "[p['via'] for p in s['paths'] if p['name'] == 'web.s2.mesh'][0]")" = "$1" ]; }
scenario_relay_blind() {
    python3 -c "import sys; sys.stdout.buffer.write(b'$MARKER-' * 400000)" >"$WORK/www-c/marked"
    # The check itself finds the marker in clear bytes.
    grep -q "$MARKER" "$WORK/www-c/marked" || fail "the marker check cannot see clear bytes"
    stop_node b
    : >"$WORK/relay.dump"
    export HOPMESH_TEST_RELAY_DUMP="$WORK/relay.dump" HOPMESH_TEST_RELAY_FLIP=2:down:2000000
    start_node b
    unset HOPMESH_TEST_RELAY_DUMP HOPMESH_TEST_RELAY_FLIP
    wait_for 20 "node b ready" ready b
    grep -q "TEST HOOK" "$WORK/node-b.err" || fail "b does not announce its test hooks"
    { policy; printf '\n[[route]]\nfrom = "a"\nto = "c"\nvia = "b"\n'; } >"$WORK/policy.toml"
    vcli policy reload >>"$LOG"
    wait_for 15 "a's path to web.s2 via b" path_is b
    local a0 c0 b0 rc size
    a0=$(counter a sealed_flows); c0=$(counter c sealed_flows); b0=$(counter b streams_accepted)
    # 1. Byte-identical through the relay, sealed at both ends, ciphertext only at the relay.
    rc=$(fetch a web.s2.mesh marked "$WORK/got-marked")
    [ "$rc" = 0 ] || fail "a -> web.s2.mesh via b: curl exit $rc"
    cmp -s "$WORK/got-marked" "$WORK/www-c/marked" || fail "relayed file differs"
    [ "$(counter a sealed_flows)" = $((a0 + 1)) ] || fail "a did not seal the flow"
    [ "$(counter c sealed_flows)" = $((c0 + 1)) ] || fail "c did not seal the flow"
    [ "$(counter b streams_accepted)" = $((b0 + 1)) ] || fail "the flow did not go through b"
    size=$(stat -c %s "$WORK/www-c/marked")
    [ "$(stat -c %s "$WORK/relay.dump")" -ge "$size" ] || fail "b relayed fewer bytes than the file"
    ! grep -q "$MARKER" "$WORK/relay.dump" || fail "the relay saw plaintext"
    # 2. The second relayed flow: one byte flipped at b on the way back; a resets it.
    local bad0; bad0=$(refused a flow_record_bad)
    rm -f "$WORK/got-flipped"
    rc=$(fetch a web.s2.mesh marked "$WORK/got-flipped")
    [ "$rc" != 0 ] || fail "a flipped record must fail the transfer, curl exited 0"
    ! cmp -s "$WORK/got-flipped" "$WORK/www-c/marked" || fail "flipped flow delivered the whole file"
    [ "$(refused a flow_record_bad)" = $((bad0 + 1)) ] || fail "a did not refuse the changed record"
    grep -q 'flipped one relayed byte' "$WORK/node-b.err" || fail "b never flipped the byte"
    python3 - "$WORK/node-a/audit.jsonl" <<'PY' || fail "a did not audit flow_record_refused"
import json, sys
sys.exit(0 if any(json.loads(l).get("reason") == "flow_record_bad" for l in open(sys.argv[1])) else 1)
PY
    # Restore: the standard policy, b without hooks, a's path direct again.
    policy >"$WORK/policy.toml"
    vcli policy reload >>"$LOG"
    stop_node b
    start_node b
    wait_for 20 "node b ready" ready b
    wait_for 15 "a's path to web.s2 direct" path_is None
    fetch_ok a web.s2.mesh hello "$WORK/after" || fail "a -> web.s2.mesh after the restore"
}

scenario_attacker() {
    # The SOCKS endpoint is loopback-only: unreachable from the underlay.
    if n "$X" curl -sS --max-time 5 --socks5-hostname "${NODE_IP[a]}:1080" -o /dev/null http://api.s1.mesh/hello 2>>"$LOG"; then
        fail "SOCKS reachable from the attacker namespace"
    fi
    # A fresh key with the right ALPN gets no stream through.
    local b_id; b_id=$(field b 's["node_id"]')
    n "$X" "$BIN/hopmesh-probe" "${NODE_IP[b]}:4433" "$b_id" >>"$LOG" || fail "unattested handshake accepted"
    [ "$(field b 's["counters"]["refused"].get("not_a_peer", 0) >= 1')" = True ] || fail "b did not count the refusal"
    # A token captured on one connection and replayed on another: the client holds node a's
    # key and attestation (from a's data dir) and gets a's seeds from the verifier like any
    # node; the honest stream is accepted, the replay refused (other exporter: bad MAC).
    local before; before=$(field b 's["counters"]["refused"].get("bad_mac", 0)')
    n "$X" "$BIN/hopmesh-replay" "$WORK/node-a" "$VIP:7443" "${NODE_IP[b]}:4433" "$b_id" api.s1.mesh >>"$LOG" 2>&1 \
        || fail "the replayed token was not refused (or the honest stream failed)"
    [ "$(field b 's["counters"]["refused"].get("bad_mac", 0)')" = $((before + 1)) ] || fail "b did not count the replay as bad_mac"
    local audited; audited=$(python3 -c "import json; print(sum(1 for l in open('$WORK/node-b/audit.jsonl') if (r := json.loads(l))['event'] == 'stream_refused' and r['reason'] == 'bad_mac'))")
    [ "$audited" = $((before + 1)) ] || fail "the replay was not audited exactly once ($audited)"
}

verifier_pid() { pgrep -f "hopmesh-verifier --data-dir $WORK/v serve" | head -1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
vmetric() { # vmetric REGEX: the sum of the verifier's metric lines matching REGEX
    curl -s --max-time 5 --unix-socket "$WORK/v/admin.sock" http://v/metrics |
        awk -v re="$1" '$0 !~ /^#/ && $1 ~ re {s += $2} END {print s + 0}'
}

# flood_run NAME SECS MAX: the attacker floods the verifier (hopmesh-flood) in the background;
# FLOOD_PID is its pid, its JSON summary goes to $WORK/NAME.out.
flood_run() {
    bgn "$X" "$BIN/hopmesh-flood" "$VIP:7443" "$WORK/pins.json" "$2" "$3" >"$WORK/$1.out" 2>>"$LOG"
    FLOOD_PID=$!
}

scenario_flood() {
    # An unauthenticated flood from the attacker namespace for 25 s: up to 5 000 connections
    # with fresh keys, each opening 100 idle bidirectional streams and 100 unidirectional ones
    # with data. Before the QUIC budgets, 16 such connections took the verifier from 9 to
    # 209 MiB. Now its RSS stays at or under 64 MiB, enrolled nodes keep refreshing, and
    # traffic keeps flowing.
    local vpid; vpid=$(verifier_pid)
    [ -n "$vpid" ] || fail "no verifier process"
    local rss0 max na0 na1 failures=0 tries=0 r; rss0=$(rss_kib "$vpid"); max=$rss0
    na0=$(field a 's["attestation"]["not_after"]')
    flood_run flood 25 5000
    while kill -0 "$FLOOD_PID" 2>/dev/null; do
        r=$(rss_kib "$vpid"); [ "$r" -le "$max" ] || max=$r
        tries=$((tries + 1))
        fetch_ok a api.s1.mesh hello "$WORK/flood-get" || failures=$((failures + 1))
        sleep 1
    done
    wait "$FLOOD_PID" || fail "the flooder failed"
    na1=$(field a 's["attestation"]["not_after"]')
    local refused; refused=$(vmetric 'connection_refusals')
    echo "    flood: $(cat "$WORK/flood.out"); verifier RSS ${rss0} -> max ${max} KiB; a refreshed: $na0 -> $na1; $failures of $tries fetches failed; refusals counted: $refused" | tee -a "$LOG"
    [ "$max" -le $((64 << 10)) ] || fail "verifier RSS reached $max KiB under the flood (> 64 MiB)"
    [ "$na1" -gt "$na0" ] || fail "node a did not refresh its attestation during the flood"
    [ "$failures" = 0 ] || fail "$failures of $tries fetches failed during the flood"
    [ "$refused" -gt 0 ] || fail "the verifier counted no refusal: the flood did not reach a limit"
}

scenario_flood_restart() {
    # The attacker holds every unauthenticated slot it can get and keeps trying, and the
    # verifier restarts in the middle: afterwards every enrolled node gets back in (nothing of
    # the attacker's is persisted, and enrolled keys have their own pool).
    flood_run flood-restart 40 20000
    sleep 5 # let the flood take the slots: a fixed lead is the point here
    stop_verifier
    start_verifier
    local t0=$SECONDS name
    for name in a b c; do wait_for 30 "node $name back at the verifier under the flood" ready "$name"; done
    echo "    flood_restart: all nodes back $((SECONDS - t0)) s after the restart, flood still on: $(kill -0 "$FLOOD_PID" 2>/dev/null && echo yes || echo no)" | tee -a "$LOG"
    wait "$FLOOD_PID" || fail "the flooder failed"
    log "flood_restart: $(cat "$WORK/flood-restart.out")"
    [ "$(fetch a api.s1.mesh hello "$WORK/fr")" = 0 ] || fail "a -> api.s1 after the restart under flood"
}

scenario_stall() {
    # From the attacker namespace, a peer holding node c's key and attestation connects to a and
    # never reads its control stream. a's next renewal to it finds no credit: a must close that
    # connection (CONTROL_STALLED) while it keeps refreshing and serving; before the write
    # deadlines, one such peer could hold a's renewals and pushes.
    local a_id; a_id=$(field a 's["node_id"]')
    local na0; na0=$(field a 's["attestation"]["not_after"]')
    bgn "$X" "$BIN/hopmesh-stall" "$WORK/node-c" "${NODE_IP[a]}:4433" "$a_id" 60 >"$WORK/stall.out" 2>>"$LOG"
    local stall_pid=$! failures=0 tries=0
    while kill -0 "$stall_pid" 2>/dev/null; do
        tries=$((tries + 1))
        fetch_ok a api.s1.mesh hello "$WORK/stall-get" || failures=$((failures + 1))
        sleep 1
    done
    local rc=0; wait "$stall_pid" || rc=$?
    echo "    stall: $(cat "$WORK/stall.out") after ${tries} s; a's attestation $na0 -> $(field a 's["attestation"]["not_after"]'); $failures of $tries fetches failed" | tee -a "$LOG"
    [ "$rc" = 0 ] || fail "a did not close the peer that never reads with CONTROL_STALLED"
    [ "$(field a 's["attestation"]["not_after"]')" -gt "$na0" ] || fail "a did not refresh"
    [ "$failures" = 0 ] || fail "$failures fetches failed while a peer stalled a"
    wait_for 20 "honest c still connected to the verifier" ready c
}

scenario_partition() {
    # A 3 s partition between clouds 1 and 2 (shorter than the 30 s idle timeout) during a
    # paced transfer: it stalls, then resumes and completes byte-identical.
    bgn "$C1" curl -sS --max-time 60 --limit-rate 2M --socks5-hostname 127.0.0.1:1080 -o "$WORK/part" \
        http://api.s1.mesh/mid 2>>"$LOG"
    local curl_pid=$!
    wait_for 10 "transfer flowing" test -s "$WORK/part"
    n "$R" nft add rule inet hopmesh forward ip saddr 192.0.2.2 ip daddr 198.51.100.2 drop
    n "$R" nft add rule inet hopmesh forward ip saddr 198.51.100.2 ip daddr 192.0.2.2 drop
    sleep 3 # the partition itself: a fixed length is the point here
    n "$R" nft flush chain inet hopmesh forward
    local rc=0; wait "$curl_pid" || rc=$?
    [ "$rc" = 0 ] || fail "transfer across a short partition failed (curl $rc)"
    [ "$(sha256sum <"$WORK/part")" = "$(sha256sum <"$WORK/www-b/mid")" ] || fail "checksum mismatch after the partition"
}

scenario_long_partition() {
    # A 35 s partition (longer than the 30 s idle timeout): the transfer in flight ends in an
    # explicit error, never a clean truncation; once healed, fresh connections carry traffic.
    bgn "$C1" curl -sS --max-time 120 --limit-rate 1M --socks5-hostname 127.0.0.1:1080 -o "$WORK/lpart" \
        http://api.s1.mesh/big 2>>"$LOG"
    local curl_pid=$!
    wait_for 10 "transfer flowing" test -s "$WORK/lpart"
    n "$R" nft add rule inet hopmesh forward ip saddr 192.0.2.2 ip daddr 198.51.100.2 drop
    n "$R" nft add rule inet hopmesh forward ip saddr 198.51.100.2 ip daddr 192.0.2.2 drop
    local rc=0; wait "$curl_pid" || rc=$?
    [ "$rc" != 0 ] || fail "a transfer cut by a long partition must end in an error"
    [ "$(stat -c %s "$WORK/lpart")" -lt $((64 << 20)) ] || fail "the transfer was not cut"
    [ "$(field a '[p["connected"] for p in s["peers"] if p["name"] == "b"]')" = "[False]" ] || fail "a still claims a connection to b"
    n "$R" nft flush chain inet hopmesh forward
    local t0=$SECONDS
    wait_for 40 "a -> b recovers after healing" fetch_ok a api.s1.mesh hello "$WORK/lp"
    echo "    long partition: curl ended with $rc; recovered $((SECONDS - t0)) s after healing" | tee -a "$LOG"
}

scenario_outage() {
    # Verifier down: service continues while attestations are valid; after expiry (TTL 30 s)
    # nodes fail closed with REP 0x02; verifier back: service recovers without operator action.
    stop_verifier
    [ "$(fetch a api.s1.mesh hello "$WORK/o")" = 0 ] || fail "service must continue right after the outage starts"
    wait_for 45 "a fails closed" bash -c "ip netns exec $C1 $NODE ctl --data-dir $WORK/node-a show | grep -q 'attestation expired'"
    [ "$(fetch a api.s1.mesh hello "$WORK/o")" = 97 ] || fail "an expired node must answer REP 0x02"
    start_verifier
    wait_for 45 "a recovers" ready a
    wait_for 45 "b recovers" ready b
    [ "$(fetch a api.s1.mesh hello "$WORK/o")" = 0 ] || fail "service must recover"
}

scenario_rotation() {
    # Epoch 1 s and generation 10 s: a ≥ 30 s transfer and 1 000 short requests, nothing refused.
    stop_verifier
    VERIFIER_FLAGS=(--epoch 1 --generation 10)
    start_verifier
    for name in a b c; do
        wait_for 45 "$name on epoch 1 s" bash -c "[ \"\$(ip netns exec ${NODE_NS[$name]} $NODE ctl --data-dir $WORK/node-$name show | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s[\"epoch_secs\"], s[\"self_permit\"])')\" = '1 None' ]"
    done
    local before; before=$(field b 'sum(s["counters"]["refused"].values())')
    bgn "$C1" curl -sS --max-time 120 --limit-rate 1M --socks5-hostname 127.0.0.1:1080 -o "$WORK/rot" \
        http://api.s1.mesh/big 2>>"$LOG"
    local curl_pid=$! i failures=0
    local started=$SECONDS
    i=0
    # At least 1 000 short requests, and for at least 30 s (three generations).
    while [ $i -lt 1000 ] || [ $((SECONDS - started)) -lt 30 ]; do
        [ "$(fetch a api.s1.mesh hello "$WORK/rot-short")" = 0 ] || failures=$((failures + 1))
        i=$((i + 1))
    done
    local rc=0; wait "$curl_pid" || rc=$?
    echo "    rotation: 64 MiB transfer and $i short requests over $((SECONDS - started)) s" | tee -a "$LOG"
    [ "$rc" = 0 ] || fail "long transfer across rotations failed (curl $rc)"
    [ "$(sha256sum <"$WORK/rot")" = "$(sha256sum <"$WORK/www-b/big")" ] || fail "long transfer checksum mismatch"
    [ "$failures" = 0 ] || fail "$failures of $i short requests failed"
    [ "$(field b 'sum(s["counters"]["refused"].values())')" = "$before" ] || fail "b refused streams during rotation"
}

scenario_loss_delay() {
    # 5 % loss each way and 100 ms RTT between clouds 1 and 2: a 64 MiB transfer arrives
    # byte-identical with zero token refusals. a's packets to b are DNAT'ed to a user-space
    # delay relay in the router (50 ms each way); nftables drops 5 % of them in both directions.
    # netem where the kernel has it (50 ms and 5 % loss on each router leg: 100 ms RTT); this
    # kernel has none, so a user-space relay plus nftables does the same job.
    local mode=relay
    if n "$R" tc qdisc add dev "${P}r1" root netem delay 50ms loss 5% 2>>"$LOG"; then
        n "$R" tc qdisc add dev "${P}r2" root netem delay 50ms loss 5%
        mode=netem
    else
        bgn "$R" python3 "$PWD/netns/udp_delay.py" 192.0.2.1 5000 198.51.100.2 4433 50 300 >>"$LOG" 2>&1
        n "$R" nft add table ip hmnat
        n "$R" nft add chain ip hmnat pre '{ type nat hook prerouting priority -100; }'
        n "$R" nft add chain ip hmnat out '{ type nat hook output priority -100; }'
        n "$R" nft add chain ip hmnat post '{ type nat hook postrouting priority 100; }'
        n "$R" nft add rule ip hmnat pre ip saddr 192.0.2.2 ip daddr 198.51.100.2 udp dport 4433 dnat to 192.0.2.1:5000
        n "$R" nft add chain inet hopmesh in '{ type filter hook input priority 0; policy accept; }'
        n "$R" nft add rule inet hopmesh in udp dport 5000 numgen random mod 100 '<' 5 drop
        n "$R" nft add rule inet hopmesh in ip saddr 198.51.100.2 udp sport 4433 numgen random mod 100 '<' 5 drop
        # Existing flows keep their (un-NATed) conntrack entries: forget them, so the live QUIC
        # connection migrates onto the impaired path.
        n "$R" conntrack -D -p udp --orig-src 192.0.2.2 --orig-dst 198.51.100.2 >>"$LOG" 2>&1 || true
    fi
    local before; before=$(field b 'sum(s["counters"]["refused"].values())')
    local t0=$SECONDS rc; rc=$(FETCH_TIMEOUT=300 fetch a api.s1.mesh big "$WORK/lossy")
    echo "    loss_delay ($mode): 64 MiB in $((SECONDS - t0)) s" | tee -a "$LOG"
    if [ "$mode" = netem ]; then
        n "$R" tc qdisc del dev "${P}r1" root
        n "$R" tc qdisc del dev "${P}r2" root
    else
        n "$R" nft delete table ip hmnat
        n "$R" nft delete chain inet hopmesh in
    fi
    [ "$rc" = 0 ] || fail "64 MiB over a lossy, delayed link failed (curl $rc)"
    [ "$(sha256sum <"$WORK/lossy")" = "$(sha256sum <"$WORK/www-b/big")" ] || fail "checksum mismatch over the lossy link"
    [ "$(field b 'sum(s["counters"]["refused"].values())')" = "$before" ] || fail "token refusals on the lossy link"
    local dropped; dropped=$(n "$R" nft list ruleset | grep -c 'numgen' || true)
    log "loss rules were active: $dropped"
}

scenario_revocation() {
    # A slow transfer a -> api.s1 (on b) in flight, then revoke b.
    bgn "$C1" curl -sS --max-time 60 --limit-rate 2M --socks5-hostname 127.0.0.1:1080 -o "$WORK/partial" \
        http://api.s1.mesh/big 2>>"$LOG"
    local curl_pid=$!
    wait_for 10 "transfer a -> b flowing" test -s "$WORK/partial"
    local t0 t1; t0=$(date +%s.%N)
    vcli revoke b >>"$LOG"
    wait_for 5 "a to drop b" peer_down a b
    t1=$(date +%s.%N)
    local ms; ms=$(python3 -c "print(int(($t1 - $t0) * 1000))")
    echo "    revocation: a dropped b ${ms} ms after the revoke was acknowledged" | tee -a "$LOG"
    [ "$ms" -le 1000 ] || fail "revocation took ${ms} ms (> 1 s)"
    local rc=0; wait "$curl_pid" || rc=$?
    [ "$rc" != 0 ] || fail "the interrupted transfer ended cleanly"
    [ "$(stat -c %s "$WORK/partial")" -lt $((64 << 20)) ] || fail "the transfer was not interrupted"
    # Other pairs unaffected.
    [ "$(fetch a web.s2.mesh hello "$WORK/other")" = 0 ] || fail "a -> web.s2 broke"
}

scenario_kill9() {
    # Revoke c, kill -9 the verifier right after the acknowledgement, restart: still revoked.
    vcli revoke c >>"$LOG"
    ip netns pids "$V" | xargs -r kill -9
    sleep 0.2
    start_verifier
    local revoked; revoked=$(vcli nodes | python3 -c 'import json,sys; print([n["name"] for n in json.load(sys.stdin) if n["revoked_at"]])')
    case $revoked in *"'c'"*) ;; *) fail "revocation of c lost after kill -9 (revoked: $revoked)" ;; esac
    vcli audit verify >>"$LOG" || fail "audit chain broken"
}

scenario_clock_skew() {
    # Node a's clock +25 s: 2.5 epochs ahead (E = 10 s): its tokens are refused at b.
    stop_node a
    write_node_config a 25
    start_node a
    wait_for 20 "skewed node a ready" ready a
    local before; before=$(field b 's["counters"]["refused"].get("epoch_out_of_window", 0)')
    local rc; rc=$(fetch a api.s1.mesh hello "$WORK/skew")
    [ "$rc" != 0 ] || fail "a 25 s ahead must be refused"
    # Refused explicitly at one end or the other: b refuses a's tokens (epoch out of window),
    # or, when b's attestation has less than 25 s left (TTL 30 s here: most of the time), a
    # finds b's attestation expired on its own clock and refuses b (audited peer_refused).
    local at_b at_a
    at_b=$(field b 's["counters"]["refused"].get("epoch_out_of_window", 0)')
    at_a=$(python3 -c "import json; print(sum(1 for l in open('$WORK/node-a/audit.jsonl') if (r := json.loads(l))['event'] == 'peer_refused' and r['ts'] >= $(date +%s) + 25 - 60))")
    log "clock_skew: b epoch refusals $before -> $at_b; a's peer_refused records in the last minute (its clock): $at_a"
    [ "$at_b" -gt "$before" ] || [ "$at_a" -gt 0 ] || fail "neither b refused a's tokens (epoch) nor a refused b (expired)"
    # Back inside the window (+5 s): works again.
    stop_node a
    write_node_config a 5
    start_node a
    wait_for 20 "node a ready" ready a
    [ "$(fetch a api.s1.mesh hello "$WORK/skew")" = 0 ] || fail "a 5 s ahead must work"
    # Leave the clock right for later scenarios (5 s is out of window once E = 1 s).
    stop_node a
    write_node_config a 0
    start_node a
    wait_for 20 "node a ready" ready a
}

scenario_clock_behind() {
    # Node a's clock 3 s behind the verifier's (and b's) during a 64 MiB download paced at
    # 1 MB/s (about 64 s: several refreshes at TTL 30 s). Before the backdated not_before and
    # the held attestation, such a transfer was cut at the first refresh (curl 56, `own
    # attestation invalid`). It must arrive byte-identical, with nothing refused at b.
    stop_node a
    write_node_config a -3
    start_node a
    wait_for 20 "node a (3 s behind) ready" ready a
    local before; before=$(field b 'sum(s["counters"]["refused"].values())')
    bgn "$C1" curl -sS --max-time 150 --limit-rate 1M --socks5-hostname 127.0.0.1:1080 -o "$WORK/behind" \
        http://api.s1.mesh/big 2>>"$LOG"
    local curl_pid=$! seen="" na
    # Sample a's attestation expiry while the transfer runs (bounded by curl's --max-time).
    while kill -0 "$curl_pid" 2>/dev/null; do
        na=$(field a 's["attestation"]["not_after"]' 2>/dev/null || true)
        case " $seen " in *" $na "*) ;; *) seen="$seen $na" ;; esac
        sleep 2
    done
    local rc=0; wait "$curl_pid" || rc=$?
    local refreshes=$(($(wc -w <<<"$seen") - 1))
    echo "    clock_behind: 64 MiB with node a 3 s behind, $refreshes refreshes during the transfer, curl $rc" | tee -a "$LOG"
    [ "$rc" = 0 ] || fail "a transfer from a node 3 s behind was cut (curl $rc)"
    [ "$(sha256sum <"$WORK/behind")" = "$(sha256sum <"$WORK/www-b/big")" ] || fail "checksum mismatch with the clock behind"
    [ "$refreshes" -ge 2 ] || fail "only $refreshes refreshes during the transfer: it did not cross refresh boundaries"
    [ "$(field b 'sum(s["counters"]["refused"].values())')" = "$before" ] || fail "b refused streams from the node behind"
    stop_node a
    write_node_config a 0
    start_node a
    wait_for 20 "node a ready" ready a
}

scenario_shutdown_leaks() {
    # SIGTERM every node: each exits on its own within the drain deadline, printing its final
    # line, and takes its sockets with it.
    for name in a b c; do stop_node "$name"; done
    local name
    for name in a b c; do
        if n "${NODE_NS[$name]}" ss -Hlntup | grep -E ':(1080|4433)\b'; then
            fail "node $name's sockets outlived it"
        fi
    done
    # Then everything else the suite started (verifier, backends, relays): afterwards nothing of
    # the run may be left, neither inside the namespaces (processes, listening sockets, stray
    # nft tables) nor in the host (processes, listeners, nft tables). The mesh is down after
    # this scenario: it runs last.
    stop_all
    local rc=0
    leak_inside --clean || rc=1
    leak_host --clean || rc=1
    [ "$rc" = 0 ] || fail "the mesh left something behind when stopped (LEAK lines above)"
}

# ---------------------------------------------------------------------------- benchmark
# Workload 5 of the benchmark (benches/run.sh), not a pass/fail scenario: run only when named,
# `BENCH_OUT=DIR netns/run.sh bench_lossy`. Between clouds 1 and 2 a WAN link emulated by a TUN
# device in the router (hopmesh-linkemu, netns/linkemu/, since this kernel has no netem): it holds every
# packet half the RTT each way and, when capped, serializes at the rate with a 200-packet
# drop-tail queue per direction; nftables (numgen) drops the loss each way. The same link for
# both systems: hopmesh (a -> api.s1 on b, its default BBR) and kernel TCP with BBR set in both
# namespaces (curl in cloud 1 straight to an HTTP server in cloud 2). Points (workload key):
#   w5   100 Mbit/s, 20 ms RTT, 1 % loss, 16 MiB (both at the line rate: a sanity point)
#   w5u  uncapped,   20 ms RTT, 1 % loss, 256 MiB
#   w5h  uncapped,   50 ms RTT, 5 % loss, 256 MiB
# and the emulator's own ceiling: kernel TCP over the uncapped 20 ms link without loss (w5u,
# metric "no-loss MB/s"), and the emulator's CPU use during each transfer (metric "emulator CPU
# %", of one core: near 100 the emulator, not the protocol, sets the figure). Rounds
# interleave the two systems; each transfer is checked byte for byte; figures go to
# DIR/results.json.
scenario_bench_lossy() {
    local out=${BENCH_OUT:?set BENCH_OUT to the results directory} rounds=${BENCH_ROUNDS:-3}
    local b
    for b in hopmesh-bench hopmesh-linkemu; do
        [ -x "$BIN/$b" ] || fail "$BIN/$b not built (cargo build --release --bins)"
    done
    local cc1 cc2
    cc1=$(n "$C1" sysctl -n net.ipv4.tcp_congestion_control)
    cc2=$(n "$C2" sysctl -n net.ipv4.tcp_congestion_control)
    n "$C1" sysctl -qw net.ipv4.tcp_congestion_control=bbr
    n "$C2" sysctl -qw net.ipv4.tcp_congestion_control=bbr
    bgn "$C2" python3 -m http.server 8090 --bind 198.51.100.2 --directory "$WORK/www-b" \
        >/dev/null 2>>"$WORK/backend-direct.log"
    wait_for 20 "direct HTTP server in cloud 2" n "$C1" curl -sf -o /dev/null http://198.51.100.2:8090/hello
    # Uncapped transfers are long enough (256 MiB) that start-up is a small part of them.
    head -c $((256 << 20)) /dev/urandom >"$WORK/www-b/huge"
    lossy_point w5 10 100 1 mid "$rounds"
    lossy_point w5u 10 0 1 huge "$rounds" ceiling
    lossy_point w5h 25 0 5 huge "$rounds"
    rm -f "$WORK/www-b/huge" "$WORK"/lossy-*
    n "$C1" sysctl -qw "net.ipv4.tcp_congestion_control=$cc1"
    n "$C2" sysctl -qw "net.ipv4.tcp_congestion_control=$cc2"
}

# lossy_point KEY ONE_WAY_MS RATE_MBIT(0 = uncapped) LOSS_PCT FILE ROUNDS [ceiling]
lossy_point() {
    local key=$1 delay=$2 rate=$3 loss=$4 file=$5 rounds=$6 ceiling=${7:-}
    local tun=${P}t bytes emu round sys t0 t1 rc mbps
    bytes=$(stat -c %s "$WORK/www-b/$file")
    bgn "$R" "$BIN/hopmesh-linkemu" "$tun" "$delay" "$rate" 200 1800 >>"$LOG" 2>&1
    emu=$!
    wait_for 10 "tun device" n "$R" ip link show "$tun"
    n "$R" ip link set "$tun" up
    n "$R" sysctl -qw net.ipv4.conf.all.rp_filter=0 "net.ipv4.conf.$tun.rp_filter=0"
    n "$R" ip route add default dev "$tun" table 100
    n "$R" ip rule add iif "${P}r1" to 198.51.100.0/26 lookup 100
    n "$R" ip rule add iif "${P}r2" to 192.0.2.0/26 lookup 100
    # TCP connect time is one round trip: proof the delay is in the path.
    local rtt; rtt=$(n "$C1" curl -s -o /dev/null -w '%{time_connect}' http://198.51.100.2:8090/hello)
    echo "    bench_lossy $key: ${rate/#0/uncapped} Mbit/s, $loss % loss: TCP connect (1 RTT) ${rtt} s" | tee -a "$LOG"
    python3 -c "import sys; sys.exit(0 if float('$rtt') >= 2 * $delay / 1000 * 0.75 else 1)" \
        || fail "the link is not delayed (RTT $rtt s, want $((2 * delay)) ms)"
    # transfer SYS OUTFILE: curl over the link (hopmesh through a's SOCKS endpoint), checked.
    local c0 c1 cpu
    # emu_ticks: the emulator's user + system CPU time in clock ticks.
    emu_ticks() { awk '{print $14 + $15}' "/proc/$emu/stat"; }
    transfer() {
        rm -f "$2"
        rc=0
        c0=$(emu_ticks)
        t0=$(date +%s.%N)
        if [ "$1" = tcp ]; then
            n "$C1" curl -sS --max-time 300 -o "$2" "http://198.51.100.2:8090/$file" 2>>"$LOG" || rc=$?
        else
            n "$C1" curl -sS --max-time 300 --socks5-hostname 127.0.0.1:1080 -o "$2" \
                "http://api.s1.mesh/$file" 2>>"$LOG" || rc=$?
        fi
        t1=$(date +%s.%N)
        c1=$(emu_ticks)
        cpu=$(python3 -c "print(round(($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0) * 100, 1))")
        [ "$rc" = 0 ] || fail "$1 transfer over the $key link failed (curl $rc)"
        [ "$(sha256sum <"$2")" = "$(sha256sum <"$WORK/www-b/$file")" ] || fail "$1: checksum mismatch"
        mbps=$(python3 -c "print($bytes / 1e6 / ($t1 - $t0))")
    }
    if [ -n "$ceiling" ]; then
        for round in $(seq 1 "$rounds"); do
            transfer tcp "$WORK/lossy-tcp"
            echo "    bench_lossy $key round $round: emulator ceiling (kernel TCP, no loss) $mbps MB/s, emulator CPU $cpu %" | tee -a "$LOG"
            "$BIN/hopmesh-bench" add --out "$out" --workload "$key" --system "kernel TCP" --metric "no-loss MB/s" --value "$mbps"
        done
    fi
    n "$R" nft add rule inet hopmesh forward iifname "$tun" numgen random mod 100 '<' "$loss" counter drop
    for round in $(seq 1 "$rounds"); do
        local order="tcp hopmesh"; [ $((round % 2)) = 0 ] && order="hopmesh tcp"
        for sys in $order; do
            transfer "$sys" "$WORK/lossy-$sys"
            echo "    bench_lossy $key round $round: $sys $mbps MB/s, emulator CPU $cpu %" | tee -a "$LOG"
            local name="kernel TCP"; [ "$sys" = hopmesh ] && name=hopmesh
            "$BIN/hopmesh-bench" add --out "$out" --workload "$key" --system "$name" --metric MB/s --value "$mbps"
            "$BIN/hopmesh-bench" add --out "$out" --workload "$key" --system "$name" --metric "emulator CPU %" --value "$cpu"
        done
    done
    n "$R" ip rule del iif "${P}r1" to 198.51.100.0/26 lookup 100
    n "$R" ip rule del iif "${P}r2" to 192.0.2.0/26 lookup 100
    n "$R" nft list chain inet hopmesh forward >>"$LOG"
    n "$R" nft flush chain inet hopmesh forward
    kill "$emu"
    wait "$emu" || true
    wait_for 10 "tun device gone" bash -c "! ip netns exec $R ip link show $tun"
}

# ---------------------------------------------------------------------------- leak self-test
# NETNS_LEAK_SELFTEST=1 netns/run.sh: proof that the leak check fails when something is left.
# Builds the topology (no mesh), plants one leak of every kind, runs leak_check (it must fail
# and name each one), then checks that leak_check removed them all. Exit 0 only if so.
leak_selftest() {
    echo "netns leak self-test: run $$, work dir $WORK"
    topology
    # 1. A tracked process that ignores SIGTERM (stop_all cannot end it): `sleep 300`.
    setsid bash -c 'trap "" TERM; exec sleep 300' </dev/null >/dev/null 2>&1 &
    local sleep_pid=$!
    track "$sleep_pid" "planted: sleep 300"
    # 2. An untracked hopmesh-node (its name, really `sleep 300`) of this run re-parented away
    #    from the suite: only pgrep and its work-dir argument find it.
    setsid -f bash -c 'exec -a "$0 $*" sleep 300' "$NODE" run --config "$WORK/leak.toml" </dev/null >/dev/null 2>&1
    # 3. An untracked listener inside a namespace that ignores SIGTERM.
    ip netns exec "$C1" python3 -c 'import signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.bind(("127.0.0.1", 8080)); s.listen(); time.sleep(300)' </dev/null >/dev/null 2>&1 &
    # 4. An untracked listener in the host (loopback, port 0) that ignores SIGTERM.
    python3 -c 'import signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); time.sleep(300)' </dev/null >/dev/null 2>&1 &
    local host_pid=$!
    # 5. A namespace of the run that teardown does not know about, 6. an nft table in the host
    #    (empty: no chain, no effect on traffic).
    ip netns add "${P}leak"
    nft add table inet "${P}leak"
    wait_for 10 "planted listeners" bash -c "ip netns exec $C1 ss -Hlnt | grep -q 127.0.0.1:8080 && ss -Hlntp | grep -q pid=$host_pid,"
    local fake_pid; fake_pid=$(pgrep -f "^$NODE run --config $WORK/leak.toml")

    local out="$WORK/selftest.out" rc=0
    leak_check >"$out" 2>&1 || rc=$?
    LEAK_CHECKED=1
    sed 's/^/    | /' "$out"
    local bad=0
    [ "$rc" != 0 ] || { echo "    FAIL: leak_check passed with six planted leaks"; bad=1; }
    local want
    for want in "LEAK process: $sleep_pid (tracked)" \
        "LEAK process: $fake_pid (hopmesh binary, names the work dir)" \
        "LEAK process: [0-9]* still inside namespace $C1" "LEAK listener: in namespace $C1: tcp .*127.0.0.1:8080" \
        "LEAK process: $host_pid (a descendant of the suite)" "LEAK listener: in the host: .*pid=$host_pid," \
        "LEAK namespace: ${P}leak" "LEAK nft: table inet ${P}leak in the host"; do
        grep -q -- "$want" "$out" || { echo "    FAIL: leak_check did not report: $want"; bad=1; }
    done
    # It removed what it found: nothing left now.
    sleep 0.3
    if ! leak_host --namespaces-gone >"$WORK/selftest.after" 2>&1; then
        echo "    FAIL: still left after leak_check cleaned up:"; cat "$WORK/selftest.after"; bad=1
    fi
    for pid in "$sleep_pid" "$fake_pid" "$host_pid"; do
        [ ! -d "/proc/$pid" ] || [ "$(awk '{print $3}' "/proc/$pid/stat")" = Z ] || { echo "    FAIL: planted pid $pid still running"; bad=1; }
    done
    if [ "$bad" = 0 ]; then
        echo "netns leak self-test: PASS (leak_check failed as it must, reported all 6 planted leaks, removed them)"
    else
        echo "netns leak self-test: FAIL"
    fi
    return "$bad"
}

# ---------------------------------------------------------------------------- runner
ORDER="bringup matrix relay_blind attacker flood flood_restart stall clock_skew clock_behind partition long_partition outage rotation loss_delay revocation kill9 shutdown_leaks"
SELECTED=${*:-$ORDER}
if [ "${NETNS_LEAK_SELFTEST:-}" = 1 ]; then
    leak_selftest
    exit
fi
echo "netns suite: run $$, work dir $WORK"
bring_up
failed=0
# Benchmarks run only when named.
for s in $ORDER bench_lossy; do
    case " $SELECTED " in *" $s "*) ;; *) continue ;; esac
    start=$(date +%s.%N)
    # Not inside `if`: bash ignores `set -e` in a subshell used as a condition.
    set +e
    ( set -e; "scenario_$s" )
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then result=PASS; else result=FAIL; failed=$((failed + 1)); fi
    printf '%-16s %s %6.1fs\n' "$s" "$result" "$(python3 -c "print($(date +%s.%N) - $start)")"
done
# After the suite, always: everything the run started is stopped and its namespaces deleted;
# nothing may be left (a row of its own, counted like a scenario).
start=$(date +%s.%N)
set +e
( set -e; leak_check )
rc=$?
set -e
LEAK_CHECKED=1
if [ "$rc" = 0 ]; then result=PASS; else result=FAIL; failed=$((failed + 1)); fi
printf '%-16s %s %6.1fs\n' leak_check "$result" "$(python3 -c "print($(date +%s.%N) - $start)")"
count=$(($(wc -w <<<"$SELECTED") + 1))
echo "netns: $((count - failed)) passed, $failed failed"
[ "$failed" = 0 ]
