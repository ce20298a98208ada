"""Hypercorn's HTTP/1.1 and HTTP/2 protocol code on an accept loop of ours.

``hypercorn.trio.serve`` keeps a connection's socket open after its client has closed it, for as
long as the connection's idle timer still runs (``keep_alive_timeout``, 75 s by default): the
reading side ends, but the connection's task group waits for the timer before closing. Sockets
then sit in CLOSE_WAIT at the rate clients close them. Here each connection stops its idle timer
once the client's side has ended, so the socket is closed as soon as the last answer is out.

The listening sockets are ours too, for the options set before ``bind`` and after it:

- ``TCP_USER_TIMEOUT``, inherited by every accepted connection. Hypercorn writes to a client's
  socket inside a cancel shield with no deadline, so a client that never reads would hold its
  request, the upstream call behind it and even a drain open for as long as it keeps the
  connection; the kernel instead drops a connection whose sent data stays unacknowledged, or
  whose receive window stays shut, for longer than ``stall_timeout``, and the shielded write then
  fails like any write to a departed client.
- ``SO_REUSEPORT`` when asked, so that several tproxy processes can share one address.

What ``hypercorn.trio.serve`` does and this loop leaves out, because tproxy uses none of it: ASGI
lifespan events (the server opens the app's resources), QUIC and Unix socket listeners,
restarts after ``max_requests``, statsd. TLS is Hypercorn's: the context its configuration makes,
on Trio's TLS streams, which Hypercorn's connection code already handles.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import h11
import trio
from hypercorn.config import Config
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from tproxy.config import parse_host_port

log = logging.getLogger("tproxy.serving")


class _PromptlyClosedConnection(TCPServer):
    """Hypercorn's connection, with four repairs.

    - A connection that fails is closed and logged; the server goes on. Hypercorn's own loop lets
      anything but ``OSError`` out of a connection's task, which ends the whole server.
    - Its idle timer stops once the client has closed its side (see the module's docstring).
    - Closing it never races a write. Hypercorn closes a connection from its reading task when
      the client breaks the protocol (for instance, more bytes after a ``Connection: close``
      request) while the answer's task is writing; the close shuts the write side down outside
      the lock the writes take, and a write starting meanwhile failed with ``BusyResourceError``,
      a traceback, and an exchange recorded in the wrong state. Here the close takes that lock
      when it is free; when a write holds it, the stream is closed outright, which the write
      reports as a closed connection, as it would a departed client. The socket is closed even
      when the close is cancelled (at the end of a drain), where Hypercorn's would stay open
      until collected.
    - Its status lines carry the reason phrase (``200 OK``): Hypercorn's have none.
    """

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._protocol

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        """Hypercorn's protocol for this connection; an HTTP/1.1 one, not yet started, is given
        an h11 connection that writes reason phrases (see :class:`_PhrasedH11Connection`)."""
        inner = wrapper.protocol
        if isinstance(inner, H11Protocol) and type(inner.connection) is h11.Connection:
            inner.connection = _PhrasedH11Connection(
                h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
            )
        self._protocol = wrapper

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:
            log.exception("a connection failed and was closed; serving goes on")

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()

    async def _close(self) -> None:
        try:
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                return  # a write is in progress: the close below makes it fail as closed
            try:
                await super()._close()
            finally:
                self.send_lock.release()
        finally:
            await trio.aclose_forcefully(self.stream)  # closed even when cancelled midway


class _PhrasedH11Connection(h11.Connection):
    """h11's server connection; a response sent without a reason phrase gets the standard one.

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


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""  # a status without a registered phrase keeps an empty one


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
        # Hypercorn's connection does the handshake (bounded by its ssl_handshake_timeout)
        # and picks HTTP/2 or HTTP/1.1 by the protocol ALPN agreed.
        listeners = [
            trio.SSLListener(listener, options.tls, https_compatible=True) for listener in listeners
        ]
    context = WorkerContext(max_requests=None)
    connection = partial(
        _PromptlyClosedConnection,
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        context,
        ConnectionState({}),
    )
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                partial(trio.serve_listeners, connection, listeners, handler_nursery=connections)
            )
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
