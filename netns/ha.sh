#!/usr/bin/env bash
# hopmesh HA network-namespace suite: three verifier replicas serving one PostgreSQL database,
# nodes listing all three, the real binaries in Linux network namespaces, as root.
#
#                 ┌─────────────────────────── router (hmhaNr) ───────────────────────────┐
#                 │ 192.0.2.65  192.0.2.129  192.0.2.193  203.0.113.65  (forwards only)    │
#                 │ 192.0.2.1   198.51.100.1 203.0.113.1                                   │
#                 └──┬───────────┬────────────┬────────────┬───────────┬──────────┬───────┬┘
#        replica v1 (hmhaNv1)  v2 (…v2)   v3 (…v3)   database (…db)  cloud1     cloud2   cloud3
#        192.0.2.66:7443       192.0.2.130 192.0.2.194 203.0.113.66   node a     node b   node c, d
#                                                      PostgreSQL     192.0.2.2  198.51.  203.0.113.2
#                                                      :5432, TLS     db.s1      100.2    web.s2 (c)
#                                                                                api.s1
#
# Every address is in a documentation range and exists only inside namespaces this script
# creates (N = this run's pid; the prefix `hmha` keeps them apart from netns/run.sh's `hmN`).
# PostgreSQL is a throwaway cluster in the run's work dir (initdb/pg_ctl as the `postgres`
# user), listening on the database namespace's address only, TLS on with a server certificate
# for 203.0.113.66 signed by a CA this script makes (openssl); replicas reach it with
# `--store postgresql://hopmesh:…@203.0.113.66:5432/hopmesh --store-ca CA.pem` (the URL with
# its random password in the environment, never on a command line); scram-sha-256 over TLS
# from the three replica addresses only. v1 is `init`ed, v2 and v3 are `init --replica-of` a
# bundle `replica export`ed from v1. Policy: the standard test policy (s1 -> s1, s1 -> web.s2)
# plus node d in s1 and, in a segment s3 that reaches nothing, spare nodes enrolled with
# `hopmesh-node enroll` but never run (revoke and enrolment targets). Nodes a, b, c, d run
# with `verifiers = [v1, v2, v3]`.
#
# Scenarios (in this order; each prints one line: name, PASS/FAIL, seconds):
#   ha_kill_storm      50 revokes of spare nodes by three concurrent clients, one per replica
#                      (sharing one queue of targets); right after the 25th acknowledgement the
#                      replica that gave it is killed with SIGKILL while its next revoke is in
#                      flight (its unfinished target goes back to the queue), then restarted.
#                      A checker proves: every acknowledged revoke has its own version; versions
#                      increase in real time (an acknowledgement that ended before another
#                      started has the lower version); every running node's
#                      revocation_version reaches the highest acknowledged version; every
#                      replica's admin node list shows every acknowledged node revoked. Then
#                      the CONTROL: the same checker on the same evidence plus one fake
#                      acknowledgement (a revoke never sent) must FAIL, and so must it with the
#                      first and last versions swapped, and with one version given twice.
#                      Passes only if the real run passes and every control fails.
#   ha_db_down         PostgreSQL stopped: at every replica a revoke and an enrolment (with a
#                      join secret made before) are refused within a bound, and each replica
#                      audits that it fenced itself; running nodes keep serving on their
#                      current attestations for at least 8 s of outage (curl through SOCKS
#                      a -> b, b -> a, a -> c; every node's self_permit null); PostgreSQL back:
#                      every replica serves again within a bound, the enrolment refused at v1
#                      now succeeds with the same secret (the refusal consumed nothing), and a
#                      revoke of running node d is acknowledged and enforced: a, b, c hold the
#                      new list, d's fetch is refused, every replica lists d revoked and
#                      refuses d (verifier_refused in d's audit log). (d itself fails closed
#                      only when its attestation runs out; it is stopped afterwards.)
#   ha_rolling_restart The three replicas restarted one at a time (SIGTERM, start, wait until it
#                      serves and every node is back) while fetches between the nodes run in a
#                      bounded loop and one paced 1 MiB stream is open: every fetch succeeds
#                      (and some finish inside each restart), the stream arrives intact, no
#                      node's refusal counters move, every node's self_permit stays null.
#   ha_partition       The replica with the most nodes subscribed cut from the database (nft in
#                      the database's namespace drops its packets both ways) for three TTLs
#                      (3 x 30 s) while fetches run: it audits `fenced`, refuses a write, issues
#                      no attestation (its attestations_issued metric unchanged), holds no
#                      node session at any sample; every node subscribes at another replica,
#                      every fetch succeeds, no refusal counter moves, no node's self_permit is
#                      set. Healed: it serves again (a write acknowledged) and audits
#                      `serving_again`.
# After the scenarios a `leak_check` row always runs: PostgreSQL stopped, everything the run
# started stopped, its namespaces deleted, and nothing may be left (processes, namespaces,
# listening sockets, nft tables: netns/leaks.py; the cluster directory); the work dir is
# removed at exit (an exit status of 1 if it cannot be).
#
# Usage: netns/ha.sh [SCENARIO...]      (all scenarios when none is named; a scenario may
#                                         depend on the ones before it: name a prefix of ORDER)
#   HOPMESH_BIN   directory with hopmesh-node and hopmesh-verifier (target/release)
#   HOPMESH_PG_BIN   PostgreSQL's bin directory (default: newest /usr/lib/postgresql/*/bin)
#   HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1   exit 0 with a notice when not root (never set in CI)
#   HOPMESH_NETNS_KEEP=1   keep the work dir (logs) after the run
# Exit status 0 only if every scenario passed. Summary line: `netns-ha: N passed, M failed`.

set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${HOPMESH_BIN:-target/release}")
if [ "$(id -u)" != 0 ]; then
    if [ "${HOPMESH_NETNS_SKIP_IF_NOT_ROOT:-}" = 1 ]; then
        echo "netns-ha suite: not root; skipped on request (HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1)"
        exit 0
    fi
    echo "netns-ha suite: must run as root (network namespaces); set HOPMESH_NETNS_SKIP_IF_NOT_ROOT=1 to skip" >&2
    exit 1
fi
for tool in ip nft curl sha256sum python3 openssl runuser pgrep; do
    command -v "$tool" >/dev/null || { echo "netns-ha suite: missing $tool" >&2; exit 1; }
done
for b in hopmesh-node hopmesh-verifier; do
    [ -x "$BIN/$b" ] || { echo "netns-ha suite: $BIN/$b not built (cargo build --release --bins)" >&2; exit 1; }
done
PG_BIN=${HOPMESH_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/psql" ] ||
    { echo "netns-ha suite: PostgreSQL not found (apt-get install postgresql, or set HOPMESH_PG_BIN)" >&2; exit 1; }
id postgres >/dev/null 2>&1 || { echo "netns-ha suite: no postgres user (the postgresql package makes it)" >&2; exit 1; }

P="hmha$$"
R=${P}r; DB=${P}db; C1=${P}c1; C2=${P}c2; C3=${P}c3
declare -A VNS=([1]=${P}v1 [2]=${P}v2 [3]=${P}v3)
declare -A VIP=([1]=192.0.2.66 [2]=192.0.2.130 [3]=192.0.2.194)
ALL_NS="$R $DB ${VNS[1]} ${VNS[2]} ${VNS[3]} $C1 $C2 $C3"
DBIP=203.0.113.66
WORK=$(mktemp -d /tmp/hopmesh-netns-ha.XXXXXX)
# The cluster lives in the work dir (owned by postgres there): the work dir must be
# traversable by postgres, nothing in it readable by it but its own directory.
chmod 711 "$WORK"
PGDIR="$WORK/pg"
LOG="$WORK/suite.log"
NODES="a b c d"
declare -A NODE_NS=([a]=$C1 [b]=$C2 [c]=$C3 [d]=$C3)
declare -A NODE_IP=([a]=192.0.2.2 [b]=198.51.100.2 [c]=203.0.113.2 [d]=203.0.113.2)
declare -A NODE_PORT=([a]=4433 [b]=4433 [c]=4433 [d]=4434)
declare -A NODE_SOCKS=([a]=1080 [b]=1080 [c]=1080 [d]=1081)
NODE="$BIN/hopmesh-node"
VERIFIER="$BIN/hopmesh-verifier"
# Attestation lifetime of the replicas' serve.
TTL=30
STORMS=50

log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*" >>"$LOG"; }
# n NS CMD...: run CMD inside namespace NS, logged with the namespace.
n() { local ns=$1; shift; log "[$ns] $*"; ip netns exec "$ns" "$@"; }
fail() { echo "    FAIL: $*" | tee -a "$LOG" >&2; return 1; }
note() { echo "    $*" | tee -a "$LOG"; }
now_ms() { date +%s%3N; }
secs_since() { python3 -c "print(f'{($(now_ms) - $1) / 1000:.1f}')"; }

# ---------------------------------------------------------------------------- leak tracking
# As netns/run.sh: every background process goes through bgn (listed in $WORK/pids with its
# start time), every namespace's inode goes to $WORK/netns, the host's listeners before the run
# to $WORK/listen-baseline; netns/leaks.py reads them.
: >"$WORK/pids"
: >"$WORK/netns"
ss -Hlntup >"$WORK/listen-baseline" 2>/dev/null || true
track() { # track PID WHAT...
    local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}')
    echo "$1 ${st:--} ${*:2}" >>"$WORK/pids"
}
bgn() {
    local ns=$1; shift
    log "[$ns] $* &"
    ip netns exec "$ns" "$@" &
    track $! "[$ns] $*"
}
tracked_alive() {
    local pid st cmd
    while read -r pid st cmd; do
        [ "$st" != - ] && [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $20}')" = "$st" ] && echo "$pid"
    done <"$WORK/pids"
    return 0
}
ns_pids() { for ns in $ALL_NS; do ip netns pids "$ns" 2>/dev/null; done; }
stop_all() {
    local pids deadline=$((SECONDS + 20))
    pids="$(tracked_alive) $(ns_pids)"
    # shellcheck disable=SC2086
    [ -z "${pids//[[:space:]]/}" ] || kill -TERM $pids 2>/dev/null || true
    while [ $SECONDS -lt $deadline ]; do
        pids="$(tracked_alive) $(ns_pids)"
        [ -n "${pids//[[:space:]]/}" ] || return 0
        sleep 0.1
    done
    log "stop_all: still running after SIGTERM and 20 s: $pids"
}
leak_inside() {
    python3 "$PWD/netns/leaks.py" inside --work "$WORK" "$@" $ALL_NS
}
leak_host() {
    python3 "$PWD/netns/leaks.py" host --work "$WORK" --bin "$BIN" --prefix "$P" --root $$ "$@"
}
# leak_check: PostgreSQL stopped (pg_ctl, bounded), then as netns/run.sh (stop everything,
# check inside the namespaces, delete them, check the host), then the cluster's directory is
# removed and no process of it may be left. Fails (and removes what it found) if anything was.
LEAK_CHECKED=0
leak_check() {
    local rc=0
    # Replicas first (they hold sessions; PostgreSQL's fast shutdown ends them anyway).
    for i in 1 2 3; do ip netns pids "${VNS[$i]}" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true; done
    pg_running && { pg_stop >>"$LOG" 2>&1 || log "leak_check: pg_ctl stop failed"; }
    stop_all
    leak_inside --clean || rc=1
    for ns in $ALL_NS; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done
    sleep 0.2
    for ns in $ALL_NS; do ip netns del "$ns" 2>/dev/null || true; done
    leak_host --namespaces-gone --clean || rc=1
    if [ -d "$PGDIR" ]; then
        local left; left=$(pgrep -f -- "$PGDIR" || true)
        if [ -n "$left" ]; then
            echo "LEAK process: PostgreSQL of the run still running: $left"
            kill -9 $left 2>/dev/null || true
            rc=1
        fi
        rm -rf "$PGDIR"
        [ ! -e "$PGDIR" ] || { echo "LEAK dir: the cluster directory $PGDIR could not be removed"; rc=1; }
    fi
    return $rc
}

cleanup() {
    local rc=$?
    if [ "$LEAK_CHECKED" = 0 ]; then
        LEAK_CHECKED=1
        leak_check >&2 || rc=1
    fi
    if [ "$rc" != 0 ]; then
        echo "---- last 80 log lines ($LOG) ----" >&2
        tail -80 "$LOG" >&2 || true
    fi
    if [ "${HOPMESH_NETNS_KEEP:-}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
        if [ -e "$WORK" ]; then echo "netns-ha: LEAK dir: the work dir $WORK could not be removed" >&2; rc=1; fi
    fi
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
    local i=0 spec
    for spec in "${VNS[1]} 192.0.2.65/26 192.0.2.66/26" "${VNS[2]} 192.0.2.129/26 192.0.2.130/26" \
        "${VNS[3]} 192.0.2.193/26 192.0.2.194/26" "$DB 203.0.113.65/26 $DBIP/26" \
        "$C1 192.0.2.1/26 192.0.2.2/26" "$C2 198.51.100.1/26 198.51.100.2/26" \
        "$C3 203.0.113.1/26 203.0.113.2/26"; do
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
}

# ---------------------------------------------------------------------------- PostgreSQL
pg() { # pg PROGRAM ARGS...: a PostgreSQL program as the postgres user inside the database namespace
    local prog=$1; shift
    n "$DB" runuser -u postgres -- "$PG_BIN/$prog" "$@"
}
pg_running() { [ -f "$PGDIR/data/postmaster.pid" ] && pg pg_ctl -D "$PGDIR/data" status >/dev/null 2>&1; }
pg_stop() { pg pg_ctl -w -t 30 -m fast -D "$PGDIR/data" stop; }
pg_start() { pg pg_ctl -w -t 30 -D "$PGDIR/data" -l "$PGDIR/log" start; }
psql_admin() { pg psql -X -q -v ON_ERROR_STOP=1 -h "$PGDIR" -p 5432 -U postgres -d postgres "$@"; }

pg_setup() {
    mkdir -p "$WORK/tls"
    local t="$WORK/tls"
    # A CA of the run, and a server certificate for the database address signed by it.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=hopmesh netns-ha test CA $$" -keyout "$t/ca.key" -out "$t/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" >>"$LOG" 2>&1
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$DBIP" \
        -keyout "$t/server.key" -out "$t/server.csr" >>"$LOG" 2>&1
    printf 'subjectAltName=IP:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$DBIP" >"$t/server.ext"
    openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -extfile "$t/server.ext" -out "$t/server.crt" >>"$LOG" 2>&1
    STORE_CA="$t/ca.pem"
    mkdir -m 700 "$PGDIR"
    chown postgres: "$PGDIR"
    pg initdb -A trust -U postgres -E UTF8 --no-sync -D "$PGDIR/data" >>"$LOG" 2>&1
    install -o postgres -m 600 "$t/server.key" "$PGDIR/data/server.key"
    install -o postgres -m 644 "$t/server.crt" "$PGDIR/data/server.crt"
    cat >>"$PGDIR/data/postgresql.conf" <<EOF
listen_addresses = '$DBIP'
port = 5432
unix_socket_directories = '$PGDIR'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
fsync = off
max_connections = 100
EOF
    # Superuser only on the cluster's own socket; the replicas: TLS, password, their address.
    {
        echo "local all postgres trust"
        for i in 1 2 3; do echo "hostssl hopmesh hopmesh ${VIP[$i]}/32 scram-sha-256"; done
    } >"$PGDIR/data/pg_hba.conf"
    pg_start >>"$LOG" 2>&1
    local pw; pw=$(openssl rand -hex 16)
    psql_admin <<EOF >>"$LOG" 2>&1
CREATE ROLE hopmesh LOGIN PASSWORD '$pw';
CREATE DATABASE hopmesh OWNER hopmesh;
EOF
    # The password in the environment of the verifier's store commands only (not on argv).
    STORE_URL="postgresql://hopmesh:$pw@$DBIP:5432/hopmesh"
}

# ---------------------------------------------------------------------------- mesh
policy() {
    local m; m=$(sha256sum "$NODE" | cut -d' ' -f1)
    sed -e "s/{measurement}/$m/" -e 's/{api}/127.0.0.1:8080/' -e 's/{db}/127.0.0.1:8080/' \
        -e 's/{web}/127.0.0.1:8080/' tests/fixtures/standard-policy.toml
    printf '\n[[segment]]\nname = "s3"\n\n[[node]]\nname = "d"\nsegments = ["s1"]\n'
    for s in $(spare_names); do printf '\n[[node]]\nname = "%s"\nsegments = ["s3"]\n' "$s"; done
}
# Spare nodes (enrolled, never run): storm targets r01..r50, the control's z1 (never revoked),
# db_down's x1..x3 (revoke attempts while the database is down), e1..e3 (enrolments refused
# while it is down), p1 (spare), probe (join
# secrets made only to see whether a replica acknowledges writes).
spare_names() { seq -f 'r%02g' 1 "$STORMS"; echo z1 x1 x2 x3 e1 e2 e3 p1 probe; }

vcli() { local i=$1; shift; n "${VNS[$i]}" "$VERIFIER" --data-dir "$WORK/v$i" "$@"; }
# vstore I ARGS...: a verifier command that opens the store (init): URL and CA in its environment.
vstore() {
    local i=$1; shift
    HOPMESH_VERIFIER_STORE="$STORE_URL" HOPMESH_VERIFIER_STORE_CA="$STORE_CA" \
        n "${VNS[$i]}" "$VERIFIER" --data-dir "$WORK/v$i" "$@"
}
replica_pid() { pgrep -f "^$VERIFIER --data-dir $WORK/v$1 serve" | head -1; }
not_running() { ! kill -0 "$1" 2>/dev/null; }

# serving I: replica I acknowledges a write now (a join secret for `probe`, never used).
serving() { vcli "$1" join-token create --name probe --ttl 60 >/dev/null 2>>"$LOG"; }

start_replica() {
    local i=$1
    HOPMESH_VERIFIER_STORE="$STORE_URL" HOPMESH_VERIFIER_STORE_CA="$STORE_CA" \
        bgn "${VNS[$i]}" "$VERIFIER" --data-dir "$WORK/v$i" serve --policy "$WORK/policy.toml" \
        --listen "${VIP[$i]}:7443" --attestation-ttl "$TTL" >>"$WORK/v$i.out" 2>>"$WORK/v$i.err"
    # Tracked, not a job of this shell: no "Killed" notice when ha_kill_storm kills it.
    disown "$!"
    wait_for 20 "replica v$i admin API" vcli "$i" nodes
    wait_for 30 "replica v$i serving" serving "$i"
}
stop_replica() {
    local pid; pid=$(replica_pid "$1")
    [ -n "$pid" ] || { fail "replica v$1 is not running"; return 1; }
    kill -TERM "$pid"
    wait_for 15 "replica v$1 exits after SIGTERM" not_running "$pid"
}

start_backend() {
    local name=$1 ns=${NODE_NS[$1]}
    mkdir -p "$WORK/www-$name"
    head -c $((1 << 20)) /dev/urandom >"$WORK/www-$name/blob"
    echo "hello from $name" >"$WORK/www-$name/hello"
    bgn "$ns" python3 -m http.server 8080 --bind 127.0.0.1 --directory "$WORK/www-$name" \
        >/dev/null 2>>"$WORK/backend-$name.log"
    wait_for 10 "backend $name" n "$ns" curl -sf -o /dev/null http://127.0.0.1:8080/hello
}

write_node_config() {
    local name=$1
    cat >"$WORK/$name.toml" <<EOF
data_dir = "$WORK/node-$name"
verifiers = ["${VIP[1]}:7443", "${VIP[2]}:7443", "${VIP[3]}:7443"]
listen = "${NODE_IP[$name]}:${NODE_PORT[$name]}"
advertise = ["${NODE_IP[$name]}:${NODE_PORT[$name]}"]
socks = "127.0.0.1:${NODE_SOCKS[$name]}"
EOF
}
start_node() {
    local name=$1
    : >"$WORK/node-$name.out"
    bgn "${NODE_NS[$name]}" "$NODE" run --config "$WORK/$name.toml" >>"$WORK/node-$name.out" 2>>"$WORK/node-$name.err"
}
node_pid() { pgrep -f "hopmesh-node run --config $WORK/$1.toml" | head -1; }
stop_node() {
    local pid; pid=$(node_pid "$1")
    [ -n "$pid" ] || { fail "node $1 is not running"; return 1; }
    kill -TERM "$pid"
    wait_for 15 "node $1 exits after SIGTERM" not_running "$pid"
}
join_secret() { # join_secret I NAME: a join secret for NAME made at replica I
    vcli "$1" join-token create --name "$2" --ttl 600 | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])'
}
# enroll_at I NS NAME SECRET ADVERTISE: `hopmesh-node enroll` at replica I only (the secret
# on stdin, never on argv).
enroll_at() {
    printf '%s\n' "$4" | n "$2" "$NODE" enroll --data-dir "$WORK/node-$3" --verifier "${VIP[$1]}:7443" \
        --join-token-file - --pins "$WORK/pins.json" --advertise "$5"
}
enroll_node() {
    local name=$1 secret
    secret=$(join_secret 1 "$name")
    write_node_config "$name"
    printf '%s\n' "$secret" | n "${NODE_NS[$name]}" "$NODE" enroll --config "$WORK/$name.toml" \
        --join-token-file - --pins "$WORK/pins.json" >>"$WORK/enroll.log" 2>&1
    start_node "$name"
}
# enroll_spares: every spare node enrolled (not run), the work spread over the replicas.
enroll_spares() {
    local i pids="" k=0 s
    for i in 1 2 3; do
        (
            set -e
            k=0
            for s in $(spare_names); do
                k=$((k + 1))
                [ $((k % 3 + 1)) = "$i" ] || continue
                case $s in e? | p1 | probe) continue ;; esac
                enroll_at "$i" "$C3" "$s" "$(join_secret "$i" "$s")" "203.0.113.2:$((5000 + k))" >>"$WORK/enroll.log" 2>&1
            done
        ) &
        track $! "enroll spares at v$i"
        pids="$pids $!"
    done
    local rc=0 p
    for p in $pids; do wait "$p" || rc=1; done
    [ "$rc" = 0 ] || fail "enrolling the spare nodes failed (see $WORK/enroll.log)"
}

show() { n "${NODE_NS[$1]}" "$NODE" ctl --data-dir "$WORK/node-$1" show; }
field() { show "$1" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }
ready() { [ "$(field "$1" 's["self_permit"] is None and s["verifier_connected"]')" = True ]; }
all_ready() { local x; for x in "$@"; do ready "$x" || return 1; done; }
refused_sum() { field "$1" 'sum(s["counters"]["refused"].values())'; }
failovers() { field "$1" 's["counters"]["verifier_failovers"]'; }

fetch() { # fetch NAME HOST PATH OUT: curl through NAME's SOCKS endpoint; prints curl's exit code
    local rc=0
    n "${NODE_NS[$1]}" curl -sS --max-time "${FETCH_TIMEOUT:-10}" --socks5-hostname "127.0.0.1:${NODE_SOCKS[$1]}" \
        -o "$4" "http://$2/$3" 2>>"$LOG" || rc=$?
    echo "$rc"
}
fetch_ok() { [ "$(FETCH_TIMEOUT=5 fetch "$@")" = 0 ]; }

# connected_at I: the running nodes whose push stream is open at replica I (admin node list).
connected_at() {
    vcli "$1" nodes | python3 -c "import json,sys; print(' '.join(sorted(n['name'] for n in json.load(sys.stdin) if n['connected'])))"
}
audit_events() { # audit_events I EVENT: how many EVENT records replica I's audit log holds (paged, 50 pages at most)
    log "[${VNS[$1]}] audit_events v$1 $2"
    python3 - "${VNS[$1]}" "$VERIFIER" "$WORK/v$1" "$2" "${AUDIT_TIMEOUT:-30}" <<'EOF'
import json, subprocess, sys
ns, verifier, data, event, timeout = sys.argv[1:]
timeout = float(timeout)
since, count = 0, 0
for _ in range(50):
    try:
        page = json.loads(subprocess.run(["ip", "netns", "exec", ns, verifier, "--data-dir", data, "audit", "--since", str(since)],
                                         capture_output=True, text=True, check=True, timeout=timeout).stdout)
    except subprocess.TimeoutExpired:
        print(-1)  # no answer in time (a replica whose store call stalls its admin API)
        sys.exit(0)
    count += sum(1 for r in page if r.get("event") == event)
    if len(page) < 1000:
        break
    since = page[-1]["seq"]
print(count)
EOF
}

bring_up() {
    topology
    pg_setup
    policy >"$WORK/policy.toml"
    ! grep -q '"{' "$WORK/policy.toml" || { echo "netns-ha suite: a placeholder of the policy fixture is not filled" >&2; exit 1; }
    vstore 1 init >"$WORK/pins.json"
    (umask 077; openssl rand -hex 24 >"$WORK/passphrase")
    vcli 1 replica export --out "$WORK/bundle" --passphrase-file "$WORK/passphrase" >>"$LOG"
    for i in 2 3; do
        vstore "$i" init --replica-of "$WORK/bundle" --passphrase-file "$WORK/passphrase" >>"$LOG"
    done
    for i in 1 2 3; do start_replica "$i"; done
    for name in a b c; do start_backend "$name"; done
    for name in $NODES; do enroll_node "$name"; done
    enroll_spares
    for name in $NODES; do wait_for 30 "node $name ready" ready "$name"; done
    local i
    for i in 1 2 3; do log "bring_up: nodes at v$i: $(connected_at "$i")"; done
}

# ---------------------------------------------------------------------------- ha_kill_storm
# storm_run OUT: the storm (python, below); its records go to OUT (JSON).
storm_run() {
    local targets; targets=$(seq -f 'r%02g' 1 "$STORMS" | paste -sd,)
    python3 - "$VERIFIER" "$WORK" "$1" "$targets" $((STORMS / 2)) "${VNS[1]}" "${VNS[2]}" "${VNS[3]}" <<'EOF'
import json, os, random, signal, subprocess, sys, threading, time
verifier, work, out, targets, kill_after = sys.argv[1:6]
kill_after = int(kill_after)
replicas = {f"v{i + 1}": ns for i, ns in enumerate(sys.argv[6:9])}
queue = targets.split(",")
cv = threading.Condition()
records = []
state = {"acked": 0, "kill_replica": None, "killed": None, "started_after": {}, "inflight": 0}
dead = set()
deadline = time.monotonic() + 120  # the whole storm, bounded


def revoke(name, ns, target):
    cmd = ["ip", "netns", "exec", ns, verifier, "--data-dir", f"{work}/{name}", "revoke", target]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout, p.stderr.strip()
    except subprocess.TimeoutExpired:
        return "timeout", "", "no answer within 30 s"


def next_target(name):
    """The next target for replica `name`, or None when it is done (dead, or nothing is left
    and nothing is in flight that could come back)."""
    while time.monotonic() < deadline:
        if name in dead:
            return None
        if queue:
            return queue.pop(0)
        if state["inflight"] == 0:
            return None
        cv.wait(timeout=0.2)
    return None


def worker(name, ns):
    while True:
        with cv:
            target = next_target(name)
            if target is None:
                return
            state["inflight"] += 1
            state["started_after"][name] = len([r for r in records if r["replica"] == name])
            cv.notify_all()
        start = time.monotonic()
        rc, so, se = revoke(name, ns, target)
        end = time.monotonic()
        rec = {"replica": name, "target": target, "start": start, "end": end, "rc": rc}
        if rc == 0:
            rec["version"] = json.loads(so)["revocation_version"]
        else:
            rec["error"] = se[-300:]
        with cv:
            state["inflight"] -= 1
            records.append(rec)
            if rc == 0:
                state["acked"] += 1
                if state["acked"] == kill_after and state["kill_replica"] is None:
                    state["kill_replica"] = name
                    rec["kill_after_this"] = True
            elif name in dead or name == state["killed"]:
                # Cut by the kill: not acknowledged; another replica takes the target (it
                # may find it revoked already, if the commit landed before the kill).
                queue.append(target)
                rec["requeued"] = True
                dead.add(name)
            cv.notify_all()


threads = [threading.Thread(target=worker, args=(n, ns)) for n, ns in replicas.items()]
for t in threads:
    t.start()
with cv:
    cv.wait_for(lambda: state["kill_replica"] is not None or not any(t.is_alive() for t in threads),
                timeout=max(1, deadline - time.monotonic()))
    victim = state["kill_replica"]
    if victim:
        acked_by_victim = len([r for r in records if r["replica"] == victim])
        # Kill while the victim's next revoke is in flight (or when it has none left to start).
        cv.wait_for(lambda: state["started_after"].get(victim, -1) >= acked_by_victim or not queue, timeout=5)
if victim:
    # Somewhere inside that revoke (process start, admin handshake, commit, answer): uniform
    # over a little more than the victim's mean revoke so far.
    with cv:
        took = [r["end"] - r["start"] for r in records if r["replica"] == victim]
    time.sleep(random.uniform(0.0, 1.2 * sum(took) / len(took)))
    pids = subprocess.run(["pgrep", "-f", f"^{verifier} --data-dir {work}/{victim} serve"],
                          capture_output=True, text=True).stdout.split()
    with cv:
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        state["killed"] = victim
        dead.add(victim)
        state["kill_at"] = time.monotonic()
        state["killed_pids"] = pids
for t in threads:
    t.join(timeout=max(1, deadline - time.monotonic()))
json.dump({"records": records, "killed": state["killed"], "kill_at": state.get("kill_at"),
           "killed_pids": state.get("killed_pids", []), "left": len(queue),
           "threads_alive": sum(t.is_alive() for t in threads)}, open(out, "w"), indent=1)
EOF
}

# storm_evidence STORM OUT: the storm's records plus the state now: each running node's
# revocation_version and each replica's admin node list (name -> revoked?).
storm_evidence() {
    local name i
    : >"$WORK/evidence-nodes"
    for name in $NODES; do
        echo "$name $(field "$name" 's["revocation_version"]')" >>"$WORK/evidence-nodes"
    done
    : >"$WORK/evidence-replicas"
    for i in 1 2 3; do
        echo "v$i $(vcli "$i" nodes | python3 -c 'import json,sys; print(json.dumps({n["name"]: n["revoked_at"] is not None for n in json.load(sys.stdin)}))')" >>"$WORK/evidence-replicas"
    done
    python3 - "$1" "$WORK/evidence-nodes" "$WORK/evidence-replicas" "$2" <<'EOF'
import json, sys
storm, nodes, replicas, out = sys.argv[1:]
d = json.load(open(storm))
d["nodes"] = {l.split()[0]: (None if l.split()[1] == "None" else int(l.split()[1])) for l in open(nodes) if l.strip()}
d["replicas"] = {l.split(" ", 1)[0]: json.loads(l.split(" ", 1)[1]) for l in open(replicas) if l.strip()}
json.dump(d, open(out, "w"), indent=1)
EOF
}

# storm_check EVIDENCE [--fake-ack NAME]: the checker. Exit 0 only if every claim holds; one
# line per violation. With --fake-ack it first adds an acknowledgement that was never given
# (NAME at v1, the next version, after everything else): the control, which must fail.
storm_check() {
    python3 - "$@" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
acks = [r for r in d["records"] if r["rc"] == 0]
mode = sys.argv[2] if len(sys.argv) > 2 else ""
if mode == "--fake-ack":
    top = max(r["end"] for r in d["records"])
    acks.append({"replica": "v1", "target": sys.argv[3], "start": top + 1, "end": top + 1.01,
                 "rc": 0, "version": max(a["version"] for a in acks) + 1})
elif mode == "--swap-first-last":
    # The first and the last acknowledgement trade versions (an order no real run may show).
    acks.sort(key=lambda a: a["start"])
    first, last = acks[0]["version"], acks[-1]["version"]
    acks[0] = dict(acks[0], version=last)
    acks[-1] = dict(acks[-1], version=first)
elif mode == "--dup-version":
    # The second acknowledgement given the first one's version.
    acks.sort(key=lambda a: a["start"])
    acks[1] = dict(acks[1], version=acks[0]["version"])
bad = []
if not acks:
    bad.append("no revoke was acknowledged")
versions = [a["version"] for a in acks]
dups = sorted({v for v in versions if versions.count(v) > 1})
if dups:
    bad.append(f"versions acknowledged more than once: {dups}")
targets = [a["target"] for a in acks]
if len(set(targets)) != len(targets):
    bad.append("a node was acknowledged revoked twice")
# Real-time order: a revoke acknowledged before another was sent has the lower version.
for a in acks:
    for b in acks:
        if a["end"] < b["start"] and not a["version"] < b["version"]:
            bad.append(f"{a['target']}@{a['replica']} v{a['version']} ended before {b['target']}@{b['replica']} "
                       f"v{b['version']} started, but its version is not lower")
top = max(versions, default=0)
for name, rv in sorted(d["nodes"].items()):
    if rv is None or rv < top:
        bad.append(f"node {name}: revocation_version {rv} < highest acknowledged {top}")
if sorted(d["replicas"]) != ["v1", "v2", "v3"]:
    bad.append(f"node lists of {sorted(d['replicas'])}, not of all three replicas")
for r, listing in sorted(d["replicas"].items()):
    missing = [a["target"] for a in acks if listing.get(a["target"]) is not True]
    if missing:
        bad.append(f"replica {r} does not list as revoked: {missing}")
for line in bad:
    print(f"    checker: {line}")
sys.exit(1 if bad else 0)
EOF
}

scenario_ha_kill_storm() {
    local i
    for i in 1 2 3; do log "kill_storm: nodes at v$i before: $(connected_at "$i")"; done
    local t0; t0=$(now_ms)
    storm_run "$WORK/storm.json"
    local summary
    summary=$(python3 - "$WORK/storm.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["records"]
acks = [x for x in r if x["rc"] == 0]
per = {v: sum(1 for x in acks if x["replica"] == v) for v in ("v1", "v2", "v3")}
after = [x for x in acks if d["kill_at"] and x["start"] > d["kill_at"]]
cut = [x for x in r if x.get("requeued")]
print(f"killed={d['killed']} sent={len(r)} acked={len(acks)} per_replica={per} acked_after_kill={len(after)} "
      f"cut_by_kill={[(x['target'], x['error'][-80:]) for x in cut]} refused={[(x['target'], x['replica'], x['error'][-80:]) for x in r if x['rc'] != 0 and not x.get('requeued')]} "
      f"left={d['left']} threads_alive={d['threads_alive']}")
EOF
)
    note "kill_storm: $summary ($(secs_since "$t0") s)"
    local victim; victim=$(python3 -c "import json; print(json.load(open('$WORK/storm.json'))['killed'] or '')")
    [ -n "$victim" ] || fail "no replica was killed during the storm"
    local vi=${victim#v}
    not_running "$(python3 -c "import json; print(json.load(open('$WORK/storm.json'))['killed_pids'][0])")" ||
        fail "the killed replica $victim is still running"
    local t1; t1=$(now_ms)
    start_replica "$vi"
    note "kill_storm: $victim restarted and serving again in $(secs_since "$t1") s"
    # The storm ran as designed: every revoke sent, each replica acknowledged some, the
    # survivors acknowledged revokes after the kill. A revoke not acknowledged is no claim, but
    # only for a known reason: cut by the kill, the target found revoked already after it was
    # handed on (its commit landed before the kill), or a race for the next list version lost
    # REVOKE_ATTEMPTS (3) times to the other replicas (`... is not above the stored version`).
    python3 - "$WORK/storm.json" "$STORMS" <<'EOF' || fail "the storm did not run as designed"
import json, sys
d = json.load(open(sys.argv[1]))
storms = int(sys.argv[2])
r = d["records"]
acks = [x for x in r if x["rc"] == 0]
per = {v: sum(1 for x in acks if x["replica"] == v) for v in ("v1", "v2", "v3")}
bad = []
if d["left"] or d["threads_alive"]:
    bad.append(f"{d['left']} targets never sent, {d['threads_alive']} clients still running")
if len({x["target"] for x in r}) != storms:
    bad.append("not every target was sent")
if not all(per.values()):
    bad.append(f"a replica acknowledged nothing: {per}")
if not any(x["start"] > d["kill_at"] for x in acks):
    bad.append("nothing acknowledged after the kill")
if len(acks) < storms // 2:
    bad.append(f"only {len(acks)} of {storms} revokes acknowledged")
for x in r:
    if x["rc"] == 0 or x.get("requeued"):
        continue
    e = x["error"]
    if "is not above the stored version" in e:
        continue
    if "already revoked" in e and any(y.get("requeued") and y["target"] == x["target"] for y in r):
        continue
    bad.append(f"{x['target']} at {x['replica']} refused for an unexpected reason: {e[-200:]}")
for b in bad:
    print(f"    storm: {b}")
sys.exit(1 if bad else 0)
EOF
    # The evidence, until the checker passes (propagation takes a moment; bounded).
    local deadline=$((SECONDS + 30)) ok=0
    while [ $SECONDS -lt $deadline ]; do
        storm_evidence "$WORK/storm.json" "$WORK/evidence.json"
        if storm_check "$WORK/evidence.json" >"$WORK/check.out" 2>&1; then ok=1; break; fi
        sleep 1
    done
    if [ "$ok" = 1 ]; then
        note "kill_storm: checker PASSES on the real run ($(python3 -c "import json; d=json.load(open('$WORK/evidence.json')); a=[r['version'] for r in d['records'] if r['rc']==0]; print(f'{len(a)} acknowledged, versions {min(a)}..{max(a)}, nodes {d[\"nodes\"]}')"))"
    else
        cat "$WORK/check.out" | tee -a "$LOG"
        fail "the checker fails on the real run"
    fi
    # The control: one acknowledgement that never happened (z1 was never revoked).
    if storm_check "$WORK/evidence.json" --fake-ack z1 >"$WORK/control.out" 2>&1; then
        fail "CONTROL: the checker passed evidence with a fake acknowledgement"
    fi
    note "kill_storm: CONTROL (a fake acknowledgement of z1) FAILS as it must:"
    sed 's/^ */      /' "$WORK/control.out" | tee -a "$LOG"
    grep -q 'does not list as revoked' "$WORK/control.out" || fail "CONTROL: no replica-list violation reported"
    grep -q 'revocation_version' "$WORK/control.out" || fail "CONTROL: no node-version violation reported"
    # Two more controls for the version checks: real-time order and uniqueness.
    if storm_check "$WORK/evidence.json" --swap-first-last >"$WORK/control2.out" 2>&1; then
        fail "CONTROL: the checker passed the first and last acknowledgements with swapped versions"
    fi
    grep -q 'but its version is not lower' "$WORK/control2.out" || fail "CONTROL: swapped versions not reported as out of order"
    if storm_check "$WORK/evidence.json" --dup-version >"$WORK/control3.out" 2>&1; then
        fail "CONTROL: the checker passed two acknowledgements of one version"
    fi
    grep -q 'versions acknowledged more than once' "$WORK/control3.out" || fail "CONTROL: a duplicate version not reported"
    note "kill_storm: CONTROLS with the first and last versions swapped ($(grep -c 'not lower' "$WORK/control2.out") order violations) and one version acknowledged twice ($(head -1 "$WORK/control3.out" | sed 's/^ *checker: //')) FAIL as they must"
    wait_for 30 "every node ready after the storm" all_ready $NODES
}

# ---------------------------------------------------------------------------- ha_db_down
scenario_ha_db_down() {
    local i name secret
    declare -A SECRET
    declare -A FENCED
    for i in 1 2 3; do SECRET[$i]=$(join_secret "$i" "e$i"); FENCED[$i]=$(audit_events "$i" fenced); done
    [ "$(fetch d api.s1.mesh hello "$WORK/dd-d")" = 0 ] || fail "d -> api.s1 before the outage"
    local t0; t0=$(now_ms)
    pg_stop >>"$LOG" 2>&1
    note "db_down: PostgreSQL stopped"
    # Revokes refused at every replica, each answer within 15 s; nothing may be acknowledged.
    local t rc out
    for i in 1 2 3; do
        t=$(now_ms); rc=0
        out=$(timeout 20 ip netns exec "${VNS[$i]}" "$VERIFIER" --data-dir "$WORK/v$i" revoke "x$i" 2>&1) || rc=$?
        log "db_down: revoke x$i at v$i: rc $rc: $out"
        [ "$rc" != 0 ] || fail "v$i acknowledged a revoke with the database down: $out"
        [ "$rc" != 124 ] || fail "v$i did not answer a revoke within 20 s"
        note "db_down: revoke at v$i refused after $(secs_since "$t") s: $(tail -c 160 <<<"$out")"
        [ "$(python3 -c "print(($(now_ms) - $t) <= 15000)")" = True ] || fail "v$i took more than 15 s to refuse"
    done
    # Enrolments refused at every replica (secrets made while the database was up).
    for i in 1 2 3; do
        t=$(now_ms); rc=0
        out=$(enroll_at "$i" "$C3" "e$i" "${SECRET[$i]}" "203.0.113.2:$((6000 + i))" 2>&1) || rc=$?
        log "db_down: enrol e$i at v$i: rc $rc: $out"
        [ "$rc" != 0 ] || fail "v$i enrolled e$i with the database down"
        note "db_down: enrolment at v$i refused after $(secs_since "$t") s: $(tail -c 160 <<<"$out")"
        [ "$(python3 -c "print(($(now_ms) - $t) <= 15000)")" = True ] || fail "v$i took more than 15 s to refuse an enrolment"
        rm -rf "$WORK/node-e$i"
    done
    # Running nodes keep serving on their attestations: at least 8 s of outage, data every second.
    local n_ok=0 n_try=0
    while [ $n_try -lt 30 ]; do
        n_try=$((n_try + 1))
        rc=$(FETCH_TIMEOUT=5 fetch a api.s1.mesh blob "$WORK/dd-a")
        [ "$rc" = 0 ] || fail "a -> api.s1 failed during the outage (curl $rc, $(secs_since "$t0") s in)"
        cmp -s "$WORK/dd-a" "$WORK/www-b/blob" || fail "a -> api.s1: wrong bytes during the outage"
        [ "$(fetch b db.s1.mesh hello "$WORK/dd-b")" = 0 ] || fail "b -> db.s1 failed during the outage"
        [ "$(fetch a web.s2.mesh hello "$WORK/dd-c")" = 0 ] || fail "a -> web.s2 failed during the outage"
        for name in $NODES; do
            [ "$(field "$name" 's["self_permit"]')" = None ] || fail "$name fails closed during the outage: $(field "$name" 's["self_permit"]')"
        done
        n_ok=$((n_ok + 1))
        [ "$(python3 -c "print(($(now_ms) - $t0) >= 8000)")" = True ] && break
        sleep 1
    done
    note "db_down: $n_ok rounds of fetches (a->api.s1 1 MiB, b->db.s1, a->web.s2) all succeeded over $(secs_since "$t0") s without the database"
    # Each replica fenced itself (audited `fenced`) while the database was away.
    for i in 1 2 3; do
        [ "$(audit_events "$i" fenced)" -gt "${FENCED[$i]}" ] || fail "v$i has no new fenced record in its audit log"
    done
    local t1; t1=$(now_ms)
    pg_start >>"$LOG" 2>&1
    for i in 1 2 3; do wait_for 30 "v$i serving after the database came back" serving "$i"; done
    note "db_down: PostgreSQL back after $(secs_since "$t0") s; all three replicas serve again $(secs_since "$t1") s after it started"
    # The enrolment refused at v1 works now, with the same secret: the refusal consumed nothing.
    enroll_at 1 "$C3" e1 "${SECRET[1]}" "203.0.113.2:6001" >>"$WORK/enroll.log" 2>&1 ||
        fail "the enrolment refused while the database was down does not work after it is back"
    # A revoke of running node d, acknowledged and enforced. A node does not judge itself
    # revoked (it fails closed when its attestation runs out, at most one TTL later); its peers
    # refuse it at once, and its replica refuses it.
    wait_for 45 "every node ready after the outage" all_ready $NODES
    [ "$(fetch d api.s1.mesh hello "$WORK/dd-d")" = 0 ] || fail "d -> api.s1 before its revoke"
    local refused_b; refused_b=$(refused_sum b)
    local vref0; vref0=$(grep -c '"event":"verifier_refused"' "$WORK/node-d/audit.jsonl" || true)
    out=$(vcli 2 revoke d) || fail "the revoke of d at v2 was not acknowledged: $out"
    local version; version=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['revocation_version'])" "$out")
    for name in a b c; do
        wait_for 10 "$name has list version $version" bash -c "[ \"\$(ip netns exec ${NODE_NS[$name]} $NODE ctl --data-dir $WORK/node-$name show | python3 -c 'import json,sys; print((json.load(sys.stdin)[\"revocation_version\"] or 0) >= $version)')\" = True ]"
    done
    rc=$(FETCH_TIMEOUT=5 fetch d api.s1.mesh hello "$WORK/dd-d")
    [ "$rc" != 0 ] || fail "revoked d still reaches api.s1"
    for i in 1 2 3; do
        wait_for 10 "v$i lists d revoked" bash -c "ip netns exec ${VNS[$i]} $VERIFIER --data-dir $WORK/v$i nodes | python3 -c 'import json,sys; sys.exit(0 if any(n[\"name\"] == \"d\" and n[\"revoked_at\"] for n in json.load(sys.stdin)) else 1)'"
    done
    wait_for 15 "the replicas refuse d (audited verifier_refused at d)" \
        bash -c "[ \$(grep -c '\"event\":\"verifier_refused\"' $WORK/node-d/audit.jsonl) -gt $vref0 ]"
    note "db_down: revoke of d acknowledged at v2 (version $version), enforced: a b c hold the list, d's fetch to api.s1 fails (curl $rc; b's refusals $refused_b -> $(refused_sum b)), every replica lists d revoked and refuses it ($(grep -c '"event":"verifier_refused"' "$WORK/node-d/audit.jsonl") verifier_refused at d)"
    stop_node d
    NODES="a b c"
}

# ---------------------------------------------------------------------------- ha_rolling_restart
# traffic_loop OUT STOPFILE: fetches between the nodes until STOPFILE exists (at most 600
# rounds, 150 s); one line per fetch `ts src host rc`, every other round one line per node
# `ts permit NAME self_permit`.
traffic_loop() {
    local out=$1 stop=$2 round=0 deadline=$((SECONDS + 150)) spec src host rc name
    while [ ! -e "$stop" ] && [ $round -lt 600 ] && [ $SECONDS -lt $deadline ]; do
        round=$((round + 1))
        for spec in a:api.s1.mesh b:db.s1.mesh a:web.s2.mesh; do
            src=${spec%%:*}; host=${spec#*:}
            rc=$(FETCH_TIMEOUT=5 fetch "$src" "$host" hello "$WORK/roll-$src")
            echo "$(date +%s.%N) $src $host $rc" >>"$out"
        done
        [ $((round % 2)) = 0 ] || continue
        for name in $NODES; do
            echo "$(date +%s.%N) permit $name $(field "$name" 's["self_permit"]' 2>/dev/null || echo unreadable)" >>"$out"
        done
    done
}

scenario_ha_rolling_restart() {
    local name i
    declare -A REFUSED FAILOVERS
    for name in $NODES; do REFUSED[$name]=$(refused_sum "$name"); FAILOVERS[$name]=$(failovers "$name"); done
    local out="$WORK/rolling.out" stop="$WORK/rolling.stop" windows="$WORK/rolling.windows"
    : >"$out"; : >"$windows"
    # One stream open across the restarts: 1 MiB a -> api.s1 paced by curl at 16 KiB/s (about
    # 30 s through the mesh).
    bgn "$C1" curl -sS --max-time 120 --limit-rate 16K --socks5-hostname 127.0.0.1:1080 -o "$WORK/roll-long" \
        http://api.s1.mesh/blob 2>>"$LOG"
    local long=$!
    traffic_loop "$out" "$stop" &
    local loop=$!
    track "$loop" "traffic loop"
    local t0 at
    for i in 1 2 3; do
        t0=$(now_ms)
        at=$(connected_at "$i")
        echo "v$i $(date +%s.%N) start" >>"$windows"
        stop_replica "$i"
        start_replica "$i"
        wait_for 30 "every node ready after v$i restarted" all_ready $NODES
        echo "v$i $(date +%s.%N) end" >>"$windows"
        note "rolling_restart: v$i (nodes on it: ${at:-none}) restarted, serving and every node back in $(secs_since "$t0") s"
    done
    local longrc=0 still=0
    kill -0 "$long" 2>/dev/null && still=1
    wait "$long" || longrc=$?
    touch "$stop"
    wait "$loop" || true
    local fetches fails permits
    fetches=$(awk '$2 != "permit"' "$out" | wc -l)
    fails=$(awk '$2 != "permit" && $4 != 0' "$out" | wc -l)
    permits=$(awk '$2 == "permit" && $4 != "None"' "$out" | wc -l)
    note "rolling_restart: $fetches fetches, $fails failed; $(awk '$2 == "permit"' "$out" | wc -l) self_permit samples, $permits not null; the paced 1 MiB stream: curl $longrc, $([ "$still" = 1 ] && echo "open across all three restarts" || echo "ended before the last restart")"
    [ "$fails" = 0 ] || { awk '$2 != "permit" && $4 != 0' "$out" | head -5 | tee -a "$LOG"; fail "$fails fetches failed during the rolling restart"; }
    [ "$permits" = 0 ] || { awk '$2 == "permit" && $4 != "None"' "$out" | head -5 | tee -a "$LOG"; fail "a node's self_permit was not null during the rolling restart"; }
    [ "$longrc" = 0 ] && cmp -s "$WORK/roll-long" "$WORK/www-b/blob" || fail "the paced stream across the restarts failed (curl $longrc) or arrived wrong"
    # Traffic ran through every restart: fetches that started and ended inside each window.
    python3 - "$out" "$windows" <<'EOF' || fail "a restart went without traffic through it"
import sys
fetch = [float(l.split()[0]) for l in open(sys.argv[1]) if l.split()[1] != "permit"]
w = {}
for l in open(sys.argv[2]):
    r, t, what = l.split()
    w.setdefault(r, {})[what] = float(t)
bad = 0
for r, t in sorted(w.items()):
    inside = sum(1 for f in fetch if t["start"] <= f <= t["end"])
    print(f"    rolling_restart: {r}: {inside} fetches finished while it restarted ({t['end'] - t['start']:.1f} s)")
    bad += inside < 2
sys.exit(1 if bad else 0)
EOF
    local moved=""
    for name in $NODES; do
        [ "$(refused_sum "$name")" = "${REFUSED[$name]}" ] || fail "node $name refused streams during the rolling restart (${REFUSED[$name]} -> $(refused_sum "$name"))"
        [ "$(field "$name" 's["self_permit"]')" = None ] || fail "$name: self_permit not null after the rolling restart"
        moved="$moved $name:${FAILOVERS[$name]}->$(failovers "$name")"
    done
    note "rolling_restart: refusal counters unchanged; verifier_failovers$moved"
}

# ---------------------------------------------------------------------------- ha_partition
# metric_at I PREFIX: the sum of replica I's metric series starting with PREFIX (its admin
# socket's /metrics).
metric_at() {
    local addr; addr=$(cat "$WORK/v$1/admin.addr")
    curl -s --max-time 5 --unix-socket "${addr#unix:}" http://localhost/metrics |
        awk -v p="$2" 'index($1, p) == 1 { v += $2 } END { print v + 0 }'
}
issued_at() { metric_at "$1" hopmesh_verifier_attestations_issued_total; }
# partition I on|off: replica I cut from the database, both directions (nft in the database's
# namespace: the replica's packets to it and its answers are dropped, as a partition does).
partition() {
    if [ "$2" = on ]; then
        n "$DB" nft -f - <<EOF
table inet hmha_partition {
    chain input { type filter hook input priority 0; ip saddr ${VIP[$1]} drop; }
    chain output { type filter hook output priority 0; ip daddr ${VIP[$1]} drop; }
}
EOF
    else
        n "$DB" nft delete table inet hmha_partition
    fi
}
# more_events I EVENT N: replica I's audit log holds more than N EVENT records.
more_events() { [ "$(audit_events "$1" "$2")" -gt "$3" ]; }
# elsewhere I: every running node is subscribed at a replica other than I.
elsewhere() {
    local j others="" name
    for j in 1 2 3; do [ "$j" = "$1" ] || others="$others $(connected_at "$j")"; done
    for name in $NODES; do case " $others " in *" $name "*) ;; *) return 1 ;; esac; done
}

scenario_ha_partition() {
    local i cut=0 best=-1 at cnt name on=""
    for i in 1 2 3; do
        at=$(connected_at "$i"); cnt=$(wc -w <<<"$at")
        if [ "$cnt" -gt "$best" ]; then best=$cnt; cut=$i; on=$at; fi
    done
    [ "$best" -ge 1 ] || { fail "no node is subscribed at any replica"; return 1; }
    declare -A REFUSED
    for name in $NODES; do REFUSED[$name]=$(refused_sum "$name"); done
    local fenced0 again0 issued0
    fenced0=$(audit_events "$cut" fenced); again0=$(audit_events "$cut" serving_again)
    local out="$WORK/partition.out" stop="$WORK/partition.stop"
    : >"$out"
    traffic_loop "$out" "$stop" &
    local loop=$!
    track "$loop" "traffic loop (partition)"
    local t0; t0=$(now_ms)
    issued0=$(issued_at "$cut")
    partition "$cut" on
    # Healed and the traffic stopped whatever happens below.
    trap "partition $cut off >/dev/null 2>&1 || true; touch $stop" EXIT
    note "partition: v$cut (nodes on it: $on) cut from the database; TTL $TTL s; cut for $((3 * TTL)) s"
    # It fences itself within its staleness bound (audited) and closes its sessions: its nodes
    # subscribe at the other two.
    wait_for 20 "v$cut audits that it fenced itself" more_events "$cut" fenced "$fenced0"
    note "partition: v$cut fenced itself (audited) $(secs_since "$t0") s after the cut"
    wait_for 30 "every node subscribed at a replica other than v$cut" elsewhere "$cut"
    note "partition: every node subscribed elsewhere $(secs_since "$t0") s after the cut"
    local rc=0
    timeout 20 ip netns exec "${VNS[$cut]}" "$VERIFIER" --data-dir "$WORK/v$cut" join-token create --name probe --ttl 60 >>"$LOG" 2>&1 || rc=$?
    [ "$rc" != 0 ] || fail "v$cut acknowledged a write while cut from the database"
    [ "$rc" != 124 ] || fail "v$cut did not answer a write within 20 s while cut"
    # Three TTLs: nodes refresh at the other replicas, none fails closed, every fetch works,
    # and the cut replica issues nothing (each attestation it issues needs a commit).
    local samples=0
    while [ "$(python3 -c "print(($(now_ms) - $t0) < $((3 * TTL * 1000)))")" = True ]; do
        [ -z "$(connected_at "$cut")" ] || fail "a node is subscribed at v$cut while it is cut: $(connected_at "$cut")"
        samples=$((samples + 1))
        sleep 5
    done
    local issued1; issued1=$(issued_at "$cut")
    [ "$issued1" = "$issued0" ] || fail "v$cut issued $((issued1 - issued0)) attestations while cut from the database"
    partition "$cut" off
    trap - EXIT
    local t1; t1=$(now_ms)
    note "partition: healed after $(secs_since "$t0") s; v$cut issued nothing while cut ($issued0 -> $issued1 attestations); its sessions sampled $samples times, always none"
    touch "$stop"
    wait "$loop" || true
    local fetches fails permits
    fetches=$(awk '$2 != "permit"' "$out" | wc -l)
    fails=$(awk '$2 != "permit" && $4 != 0' "$out" | wc -l)
    permits=$(awk '$2 == "permit" && $4 != "None"' "$out" | wc -l)
    note "partition: $fetches fetches, $fails failed; $(awk '$2 == "permit"' "$out" | wc -l) self_permit samples, $permits not null"
    [ "$fetches" -gt 0 ] || fail "no fetch ran during the partition"
    [ "$fails" = 0 ] || { awk '$2 != "permit" && $4 != 0' "$out" | head -5 | tee -a "$LOG"; fail "$fails fetches failed during the partition"; }
    [ "$permits" = 0 ] || { awk '$2 == "permit" && $4 != "None"' "$out" | head -5 | tee -a "$LOG"; fail "a node failed closed during the partition"; }
    for name in $NODES; do
        [ "$(refused_sum "$name")" = "${REFUSED[$name]}" ] || fail "node $name refused streams during the partition (${REFUSED[$name]} -> $(refused_sum "$name"))"
    done
    # Healed: the server ended the cut replica's old session (the keepalives the replica asks
    # of it), so the replica takes its lock again, catches up and serves (audited).
    wait_for 60 "v$cut serving again after the partition healed" serving "$cut"
    note "partition: v$cut serves again $(secs_since "$t1") s after the heal"
    more_events "$cut" serving_again "$again0" || fail "v$cut did not audit serving_again"
    wait_for 30 "every node ready after the partition" all_ready $NODES
}

# ---------------------------------------------------------------------------- runner
ORDER="ha_kill_storm ha_db_down ha_rolling_restart ha_partition"
SELECTED=${*:-$ORDER}
for s in $SELECTED; do
    case " $ORDER " in *" $s "*) ;; *) echo "netns-ha: unknown scenario $s (one of: $ORDER)" >&2; exit 2 ;; esac
done
echo "netns-ha suite: run $$, work dir $WORK"
start=$(date +%s.%N)
bring_up
printf '%-20s %s %6.1fs\n' bring_up done "$(python3 -c "print($(date +%s.%N) - $start)")"
failed=0
for s in $ORDER; do
    case " $SELECTED " in *" $s "*) ;; *) continue ;; esac
    start=$(date +%s.%N)
    set +e
    ( set -e; "scenario_$s" )
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then result=PASS; else result=FAIL; failed=$((failed + 1)); fi
    printf '%-20s %s %6.1fs\n' "$s" "$result" "$(python3 -c "print($(date +%s.%N) - $start)")"
    # A scenario changes the mesh for the next (d is revoked in ha_db_down).
    [ "$s" != ha_db_down ] || NODES="a b c"
done
start=$(date +%s.%N)
set +e
( set -e; leak_check )
rc=$?
set -e
LEAK_CHECKED=1
if [ "$rc" = 0 ]; then result=PASS; else result=FAIL; failed=$((failed + 1)); fi
printf '%-20s %s %6.1fs\n' leak_check "$result" "$(python3 -c "print($(date +%s.%N) - $start)")"
count=$(($(wc -w <<<"$SELECTED") + 1))
echo "netns-ha: $((count - failed)) passed, $failed failed"
[ "$failed" = 0 ]
