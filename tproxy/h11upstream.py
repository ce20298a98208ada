"""A plain-HTTP/1.1 upstream client on h11: the ``http://`` upstreams' path, beside httpcore2's.

httpcore2 stays the client for ``https://`` and HTTP/2 upstreams. For plain HTTP/1.1 the layers
it puts around each read (trace and exception-mapping contexts, its pool's bookkeeping, a stream
wrapper per body) cost more CPU than the parsing itself; this client is h11 on a Trio socket and
nothing else. A read yields every ``Data`` event its bytes held, joined into one chunk.

The rules it keeps:

- **Bounded pool**: at most ``max_connections`` connections per upstream, in use or idle (a new
  one is opened only when none is idle); a request waits for a slot under the caller's deadline.
- **Reuse only after a whole exchange**: a connection goes back to the pool only when h11 says
  both sides are ``DONE`` and no byte follows the answer. Any error, a cancelled read, a body not
  read to its end, ``Connection: close`` or leftover bytes close it. An idle connection the
  server has closed (readable) or idle for longer than ``KEEPALIVE_EXPIRY`` is not reused.
- **Deadlines as cancel scopes**: connecting is bounded by ``connect_timeout``; writing the
  request, reading the head and the body lie within the caller's scopes (the body's idle
  deadline is its reader's: one scope over the whole body, not one per read).
- **Errors** are raised as :mod:`tproxy.core.errors`, as :mod:`tproxy.upstream` maps
  httpcore2's: no connection is :class:`UpstreamConnectError` (retry-safe), a connect deadline
  ``UpstreamTimeout("connect")``, anything after the connection is :class:`UpstreamBroken`. A
  message never carries a request header (h11's local errors quote the offending value).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import h11
import trio

from tproxy.core.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from tproxy.core.headers import Header

READ_SIZE = 64 * 1024  # bytes asked of the socket per read, as httpcore2 asks
MAX_HEAD_BYTES = 100 * 1024  # the largest response head accepted, as httpcore2's
KEEPALIVE_EXPIRY = 30.0  # seconds an idle connection is kept (httpcore2's pool is told the same)

# What h11 may hold unprocessed after a chunk's data when no event can come of it before more
# bytes arrive: nothing (the chunk goes on), or some of the CRLF that ends the chunk.
_NO_EVENT_YET = (b"", b"\r", b"\r\n")
# The most a read may hold beside one chunk's data for h11 to be asked what it still holds: the
# chunk's size line (up to 4 hex digits: a chunk under 64 KiB) and CRLF, and the CRLF ending the
# chunk before. ``trailing_data`` copies what h11 holds: a read of several chunks, or of one and
# part of the next, is not asked.
_FRAMING_BYTES = 10

# What a broken socket raises under Trio; the OSError is the cause of BrokenResourceError.
_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _describe(error: BaseException) -> str:
    """An I/O error in words: Trio's ``BrokenResourceError`` says nothing, its cause does."""
    shown = error.__cause__ if isinstance(error.__cause__, OSError) else error
    return str(shown) or type(shown).__name__


class _Connection:
    """One socket to the upstream and h11's view of it."""

    __slots__ = ("idle_since", "protocol", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0

    def reusable(self) -> bool:
        """Whether the exchange ended whole on both sides with nothing after it."""
        protocol = self.protocol
        return (
            protocol.our_state is h11.DONE
            and protocol.their_state is h11.DONE
            and not protocol.trailing_data[0]
        )

    def fit(self, oldest_kept: float) -> bool:
        """Whether an idle connection may carry a request: idle since ``oldest_kept`` or later,
        and not readable (readable while idle: the server closed it, or sent unasked bytes)."""
        return self.idle_since >= oldest_kept and not self.stream.socket.is_readable()

    def close(self) -> None:
        """Close at once (no await: it runs in ``finally`` blocks, cancelled or not)."""
        self.stream.socket.close()

    async def receive(self) -> bytes:
        """Wait until the socket is readable, then read it.

        Trio's ``receive_some`` first tries a read, which on a stream that sends one event at
        a time almost always finds nothing (an exception caught in a context manager) before
        it waits; waiting first and reading the descriptor costs one read per event. The
        descriptor is asked for each time: a closed socket's is -1, never a number the kernel
        has since given another connection, and -1 is never waited for (Trio would keep it
        registered to this task and refuse every later wait on it in the process as busy)."""
        socket = self.stream.socket
        while True:
            if socket.fileno() < 0:
                raise trio.ClosedResourceError("the upstream connection is closed")
            await trio.lowlevel.wait_readable(socket.fileno())
            try:
                data = os.read(socket.fileno(), READ_SIZE)
            except BlockingIOError:  # woken for nothing: wait again
                continue
            self.protocol.receive_data(data)
            return data


@dataclass(slots=True)
class PlainResponse:
    """An answer whose head has arrived; :meth:`chunks` reads its body."""

    status: int
    headers: list[Header]  # names lower-cased by h11
    _connection: _Connection
    _chunked: bool  # Transfer-Encoding: chunked (h11 accepts no other)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the body as the socket delivers it: each read's ``Data`` events joined.

        Raises :class:`UpstreamBroken` (reset, closed before the framing's end, bad framing).
        The caller's cancel scopes are its deadlines.

        A chunked body's read of one whole chunk (a paced stream's event) leaves h11 holding
        the chunk's closing CRLF: asking h11 for the next event would only consume it and say
        ``NEED_DATA``, about a sixth of h11's work per chunk. That call is skipped; h11 takes the
        CRLF with the next read's bytes, and gives the same events in the same order.
        """
        connection = self._connection
        protocol = connection.protocol
        chunked = self._chunked
        last_read = READ_SIZE + MAX_HEAD_BYTES  # the head's read may hold any part of the body
        parts: list[bytes] = []
        try:
            while True:
                event = protocol.next_event()
                if type(event) is h11.Data:
                    parts.append(event.data)
                    if (
                        not chunked
                        or last_read - len(event.data) > _FRAMING_BYTES
                        or protocol.trailing_data[0] not in _NO_EVENT_YET
                    ):
                        continue
                    event = h11.NEED_DATA
                if parts and (event is h11.NEED_DATA or type(event) is h11.EndOfMessage):
                    yield parts[0] if len(parts) == 1 else b"".join(parts)
                    parts = []
                if event is not h11.NEED_DATA:
                    return  # EndOfMessage: the framing's end (h11 gives nothing else here)
                last_read = len(await connection.receive())
        except h11.RemoteProtocolError as error:
            raise UpstreamBroken(f"upstream body broke: {error}") from error
        except _SOCKET_ERRORS as error:
            raise UpstreamBroken(f"upstream body broke: {_describe(error)}") from error


class PlainPool:
    """The kept-alive connections to one ``http://`` upstream (see the module's rules)."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self._host = host
        self._port = port
        self._slots = trio.Semaphore(max_connections)
        # Idle connections, the most recently used last: used last in, first out (the likeliest
        # to be alive), and closed first in, first out once unfit (so none lingers unseen).
        self._idle: deque[_Connection] = deque()

    async def send(
        self,
        name: str,
        request: tuple[bytes, bytes, list[Header]],
        body: bytes,
        *,
        connect_timeout: float,
    ) -> PlainResponse:
        """Send ``request`` (method, target, headers) and ``body``, and read the answer's head;
        :meth:`release` the answer after.

        The caller's cancel scope bounds the whole (waiting for a slot included). Raises
        :class:`UpstreamConnectError`, :class:`UpstreamTimeout` (``connect``) or
        :class:`UpstreamBroken`.
        """
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        connection: _Connection | None = None
        try:
            connection = self._idle_connection() or await self._connect(name, connect_timeout)
            head = await _exchange_head(name, connection, request, body)
            headers = list(head.headers)
            chunked = any(name == b"transfer-encoding" for name, _ in headers)
            return PlainResponse(head.status_code, headers, connection, chunked)
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise

    def release(self, response: PlainResponse) -> None:
        """Give the answer's connection back if its exchange ended whole; else close it."""
        connection = response._connection
        try:
            if connection.reusable():
                connection.protocol.start_next_cycle()
                connection.idle_since = trio.current_time()
                self._idle.append(connection)
            else:
                connection.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every idle connection (those in use are closed by their release)."""
        while self._idle:
            self._idle.pop().close()

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still fit to use. The unfit met on the way
        are closed, and so is the longest idle one if it is unfit: a connection the server
        closed does not wait in CLOSE_WAIT for the pool to drain down to it."""
        idle = self._idle
        oldest_kept = trio.current_time() - KEEPALIVE_EXPIRY
        if idle and not idle[0].fit(oldest_kept):
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            if connection.fit(oldest_kept):
                return connection
            connection.close()
        return None

    async def _connect(self, name: str, connect_timeout: float) -> _Connection:
        with trio.move_on_after(connect_timeout):
            try:
                return _Connection(await trio.open_tcp_stream(self._host, self._port))
            except OSError as error:
                raise UpstreamConnectError(
                    f"cannot connect to {name}: {_describe(error)}"
                ) from error
        raise UpstreamTimeout("connect")


async def _exchange_head(
    name: str, connection: _Connection, request: tuple[bytes, bytes, list[Header]], body: bytes
) -> h11.Response:
    """Write the request, read the final response head (1xx heads are skipped)."""
    protocol = connection.protocol
    method, target, headers = request
    try:
        try:
            writes = [protocol.send(h11.Request(method=method, target=target, headers=headers))]
            if body:
                writes.append(protocol.send(h11.Data(data=body)))
            writes.append(protocol.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as error:
            # h11's message quotes the refused header value, which may be a credential.
            raise UpstreamBroken(f"{name} failed before its response: invalid request") from error
        if len(body) <= READ_SIZE:
            writes = [b"".join(data or b"" for data in writes)]  # one write for a small request
        for data in writes:
            if data:
                await connection.stream.send_all(data)
        while True:  # h11 gives only NEED_DATA, 1xx heads (skipped) and then the Response
            event = protocol.next_event()
            if type(event) is h11.Response:
                return event
            if event is h11.NEED_DATA and not await connection.receive():
                raise UpstreamBroken(
                    f"{name} failed before its response:"
                    " server disconnected without sending a response"
                )
    except h11.RemoteProtocolError as error:
        raise UpstreamBroken(f"{name} failed before its response: {error}") from error
    except _SOCKET_ERRORS as error:
        raise UpstreamBroken(f"{name} failed before its response: {_describe(error)}") from error
