#!/usr/bin/env python3
"""A user-space UDP delay relay for the netns suite (this kernel has no `tc netem`).

    udp_delay.py LISTEN_IP LISTEN_PORT UPSTREAM_IP UPSTREAM_PORT ONE_WAY_DELAY_MS MAX_SECONDS

Every datagram from a client is sent on to UPSTREAM after ONE_WAY_DELAY_MS, from a socket
owned by that client; every datagram coming back is returned to the client after the same
delay. Loss is not done here: the suite drops packets with nftables (`numgen random`). The
relay exits by itself after MAX_SECONDS, so it can never outlive the suite.
"""

import asyncio
import sys


class Upstream(asyncio.DatagramProtocol):
    """The per-client socket towards the upstream."""

    def __init__(self, relay, client):
        self.relay, self.client = relay, client
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.relay.later(lambda: self.relay.transport.sendto(data, self.client))


class Relay(asyncio.DatagramProtocol):
    def __init__(self, loop, upstream, delay):
        self.loop, self.upstream, self.delay = loop, upstream, delay
        self.clients = {}
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def later(self, fn):
        self.loop.call_later(self.delay, fn)

    def datagram_received(self, data, client):
        up = self.clients.get(client)
        if up is None:
            up = Upstream(self, client)
            self.clients[client] = up
            self.loop.create_task(
                self.loop.create_datagram_endpoint(lambda: up, remote_addr=self.upstream)
            )
        self.later(lambda: up.transport and up.transport.sendto(data))


async def main():
    listen_ip, listen_port, up_ip, up_port, delay_ms, max_s = sys.argv[1:7]
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(
        lambda: Relay(loop, (up_ip, int(up_port)), int(delay_ms) / 1000.0),
        local_addr=(listen_ip, int(listen_port)),
    )
    await asyncio.sleep(float(max_s))


if __name__ == "__main__":
    asyncio.run(main())
