"""One client connection: Hypercorn's connection code (``TCPServer``) with tproxy's repairs,
and the set of live connections a drain closes. The protocols it runs are
:mod:`tproxy.serving.protocols`.
"""

from __future__ import annotations

import logging
import os
import traceback
from contextlib import suppress
from math import inf
from typing import cast

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from tproxy.serving.protocols import Protocols, RepairedH11Protocol
from tproxy.serving.requests import RequestTasks

log = logging.getLogger("tproxy.serving")


# After an answer that ends a connection early (a refusal before the body was read), how long
# and how much of what the client still sends is read and thrown away before the socket closes.
# Closing with unread bytes makes the kernel reset the connection, and a client still writing
# its body (urllib, curl without Expect) then loses the answer; reading on for a bounded while lets
# it arrive, as nginx's lingering close does.
LINGER_SECONDS = 5.0
LINGER_BYTES = 16 << 20

# A connection that fails logs one line (the exception's type and where it was raised, never its
# message: messages can quote the request's bytes) at most this often; the lines it holds back
# are counted in the next one.
FAILURE_LOG_INTERVAL = 10.0


class FailureLog:
    """Connection failures, logged without request bytes and at a bounded rate."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next_line_at = -inf
        self._held_back = 0

    def failed(self, error: Exception) -> None:
        now = trio.current_time()
        if now < self._next_line_at:
            self._held_back += 1
            return
        self._next_line_at = now + self._interval
        cause: BaseException = error
        while isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
        frames = traceback.extract_tb(cause.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        held_back = (
            f"; {self._held_back} more in the last {self._interval:g}s" if self._held_back else ""
        )
        self._held_back = 0
        log.error(
            "a connection failed (%s%s) and was closed; serving goes on%s",
            type(cause).__name__,
            where,
            held_back,
        )


class Connections:
    """The server's live connections, so that the end of a drain can close their sockets.

    Hypercorn writes to a client inside a cancel shield with no deadline: cancelling a connection
    whose client does not read leaves it blocked in that write until the kernel gives up
    (``TCP_USER_TIMEOUT``). Closing the socket makes the write fail at once.
    """

    def __init__(self) -> None:
        self._live: set[Connection] = set()
        self._draining = False
        self._drained = trio.Event()

    def add(self, connection: Connection) -> None:
        self._live.add(connection)

    def discard(self, connection: Connection) -> None:
        """The connection has ended (a method pair, not a generator's context manager held for
        each connection's whole life)."""
        self._live.discard(connection)
        if self._draining and not self._live:
            self._drained.set()

    def start_draining(self) -> None:
        """No new connection comes, idle ones close now, busy ones after their answer:
        :meth:`close_when_cancelled` returns once the last ends."""
        self._draining = True
        for connection in self._live:
            connection.close_if_idle()
        if not self._live:
            self._drained.set()

    async def close_when_cancelled(self) -> None:
        """Wait for the end of the drain; if cancelled first (the drain's deadline, a second
        signal, at any time), close every live socket."""
        try:
            await self._drained.wait()
        finally:
            for connection in self._live:
                connection.socket.close()


class Connection(TCPServer):
    """Hypercorn's connection, over TCP or TLS, with these repairs.

    - A connection that fails is closed and logged; the server goes on. Hypercorn's own loop lets
      anything but ``OSError`` out of a connection's task, which ends the whole server.
    - Its idle timer stops once the client has closed its side (see :mod:`tproxy.serving`), and
      stays stopped: HTTP/2 streams that end afterwards would restart it.
    - Closing it never races a write. Hypercorn closes a connection from its reading task when
      the client breaks the protocol (for instance, more bytes after a ``Connection: close``
      request) while the answer's task is writing; the close shuts the write side down outside
      the lock the writes take, and a write starting meanwhile failed with ``BusyResourceError``,
      a traceback, and an exchange recorded in the wrong state. Here the close takes that lock
      when it is free; when a write holds it, the stream is closed outright, which the write
      reports as a closed connection, as it would a departed client. The socket is closed even
      when the close is cancelled (at the end of a drain), where Hypercorn's would stay open
      until collected.
    - Closing lingers: after the end of the answer is sent, what the client still sends is read
      and discarded (:data:`LINGER_SECONDS`, :data:`LINGER_BYTES`), so a client still writing a
      refused body receives its answer rather than a reset. Nothing read then is parsed. The
      connection's own task lingers, never the answer's (see :meth:`_close`).
    - An HTTP/1.1 answer that has started is finished before the connection closes, even when
      the client breaks the protocol meanwhile (see :meth:`_answer_in_progress`).
    - Its idle timer is the reading loop's deadline, which each request moves
      (:meth:`_set_idle`), and the loop has no cancel scope around every read: Hypercorn starts
      a task per request for the timer. HTTP/1.1 is :class:`RepairedH11Protocol`: an answer with
      a Content-Length leaves with its head in one write.
    - HTTP/2 is :class:`~tproxy.serving.protocols.BoundedH2Protocol`.
    - Its status lines carry the reason phrase (``200 OK``): Hypercorn's have none.
    """

    def __init__(
        self,
        connections: Connections,
        failures: FailureLog,
        stall_timeout: float,
        app: ASGIFramework,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    ) -> None:
        # The app goes to the protocols as it is: RequestTasks calls it as ASGI 3, without
        # Hypercorn's wrapper (see tproxy.serving.requests).
        super().__init__(
            cast(AppWrapper, app),
            config,
            context,
            state,
            cast(trio.SSLStream[trio.SocketStream], stream),
        )
        self.socket = (
            stream.socket
            if isinstance(stream, trio.SocketStream)
            else stream.transport_stream.socket
        )
        self._plain = isinstance(stream, trio.SocketStream)  # TLS writes go through its stream
        self._connections = connections
        self._failures = failures
        self._stall_timeout = stall_timeout
        # Around the reading loop; its deadline is the idle timer's (see _set_idle).
        self._reading = trio.CancelScope()
        self._idle = True
        self._lingering = False
        self._reader: trio.lowlevel.Task | None = None
        self._reader_done = trio.Event()

    async def run(self) -> None:
        self._connections.add(self)
        try:
            await self._serve()
        except Exception as error:  # noqa: BLE001 - any failure is logged, the server goes on
            self._failures.failed(error)
        finally:
            self._connections.discard(self)

    async def _handshake(self) -> str | None:
        """The protocol to speak: ``http/1.1`` on TCP, what ALPN agreed on TLS; None when the
        TLS handshake failed or took longer than ``ssl_handshake_timeout``."""
        if not isinstance(self.stream, trio.SSLStream):
            return "http/1.1"
        try:
            with trio.fail_after(self.config.ssl_handshake_timeout):
                await self.stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            return None
        return self.stream.selected_alpn_protocol() or "http/1.1"

    async def _serve(self) -> None:
        try:
            alpn_protocol = await self._handshake()
            if alpn_protocol is None:
                return
            client = parse_socket_addr(self.socket.family, self.socket.getpeername())
            server = parse_socket_addr(self.socket.family, self.socket.getsockname())
            async with RequestTasks(self._continue_if_expected) as task_group:
                self._task_group = task_group
                self.protocol = Protocols(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    isinstance(self.stream, trio.SSLStream),
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol=alpn_protocol,
                    stall_timeout=self._stall_timeout,
                    closed=self._closed,
                )
                await self.protocol.initiate()
                self._set_idle(True)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if type(event) is RawData:
            # Cancelled: raise here, before writing anything, as Hypercorn's locked write would;
            # a direct write could send part of a frame and never the rest (a torn HTTP/2 frame
            # ends the connection for every stream on it). Trio's own check: reading the
            # effective deadline walked every enclosing cancel scope on each write.
            await trio.lowlevel.checkpoint_if_cancelled()
            rest = self._write_now(event.data)
            if not rest:
                return
            event = RawData(rest)
        elif isinstance(event, Updated):
            if not self._reader_done.is_set():  # after the client's side: no timer to move
                self._set_idle(event.idle)
            return
        if isinstance(event, Closed) and self._answer_in_progress():
            return  # the answer ends the connection itself, once it is whole
        await super().protocol_send(event)

    def _write_now(self, data: bytes) -> bytes:
        """Write what the socket takes at once, without waiting; return what is left for
        Hypercorn's locked, shielded write (all of it over TLS, while another write holds the
        lock, or when the socket fails: that write reports the failure).

        A stream sends one body message per event: Hypercorn's write takes its lock and Trio's
        ``send_all`` with a checkpoint each, two task steps per message for a write that, on a
        socket with room, never waits. A write made here cannot be cancelled midway, so it
        needs no shield, and nothing else writes while the lock is free."""
        if not self._plain or self.send_lock.locked():
            return data
        # Asked each time, never kept: a closed socket's number is -1, not a number the kernel
        # may have given another connection since.
        descriptor = self.socket.fileno()
        if descriptor < 0:
            return data
        try:
            sent = os.write(descriptor, data)
        except OSError:  # full (BlockingIOError), closed or reset: the slow path decides
            return data
        return data[sent:]

    async def _continue_if_expected(self) -> None:
        """Send ``100 Continue`` if an HTTP/1.1 client waits for it (see
        :class:`~tproxy.serving.protocols._ContinueWhenAsked`)."""
        protocol = self.protocol.protocol
        if isinstance(protocol, RepairedH11Protocol):
            await protocol.continue_if_expected()

    def _set_idle(self, idle: bool) -> None:
        """The idle timer, as the reading loop's deadline. Idle: the connection closes after
        ``keep_alive_timeout`` (at once while the server drains); busy: never, until it is idle
        again. Hypercorn starts a task per request for this timer, with a lock around each start
        and stop; here a request moves a deadline."""
        self._idle = idle
        if not idle:
            self._reading.deadline = inf
        elif self.context.terminated.is_set():
            self._reading.deadline = -inf
        else:
            self._reading.deadline = trio.current_time() + self.config.keep_alive_timeout

    def _closed(self) -> None:
        """The protocol was told the connection closed: when another task told it (a write
        failed: the client reset or left), the reading loop stops too, and the connection
        closes. It may not notice by itself: an HTTP/1.1 connection with a request pipelined
        behind the answer reads nothing until that answer is over, and the answer is over
        without a ``StreamClosed`` to resume the reading, which waited for good with its
        socket open."""
        if trio.lowlevel.current_task() is not self._reader:
            self._reading.cancel()

    def close_if_idle(self) -> None:
        """The server drains: close now if no answer is in progress (busy connections close
        after their answer, as Hypercorn's protocols check the drain)."""
        if self._idle:
            self._reading.deadline = -inf

    def _answer_in_progress(self) -> bool:
        """Whether an HTTP/1.1 answer that ends the connection has started and not ended.

        Hypercorn's parser closes the connection when the client sends what it must not: bytes
        after a request whose answer says ``Connection: close``, for instance the request hidden
        behind a refused one. That answer (the app's, whole in one message after its head) would
        be cut after its head; the connection closes once it is out.
        """
        protocol = self.protocol.protocol
        return (
            isinstance(protocol, RepairedH11Protocol)
            and protocol.closing_answer
            and protocol.connection.our_state is h11.SEND_BODY
        )

    async def _read_data(self) -> None:
        """Hypercorn's reading loop, inside one cancel scope whose deadline is the idle timer
        (Hypercorn puts a scope around every read for its ``read_timeout``, which tproxy never
        sets, and runs the idle timer as a task of its own)."""
        self._reader = trio.lowlevel.current_task()
        try:
            with self._reading:
                while True:
                    data = await self._receive()
                    if data is None:
                        break
                    await self.protocol.handle(RawData(data))
                    if not data:
                        break
                await self.protocol.handle(Closed())
            if self._reading.cancelled_caught and not self._lingering:  # idle for too long
                await self.protocol.handle(Closed())
                await trio.aclose_forcefully(self.stream)  # no linger: no answer was cut
        finally:
            self._reader_done.set()

    async def _receive(self) -> bytes | None:
        """What the client sent next (``b""`` at its end), None when the socket failed or was
        closed.

        Over TCP: wait until the socket is readable, then read its descriptor. Trio's
        ``receive_some`` first tries a read, which a connection waiting for its next request or
        for its answer's end almost never finds anything for, and holds a chain of coroutines and
        context managers through the whole wait (~1 KB per open connection). The descriptor is
        asked for each time: a closed socket's is -1, never a number the kernel has since given
        another connection, and it is never waited for (Trio would keep the closed number
        registered to this task, and refuse every later wait on it as busy)."""
        if not self._plain:
            try:
                return bytes(await self.stream.receive_some(MAX_RECV))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return None
        while True:
            descriptor = self.socket.fileno()
            if descriptor < 0:
                return None
            try:
                await trio.lowlevel.wait_readable(descriptor)
                return os.read(self.socket.fileno(), MAX_RECV)
            except BlockingIOError:  # woken for nothing: wait again
                continue
            except (trio.ClosedResourceError, OSError):  # reset, or closed while waiting
                return None

    async def _close(self) -> None:
        if self._reader is not None and trio.lowlevel.current_task() is not self._reader:
            # Asked by an answer's task (the answer is out, the connection ends): the
            # connection's own task closes it, lingering, once its reading stops and its
            # requests' tasks end. The answer's last write returns now: it used to linger here,
            # up to LINGER_SECONDS for a client that keeps its socket (a pooled one), and a
            # drain's deadline then cut an answer the client had whole. The end of the answer
            # goes out now all the same (an HTTP/1.0 client's ends with the connection), unless
            # a write is in progress: the close after it sends it.
            self._lingering = True
            self._reading.cancel()
            if self._plain and not self.send_lock.locked():
                with suppress(OSError):
                    self.socket.shutdown(trio.socket.SHUT_WR)
            return
        try:
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                return  # a write is in progress: the close below makes it fail as closed
            try:
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    if isinstance(self.stream, trio.SocketStream):
                        await self.stream.send_eof()  # TLS has no half-close: linger all the same
                    await self._linger()
            finally:
                self.send_lock.release()
        finally:
            await trio.aclose_forcefully(self.stream)  # closed even when cancelled midway

    async def _linger(self) -> None:
        """Read and discard what the client still sends, for a bounded time and size."""
        with trio.move_on_after(LINGER_SECONDS):
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await self.stream.receive_some(MAX_RECV)
                if not data:
                    return
                discarded += len(data)
