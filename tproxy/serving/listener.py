"""The listening sockets and the accept loop: :func:`serve_asgi` (see :mod:`tproxy.serving`)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import repr_socket_addr

from tproxy.config import parse_host_port
from tproxy.serving.connection import FAILURE_LOG_INTERVAL, Connection, Connections, FailureLog

# HPACK's decoder logs each header it decodes at DEBUG, authorization included: request bytes
# reach no log, at any level tproxy is run with.
_HEADER_DECODER_LOG = "hpack"


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
    live = Connections()
    connection = partial(
        Connection,
        live,
        FailureLog(FAILURE_LOG_INTERVAL),
        options.stall_timeout,
        app,
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
