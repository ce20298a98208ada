"""Every TCP connection tproxy holds sends small writes at once: ``TCP_NODELAY`` is set on the
connections it accepts and on those it opens upstream.

Without it, Nagle's algorithm holds a small write (an SSE event, an answer's last bytes) while an
earlier one is unacknowledged, and the peer's delayed ACK can make that wait up to 40 ms. Trio
sets the option on every TCP stream it wraps (accepted or connected) and httpcore2's Trio backend
relies on that; this test keeps it true whichever layer changes.
"""

from __future__ import annotations

import os
import socket

import trio

from tests.conftest import RunningProxy
from tests.fakeupstream import FakeUpstream
from tests.security.rawhttp import address, post, read_reply


def own_tcp_sockets() -> list[tuple[tuple[str, int], tuple[str, int], bool]]:
    """This process's connected TCP sockets: local address, peer address, ``TCP_NODELAY``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            duplicate = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:  # not a socket
            os.close(duplicate)
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                continue  # listening, or not connected
            nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            found.append((sock.getsockname(), peer, nodelay))
    return found


async def test_the_client_and_upstream_connections_of_a_request_have_tcp_nodelay(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}'
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(post(b"/v1/chat/completions", body))
        assert (await read_reply(stream)).status == 200
        client = stream.socket.getsockname()
        sockets = own_tcp_sockets()  # the connection is kept alive, and so is the upstream's
    accepted = [nodelay for local, peer, nodelay in sockets if peer == client]
    upstream_side = [
        nodelay
        for local, peer, nodelay in sockets
        if peer[1] == upstream.port and local[1] != upstream.port
    ]
    assert accepted == [True]
    assert upstream_side
    assert all(upstream_side)
