#!/usr/bin/env python3
"""Packet-level delay through a TUN device, for kernels without netem.

Usage: tun_delay.py TUN DELAY_MS SECONDS

Creates TUN (no packet info header), then every IP packet the kernel routes into it is held
for DELAY_MS and written back, so the kernel receives it again from TUN and forwards it on by
its normal routes. Unlike a UDP relay this delays every protocol alike (QUIC and kernel TCP see
the same link). Policy routing decides which traffic goes through TUN (netns/run.sh sets it up).
Exits after SECONDS (every loop is bounded) or on SIGTERM. Delay order is FIFO: one constant
delay keeps packets in order, as a wire does.
"""
import collections
import fcntl
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
    name, delay_ms, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    print(f"tun_delay: {name} holding packets {delay_ms} ms", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    delay = delay_ms / 1000.0
    end = time.monotonic() + seconds
    queue = collections.deque()
    forwarded = 0
    while (now := time.monotonic()) < end:
        while queue and queue[0][0] <= now:
            _, pkt = queue.popleft()
            try:
                os.write(fd, pkt)
                forwarded += 1
            except OSError:
                pass  # the kernel refused it (e.g. no route yet): a lost packet, as on a wire
        timeout = max(0.0, queue[0][0] - now) if queue else 0.05
        readable, _, _ = select.select([fd], [], [], min(timeout, end - now))
        if readable:
            # Drain what is there; stamp each packet with its release time.
            for _ in range(1024):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                queue.append((time.monotonic() + delay, pkt))
    print(f"tun_delay: forwarded {forwarded} packets", flush=True)


if __name__ == "__main__":
    main()
