#!/usr/bin/env python3
"""Leak checker of the network-namespace suite (netns/run.sh): what one run left behind.

    leaks.py inside --work W NS...        before the namespaces are deleted, every process
                                          stopped: no process, no listening socket in NS, no
                                          nft table but the topology's (`inet hopmesh` in the
                                          router, --allow-table NS:FAMILY:NAME)
    leaks.py host --work W --bin B --prefix P --root PID [--namespaces-gone]
                                          in the host: no process of the run (tracked pid,
                                          descendant of the suite, inside one of its
                                          namespaces, naming its work dir, or a hopmesh
                                          binary under B of the run), no listening socket of
                                          the run, no nft table of the run, and with
                                          --namespaces-gone no namespace named P*

A process is "tracked" if `W/pids` lists its pid with the same start time (pid reuse is not a
false report). `W/netns` lists the inode of every namespace the suite created, so a process
still inside one after `ip netns del` is found. `W/listen-baseline` is `ss -Hlntup` in the
host before the run: a new host listener on one of the suite's ports is reported even when
its owner is unknown. With --clean every leak found is removed (SIGKILL to processes of the
run, `ip netns del`, `nft delete table`). One line per leak, `LEAK <kind> ...`; exit status 1
if there was any. Processes of hopmesh binaries under B that are not of this run are noted on
stderr, never reported or touched.
"""

import argparse
import os
import re
import signal
import subprocess
import sys

SUITE_PORTS = {1080, 4433, 5000, 7443, 7444, 8080, 8090}
leaks = []


def leak(kind, text):
    leaks.append((kind, text))
    print(f"LEAK {kind}: {text}", flush=True)


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def netns_inode(pid):
    try:
        return int(re.search(r"\[(\d+)\]", os.readlink(f"/proc/{pid}/ns/net")).group(1))
    except (OSError, AttributeError):
        return None


def all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def read_lines(path):
    try:
        with open(path) as f:
            return [l.rstrip("\n") for l in f if l.strip()]
    except OSError:
        return []


def listener_pids(line):
    return {int(p) for p in re.findall(r"pid=(\d+)", line)}


def listener_key(line):
    # Netid State Recv-Q Send-Q Local:Port Peer:Port [Process]
    f = line.split()
    return (f[0], f[4]) if len(f) >= 5 else (line,)


def listener_port(line):
    f = line.split()
    try:
        return int(f[4].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def inside(args):
    allowed = {}
    for a in args.allow_table:
        ns, family, name = a.split(":")
        allowed.setdefault(ns, set()).add(f"table {family} {name}")
    present = set(run("ip", "netns", "list").split())
    for ns in args.namespaces:
        if ns not in present:
            continue
        pids = [int(p) for p in run("ip", "netns", "pids", ns).split()]
        for pid in pids:
            leak("process", f"{pid} still inside namespace {ns}: {cmdline(pid)}")
        for line in run("ip", "netns", "exec", ns, "ss", "-Hlntup").splitlines():
            if line.strip():
                leak("listener", f"in namespace {ns}: {' '.join(line.split())}")
        for table in run("ip", "netns", "exec", ns, "nft", "list", "tables").splitlines():
            table = table.strip()
            if table and table not in allowed.get(ns, set()):
                leak("nft", f"{table} in namespace {ns}")
                if args.clean:
                    run("ip", "netns", "exec", ns, "nft", "delete", *table.split())
        if args.clean:
            kill(pids)


def host(args):
    work, binp, prefix = args.work, os.path.realpath(args.bin), args.prefix
    me = os.getpid()
    # The checker and its callers (the suite's shells) are not leaks. Run it with no pipe:
    # a sibling in a pipeline would be reported as a descendant of the suite.
    own = {me}
    p = me
    while p and p > 1:
        own.add(p)
        p = ppid(p)
    pids = all_pids()
    parent = {pid: ppid(pid) for pid in pids}

    def descends(pid, root):
        seen = set()
        while pid and pid > 1 and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parent.get(pid) or ppid(pid)
        return False

    tracked = {}
    for line in read_lines(os.path.join(work, "pids")):
        f = line.split(" ", 2)
        if len(f) >= 2 and f[1] != "-":
            tracked[int(f[0])] = (f[1], f[2] if len(f) > 2 else "")
    inodes = {int(l.split()[1]): l.split()[0] for l in read_lines(os.path.join(work, "netns"))}

    def of_run(pid, cmd):
        if pid in tracked and tracked[pid][0] == start_time(pid):
            return "tracked"
        if netns_inode(pid) in inodes:
            return f"inside namespace {inodes[netns_inode(pid)]}"
        if descends(pid, args.root):
            return "a descendant of the suite"
        if work in cmd:
            return "names the work dir"
        return None

    run_pids = {}
    # Every hopmesh binary under B (pgrep -f): of this run, or only noted.
    for pid in (int(p) for p in run("pgrep", "-f", f"^{binp}/hopmesh-").split()):
        cmd = cmdline(pid)
        if pid in own or not cmd:
            continue
        why = of_run(pid, cmd)
        if why:
            run_pids[pid] = (f"hopmesh binary, {why}", cmd)
        else:
            print(f"note: {pid} runs a hopmesh binary but is not of this run: {cmd}", file=sys.stderr)
    for pid in pids:
        if pid in own:
            continue
        cmd = cmdline(pid)
        if cmd is None or not cmd:
            continue  # gone, or a kernel thread
        why = of_run(pid, cmd)
        if why and pid not in run_pids:
            run_pids[pid] = (why, cmd)
    for pid, (why, cmd) in sorted(run_pids.items()):
        leak("process", f"{pid} ({why}): {cmd}")

    baseline = {listener_key(l) for l in read_lines(os.path.join(work, "listen-baseline"))}
    for line in run("ss", "-Hlntup").splitlines():
        if not line.strip():
            continue
        owners = listener_pids(line)
        if owners & set(run_pids) or (
            listener_key(line) not in baseline
            and listener_port(line) in SUITE_PORTS
            and not owners & own
        ):
            leak("listener", f"in the host: {' '.join(line.split())}")

    tables = run("nft", "list", "tables").splitlines()
    for table in (t.strip() for t in tables):
        name = table.split()[-1] if table else ""
        if name.startswith(prefix) or name in ("hopmesh", "hmnat"):
            leak("nft", f"{table} in the host")
            if args.clean:
                run("nft", "delete", *table.split())

    left_ns = []
    if args.namespaces_gone:
        for ns in run("ip", "netns", "list").split():
            if ns.startswith(prefix):
                left_ns.append(ns)
                leak("namespace", ns)

    if args.clean:
        kill(run_pids)
        for ns in left_ns:
            for pid in (int(p) for p in run("ip", "netns", "pids", ns).split()):
                kill([pid])
            run("ip", "netns", "del", ns)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="phase", required=True)
    i = sub.add_parser("inside")
    i.add_argument("--work", required=True)
    i.add_argument("--allow-table", action="append", default=[])
    i.add_argument("--clean", action="store_true")
    i.add_argument("namespaces", nargs="*")
    h = sub.add_parser("host")
    h.add_argument("--work", required=True)
    h.add_argument("--bin", required=True)
    h.add_argument("--prefix", required=True)
    h.add_argument("--root", type=int, required=True, help="the suite's pid ($$)")
    h.add_argument("--namespaces-gone", action="store_true")
    h.add_argument("--clean", action="store_true")
    args = ap.parse_args()
    inside(args) if args.phase == "inside" else host(args)
    if leaks:
        print(f"leak check: {len(leaks)} leak(s) found" + (", removed" if args.clean else ""))
        sys.exit(1)


if __name__ == "__main__":
    main()
