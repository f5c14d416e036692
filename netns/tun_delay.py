#!/usr/bin/env python3
"""A WAN link emulator on a TUN device, for kernels without netem.

Usage: tun_delay.py TUN DELAY_MS RATE_MBIT QUEUE_PACKETS SECONDS

Creates TUN (no packet info header). Every IP packet the kernel routes into it is serialized
at RATE_MBIT per direction (a drop-tail queue of QUEUE_PACKETS per direction, direction = the
packet's destination address), then held DELAY_MS, then written back, so the kernel receives it
again from TUN and forwards it by its normal routes. Unlike a UDP relay this treats every
protocol alike: QUIC and kernel TCP cross the same link. Random loss is added by nftables on
the packets leaving TUN (netns/run.sh). Exits after SECONDS (every loop is bounded) or SIGTERM.

An explicit rate matters: without one, the link's capacity would be whatever this script
manages per packet, which depends on the machine.
"""
import fcntl
import heapq
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def main():
    name = sys.argv[1]
    delay = float(sys.argv[2]) / 1000.0
    byte_time = 8.0 / (float(sys.argv[3]) * 1e6)
    queue_limit = int(sys.argv[4])
    seconds = float(sys.argv[5])
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    print(f"tun_delay: {name}: {sys.argv[3]} Mbit/s, {sys.argv[2]} ms, queue {queue_limit}",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    end = time.monotonic() + seconds
    heap = []  # (release time, sequence, packet)
    seq = 0
    # Per direction: when the line is free again, and the serialization end times queued.
    line_free = {}
    queued = {}
    forwarded = dropped = 0
    while (now := time.monotonic()) < end:
        while heap and heap[0][0] <= now:
            _, _, pkt = heapq.heappop(heap)
            try:
                os.write(fd, pkt)
                forwarded += 1
            except OSError:
                pass  # the kernel refused it: a lost packet, as on a wire
        timeout = max(0.0, heap[0][0] - now) if heap else 0.05
        readable, _, _ = select.select([fd], [], [], min(timeout, end - now))
        if not readable:
            continue
        for _ in range(1024):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            arrival = time.monotonic()
            dst = pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40]
            q = queued.setdefault(dst, [])
            while q and q[0] <= arrival:
                q.pop(0)
            if len(q) >= queue_limit:
                dropped += 1
                continue
            done = max(arrival, line_free.get(dst, 0.0)) + len(pkt) * byte_time
            line_free[dst] = done
            q.append(done)
            seq += 1
            heapq.heappush(heap, (done + delay, seq, pkt))
    print(f"tun_delay: forwarded {forwarded}, queue drops {dropped}", flush=True)


if __name__ == "__main__":
    main()
