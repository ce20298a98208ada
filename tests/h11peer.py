"""The HTTP/1.1 server side of every fake peer in tests/ and bench/: h11 on a Trio socket.

A fake upstream (or sink, or collector) decides what to answer; this module owns the connection:
accept, read each request whole within a deadline, write the answer, keep the connection alive
for the next request, close. An answer is written through h11 (:meth:`Peer.send_head`,
:meth:`Peer.send_data`, :meth:`Peer.send_end`, or :meth:`Peer.respond` in one write), with header
names in the case the fake gives them: llama.cpp's server and Ollama write ``Content-Type``,
uvicorn (vLLM) ``content-type``, and h11 writes each name as given. A fault h11 would refuse to
write (a wrong length, bytes after the end, a reset) goes straight to :attr:`Peer.stream`, or
through :meth:`Peer.reset_on_close`; the connection is then not reused.

The bench scripts import it too (they put the repository's root on ``sys.path``), so it imports
only h11 and Trio.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import h11
import trio

# Seconds to wait for the next whole request on a connection. Real servers close idle
# keep-alive connections too (cpp-httplib after 5 s); this is long enough for any test.
REQUEST_TIMEOUT = 60.0
# Seconds :meth:`Peer.wait_for_close` waits at most: a peer that never closes fails its test
# on what it then finds, rather than hanging it.
CLOSE_TIMEOUT = 30.0
# The largest request body a fake reads: twice tproxy's default server.max_body_bytes.
MAX_BODY = 32 << 20
# The largest request head (h11's own default is 16 KiB).
MAX_HEAD = 65536

HeaderPairs = list[tuple[bytes, bytes]] | list[tuple[str, str]]


def cased(name: str, case: str) -> bytes:
    """A header name written in ``case``: ``title`` (``Content-Type``, as llama.cpp and Ollama
    write it), ``mixed`` (``CoNtEnT-TyPe``) or ``lower`` (as uvicorn writes it)."""
    if case == "title":
        written = "-".join(part.capitalize() for part in name.split("-"))
    elif case == "mixed":
        written = "".join(c.lower() if i % 2 else c.upper() for i, c in enumerate(name))
    else:
        written = name.lower()
    return written.encode("ascii")


@dataclass(slots=True)
class SeenRequest:
    """A whole request as the fake read it. ``headers`` by name, lower-cased (h11 does), values
    decoded as latin-1; ``header_lines`` every line in order, as h11 gives them."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    header_lines: tuple[tuple[bytes, bytes], ...]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class RequestTooLarge(Exception):
    """A request body past :data:`MAX_BODY`: the fake closes the connection."""


class Peer:
    """One accepted connection, server side (TCP, or TLS over it)."""

    def __init__(self, stream: trio.abc.Stream, *, max_body: int = MAX_BODY) -> None:
        self.stream = stream
        self.connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._max_body = max_body

    async def next_request(self) -> SeenRequest | None:
        """The next whole request, or None when the peer closed the connection. The caller
        holds the deadline (:func:`serve_connection` does).

        Raises h11.RemoteProtocolError, :class:`RequestTooLarge`, trio.BrokenResourceError.
        """
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                if not data and head is None:
                    return None
                self.connection.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise RequestTooLarge(f"a request body over {self._max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                lines = tuple(head.headers)
                return SeenRequest(
                    head.method.decode(),
                    head.target.decode(),
                    {name.decode(): value.decode("latin-1") for name, value in lines},
                    bytes(body),
                    lines,
                )
            else:  # ConnectionClosed
                return None

    async def send_head(self, status: int, headers: HeaderPairs) -> None:
        """The response head, header names as given; h11 adds ``Transfer-Encoding: chunked``
        when there is no ``Content-Length``."""
        await self.stream.send_all(self._head(status, headers))

    async def send_data(self, data: bytes) -> None:
        """Part of the body, in one socket write (one chunk when chunked)."""
        await self.stream.send_all(self.connection.send(h11.Data(data=data)) or b"")

    async def send_end(self) -> None:
        await self.stream.send_all(self.connection.send(h11.EndOfMessage()) or b"")

    async def respond(self, status: int, headers: HeaderPairs, body: bytes = b"") -> None:
        """A whole answer in one socket write: the head, ``body``, the end."""
        parts = [self._head(status, headers)]
        if body:
            parts.append(self.connection.send(h11.Data(data=body)) or b"")
        parts.append(self.connection.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(b"".join(parts))

    def _head(self, status: int, headers: HeaderPairs) -> bytes:
        return self.connection.send(h11.Response(status_code=status, headers=headers)) or b""

    def start_next_cycle(self) -> bool:
        """Ready the connection for the next request; False when it is to be closed (the answer
        was left unfinished, or either side said ``Connection: close``)."""
        if self.connection.our_state is h11.DONE and self.connection.their_state is h11.DONE:
            self.connection.start_next_cycle()
            return True
        return False

    async def wait_for_close(self) -> bool:
        """Park until the peer closes or resets the connection (True), or :data:`CLOSE_TIMEOUT`
        passes (False). What it sends meanwhile is read and dropped."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False

    def reset_on_close(self) -> None:
        """Make the coming close send RST instead of FIN (SO_LINGER on, timeout 0)."""
        assert isinstance(self.stream, trio.SocketStream), "a reset is for plain TCP"
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


Answer = Callable[[Peer, SeenRequest], Awaitable[None]]

# What ends a connection quietly: the peer left, or sent what h11 or the fake refuses.
PEER_GONE = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    RequestTooLarge,
)


async def serve_connection(
    answer: Answer,
    stream: trio.abc.Stream,
    *,
    keep_alive: bool = True,
    request_timeout: float = REQUEST_TIMEOUT,
    max_body: int = MAX_BODY,
) -> None:
    """Answer the requests of one connection with ``answer``, then close it: after one request
    unless ``keep_alive``, else when the peer leaves, sends no whole request within
    ``request_timeout``, or an answer leaves the connection unusable."""
    peer = Peer(stream, max_body=max_body)
    # One scope for the connection's life, its deadline set only while a request is read: the
    # bench upstream's answers cost ~110 µs of CPU, and a new scope per request ~15 µs more.
    try:
        with trio.CancelScope() as reading:
            while True:
                reading.deadline = trio.current_time() + request_timeout
                request = await peer.next_request()
                reading.deadline = math.inf
                if request is None:
                    return
                await answer(peer, request)
                if not keep_alive or not peer.start_next_cycle():
                    return
    except PEER_GONE:
        return
    finally:
        await stream.aclose()


def connection_handler(
    answer: Answer, *, keep_alive: bool = True, max_body: int = MAX_BODY
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A handler for ``trio.serve_tcp`` or ``trio.serve_listeners`` that answers with ``answer``."""
    return partial(serve_connection, answer, keep_alive=keep_alive, max_body=max_body)


async def serve_on_loopback(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on a free port of 127.0.0.1; started with that port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)
