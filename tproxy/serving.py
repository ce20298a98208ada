"""Hypercorn's HTTP/1.1 and HTTP/2 protocol code on an accept loop of ours.

``hypercorn.trio.serve`` keeps a connection's socket open after its client has closed it, for as
long as the connection's idle timer still runs (``keep_alive_timeout``, 75 s by default): the
reading side ends, but the connection's task group waits for the timer before closing. Sockets
then sit in CLOSE_WAIT at the rate clients close them. Here each connection stops its idle timer
once the client's side has ended, so the socket is closed as soon as the last answer is out.

The listening sockets are ours too, for the options set before ``bind`` and after it:

- ``TCP_USER_TIMEOUT``, inherited by every accepted connection. Hypercorn writes to a client's
  socket inside a cancel shield with no deadline, so a client that never reads would hold its
  request and the upstream call behind it for as long as it keeps the connection; the kernel
  instead drops a connection whose sent data stays unacknowledged, or whose receive window stays
  shut, for longer than ``stall_timeout``, and the shielded write then fails like any write to a
  departed client. A drain is shorter: at its deadline the sockets still open are closed
  (:class:`_Connections`).
- ``SO_REUSEPORT`` when asked, so that several tproxy processes can share one address.

What ``hypercorn.trio.serve`` does and this loop leaves out, because tproxy uses none of it: ASGI
lifespan events (the server opens the app's resources), QUIC and Unix socket listeners,
restarts after ``max_requests``, statsd. TLS is Hypercorn's: the
context its configuration makes, on Trio's TLS streams; the connection below does the handshake
(bounded by ``ssl_handshake_timeout``) and picks HTTP/2 or HTTP/1.1 by the protocol ALPN agreed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from math import inf
from typing import Any, cast

import h2.errors
import h2.events
import h2.exceptions
import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Response, Trailers
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from tproxy.config import parse_host_port

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

# How long closing an idle connection may take (a TLS close writes to the client).
IDLE_CLOSE_SECONDS = 1.0

# HPACK's decoder logs each header it decodes at DEBUG, authorization included: request bytes
# reach no log, at any level tproxy is run with.
_HEADER_DECODER_LOG = "hpack"


class _FailureLog:
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


class _BoundedH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 connection, with its streams' writes bounded.

    - A write waits for the client's flow-control window at most ``stall_timeout``; a stream whose
      window stays shut longer is reset (``CANCEL``) and its request told the client has gone,
      as the kernel's ``TCP_USER_TIMEOUT`` does for a TCP client that stops reading (a client that
      stops sending WINDOW_UPDATE keeps reading the socket, so the kernel never notices).
    - Once the connection is closed, every stream's pending write returns at once. Hypercorn
      leaves them waiting for a window that can no longer open, and the request behind each (its
      answer in memory) waits until its own deadline.
    - DATA for a stream already answered is dropped (see :meth:`_handle_events`).
    """

    def __init__(self, *arguments: Any, stall_timeout: float) -> None:
        super().__init__(*arguments)
        self._stall_timeout = stall_timeout

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, Body | Data | EndBody | EndData | Trailers):
            await super().stream_send(event)
            return
        with trio.move_on_after(self._stall_timeout) as waiting:
            await super().stream_send(event)
        if waiting.cancelled_caught:
            await self._reset_stalled(event.stream_id)

    async def handle(self, event: Event) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            for buffer in self.stream_buffers.values():
                await buffer.close()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        """Hypercorn's handling, one event at a time, less DATA for a stream already answered.

        A stream answered before its body was read (a 413 from the declared length) has left
        ``streams``; Hypercorn then failed the whole connection on the client's next DATA frame
        for it (``KeyError``). The data is acknowledged, so the connection's window stays open,
        and dropped.
        """
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                await self._flush()
            else:
                await super()._handle_events([event])

    async def _reset_stalled(self, stream_id: int) -> None:
        with suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            await self._flush()
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:  # Hypercorn's sending task drops a closed buffer of a reset stream
            await buffer.close()
            self.priority.unblock(stream_id)
            await self.has_data.set()
        await self._close_stream(stream_id)


class _ContinueWhenAsked(h11.Connection):
    """h11's connection, hiding from Hypercorn's reader a client that waits for ``100 Continue``,
    and writing the reason phrase Hypercorn leaves out.

    Hypercorn sends ``100 Continue`` as soon as the head is parsed, before the app has seen it;
    a refusal decidable from the head (413 for a declared length, 401) then came after a 100 that
    told the client to send the body. Here the 100 is sent when the app first asks for the body
    (:meth:`_H11Protocol.continue_if_expected`); an answer sent first makes it unnecessary.

    Hypercorn builds every ``h11.Response`` without a reason, so the status line read
    ``HTTP/1.1 200 `` (legal, RFC 9112 §4, but curl, logs and people expect ``200 OK``).
    """

    def send(self, event: h11.Event) -> bytes | None:  # type: ignore[override]
        if isinstance(event, h11.Response | h11.InformationalResponse) and not event.reason:
            event = type(event)(
                status_code=event.status_code,
                headers=event.headers.raw_items(),
                http_version=event.http_version,
                reason=_reason_phrase(event.status_code),
            )
        return super().send(event)

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return False

    @property
    def waiting_for_100_continue(self) -> bool:
        return self.client_is_waiting_for_100_continue  # h11 serving: the other side is a client


def _has_length(response: Response) -> bool:
    return any(name.lower() == b"content-length" for name, _ in response.headers)


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""  # a status without a registered phrase keeps an empty one


class _H11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1, which never upgrades a connection to HTTP/2 (h2c) and sends
    ``100 Continue`` only when the app reads the body.

    An ``Upgrade: h2c`` request is answered in HTTP/1.1, as RFC 9110 §7.8 lets a server do (RFC
    9113 deprecated the upgrade). Served, it would open a channel that a front end passing the
    header through (as it does for WebSocket) no longer parses: every request after it would
    reach tproxy unseen by the front end's per-request rules ("h2c smuggling"). Prior-knowledge
    HTTP/2 (``PRI * HTTP/2.0``) is still served: a front end that speaks HTTP/1.1 never sends it.
    """

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.connection = _ContinueWhenAsked(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        self._write = self.send
        self.send = self._send_or_hold
        self._holding_head = False
        self._head = b""

    async def stream_send(self, event: StreamEvent) -> None:
        """Hypercorn's, but the head of an answer with a Content-Length (a hit, a refusal, a JSON
        answer) waits for the answer's first bytes, so that both leave in one write."""
        if isinstance(event, Response) and event.status_code >= 200 and _has_length(event):
            self._holding_head = True
            try:
                await super().stream_send(event)
            finally:
                self._holding_head = False
        else:
            await super().stream_send(event)

    async def _send_or_hold(self, event: Event) -> None:
        """The connection's ``send``: a held head goes out with the next bytes, or before
        anything else the connection is told (the answer ended, the connection closes); an empty
        write (the end of an answer framed by its Content-Length) is no write at all."""
        if isinstance(event, RawData):
            if self._holding_head:
                self._head += event.data
                return
            data, self._head = self._head + event.data, b""
            if data:
                await self._write(RawData(data))
            return
        if self._head:
            head, self._head = self._head, b""
            await self._write(RawData(head))
        await self._write(event)

    async def continue_if_expected(self) -> None:
        """Send ``100 Continue`` if the client waits for it before sending its body."""
        connection = self.connection
        if isinstance(connection, _ContinueWhenAsked) and connection.waiting_for_100_continue:
            await self._send_h11_event(
                h11.InformationalResponse(
                    status_code=100, headers=self.config.response_headers("h11")
                )
            )

    async def _check_protocol(self, event: h11.Request) -> None:
        upgrades = [value for name, value in event.headers if name == b"upgrade"]
        if not any(b"h2c" in value.lower() for value in upgrades):
            await super()._check_protocol(event)


class _Protocols(ProtocolWrapper):
    """HTTP/1.1 (:class:`_H11Protocol`), switching to :class:`_BoundedH2Protocol` for
    prior-knowledge HTTP/2; HTTP/2 from the start when TLS's ALPN agreed on it."""

    def __init__(self, *arguments: Any, alpn_protocol: str, stall_timeout: float) -> None:
        super().__init__(*arguments)
        self.protocol = (
            _BoundedH2Protocol(*arguments, stall_timeout=stall_timeout)
            if alpn_protocol == "h2"
            else _H11Protocol(*arguments)
        )
        self._arguments = arguments
        self._stall_timeout = stall_timeout

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as switch:
            self.protocol = h2_protocol = _BoundedH2Protocol(
                *self._arguments, stall_timeout=self._stall_timeout
            )
            await h2_protocol.initiate()
            await h2_protocol.handle(RawData(data=switch.data))


class _Connections:
    """The server's live connections, so that the end of a drain can close their sockets.

    Hypercorn writes to a client inside a cancel shield with no deadline: cancelling a connection
    whose client does not read leaves it blocked in that write until the kernel gives up
    (``TCP_USER_TIMEOUT``). Closing the socket makes the write fail at once.
    """

    def __init__(self) -> None:
        self._live: set[_PromptlyClosedConnection] = set()
        self._draining = False
        self._drained = trio.Event()

    @contextmanager
    def track(self, connection: _PromptlyClosedConnection) -> Iterator[None]:
        self._live.add(connection)
        try:
            yield
        finally:
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


class _PromptlyClosedConnection(TCPServer):
    """Hypercorn's connection, over TCP or TLS, with these repairs.

    - A connection that fails is closed and logged; the server goes on. Hypercorn's own loop lets
      anything but ``OSError`` out of a connection's task, which ends the whole server.
    - Its idle timer stops once the client has closed its side (see the module's docstring), and
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
      refused body receives its answer rather than a reset. Nothing read then is parsed.
    - An HTTP/1.1 answer that has started is finished before the connection closes, even when
      the client breaks the protocol meanwhile (see :meth:`_answer_in_progress`).
    - HTTP/2 is :class:`_BoundedH2Protocol`.
    - Its status lines carry the reason phrase (``200 OK``): Hypercorn's have none.
    """

    def __init__(
        self,
        connections: _Connections,
        failures: _FailureLog,
        stall_timeout: float,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    ) -> None:
        super().__init__(
            app, config, context, state, cast(trio.SSLStream[trio.SocketStream], stream)
        )
        self.socket = (
            stream.socket
            if isinstance(stream, trio.SocketStream)
            else stream.transport_stream.socket
        )
        self._connections = connections
        self._failures = failures
        self._stall_timeout = stall_timeout
        self._reading = trio.CancelScope()
        self._idle_timer = trio.CancelScope()  # its deadline: when an idle connection closes
        self._idle = True
        self._idle_timer_stopped = False
        self._reader: trio.lowlevel.Task | None = None
        self._reader_done = trio.Event()
        self._closing_answer = False

    async def run(self) -> None:
        with self._connections.track(self):
            try:
                await self._serve()
            except Exception as error:  # noqa: BLE001 - any failure is logged, the server goes on
                self._failures.failed(error)

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
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _Protocols(
                    self._app_for_this_connection(),
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
                )
                await self.protocol.initiate()
                self._set_idle(True)
                task_group.spawn(self._close_when_idle)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            if not self._reader_done.is_set():  # after the client's side: no timer to move
                self._set_idle(event.idle)
            return
        if isinstance(event, Closed) and self._answer_in_progress():
            return  # the answer ends the connection itself, once it is whole
        await super().protocol_send(event)

    def _set_idle(self, idle: bool) -> None:
        """Idle: the connection closes after ``keep_alive_timeout`` (at once while the server
        drains); busy: never, until it is idle again."""
        self._idle = idle
        if not idle:
            self._idle_timer.deadline = inf
        elif self.context.terminated.is_set():
            self._idle_timer.deadline = -inf
        else:
            self._idle_timer.deadline = trio.current_time() + self.config.keep_alive_timeout

    def close_if_idle(self) -> None:
        """The server drains: close now if no answer is in progress (busy connections close
        after their answer, as Hypercorn's protocols check the drain)."""
        if self._idle:
            self._idle_timer.deadline = -inf

    async def _close_when_idle(self) -> None:
        """The connection's one idle timer, for all its requests: Hypercorn starts a task per
        request for it, and a lock around each start and stop. Here a request only moves this
        task's deadline (:meth:`_set_idle`)."""
        with self._idle_timer:
            await trio.sleep_forever()
        if self._idle_timer_stopped:
            return
        with trio.move_on_after(IDLE_CLOSE_SECONDS, shield=True):
            await self.protocol.handle(Closed())
            await self.stream.aclose()

    def _answer_in_progress(self) -> bool:
        """Whether an HTTP/1.1 answer that ends the connection has started and not ended.

        Hypercorn's parser closes the connection when the client sends what it must not: bytes
        after a request whose answer says ``Connection: close``, for instance the request hidden
        behind a refused one. That answer (the app's, whole in one message after its head) would
        be cut after its head; the connection closes once it is out.
        """
        protocol = self.protocol.protocol
        return (
            self._closing_answer
            and isinstance(protocol, H11Protocol)
            and protocol.connection.our_state is h11.SEND_BODY
        )

    def _app_for_this_connection(self) -> AppWrapper:
        """The app, noting an answer whose head says ``Connection: close``, and sending
        ``100 Continue`` when it asks for the body (see :class:`_ContinueWhenAsked`)."""
        app = self.app

        async def run_app(
            scope: Scope,
            receive: ASGIReceiveCallable,
            send: ASGISendCallable,
            sync_spawn: Callable[..., object],
            call_soon: Callable[..., object],
        ) -> None:
            async def noting_send(message: ASGISendEvent) -> None:
                if message["type"] == "http.response.start":
                    closing = (b"connection", b"close") in message.get("headers", [])
                    self._closing_answer = closing
                await send(message)

            async def continuing_receive() -> ASGIReceiveEvent:
                protocol = self.protocol.protocol
                if isinstance(protocol, _H11Protocol):
                    await protocol.continue_if_expected()
                return await receive()

            await app(scope, continuing_receive, noting_send, sync_spawn, call_soon)

        return cast(AppWrapper, run_app)

    async def _read_data(self) -> None:
        """Hypercorn's reading loop, without its cancel scope around every read: its
        ``read_timeout`` is not set (the idle timer bounds a silent client)."""
        self._reader = trio.lowlevel.current_task()
        try:
            with self._reading:
                while True:
                    try:
                        data = await self.stream.receive_some(MAX_RECV)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
                    await self.protocol.handle(RawData(bytes(data)))
                    if not data:
                        break
                await self.protocol.handle(Closed())
        finally:
            self._reader_done.set()
        self._idle_timer_stopped = True
        self._idle_timer.cancel()

    async def _close(self) -> None:
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
            if self._reader is not None and trio.lowlevel.current_task() is not self._reader:
                self._reading.cancel()  # the reader stops; what it has not parsed is discarded
                await self._reader_done.wait()
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await self.stream.receive_some(MAX_RECV)
                if not data:
                    return
                discarded += len(data)


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """What the listening sockets are asked for beyond Hypercorn's settings; ``tls`` is the
    server context (Hypercorn's, from its config) when the listener serves HTTPS."""

    stall_timeout: float
    reuse_port: bool = False
    tls: ssl.SSLContext | None = None


def _listening_socket(address: str, options: SocketOptions, backlog: int) -> socket.socket:
    """A TCP socket bound to ``HOST:PORT`` and listening; closed again if binding fails."""
    host, port = parse_host_port(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if options.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if user_timeout is not None:  # Linux; elsewhere the shielded write stays unbounded
            milliseconds = max(1, int(options.stall_timeout * 1000))
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, milliseconds)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_asgi(
    app: ASGIFramework,
    config: Config,
    options: SocketOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns, then drain.

    Reports the bound addresses (``http://host:port``, ``https://`` with TLS) once listening. On
    shutdown it stops accepting, lets kept-alive connections close after their current answer,
    and cancels what still runs after ``config.graceful_timeout``. Raises OSError when an
    address cannot be bound.
    """
    logging.getLogger(_HEADER_DECODER_LOG).setLevel(logging.INFO)
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    binds = []
    scheme = "http" if options.tls is None else "https"
    try:
        for address in config.bind:
            sock = _listening_socket(address, options, config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    if options.tls is not None:
        listeners = [
            trio.SSLListener(listener, options.tls, https_compatible=True) for listener in listeners
        ]
    context = WorkerContext(max_requests=None)
    live = _Connections()
    connection = partial(
        _PromptlyClosedConnection,
        live,
        _FailureLog(FAILURE_LOG_INTERVAL),
        options.stall_timeout,
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        context,
        ConnectionState({}),
    )
    async with trio.open_nursery() as connections:
        connections.start_soon(live.close_when_cancelled)
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                partial(trio.serve_listeners, connection, listeners, handler_nursery=connections)
            )
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        live.start_draining()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
