"""Hypercorn's HTTP/1.1 and HTTP/2 protocol code on an accept loop of ours.

``hypercorn.trio.serve`` keeps a connection's socket open after its client has closed it, for as
long as the connection's idle timer still runs (``keep_alive_timeout``, 75 s by default): the
reading side ends, but the connection's task group waits for the timer before closing. Sockets
then sit in CLOSE_WAIT at the rate clients close them. Here each connection stops its idle timer
once the client's side has ended, so the socket is closed as soon as the last answer is out.

What ``hypercorn.trio.serve`` does and this loop leaves out, because tproxy uses none of it: ASGI
lifespan events (the server opens the app's resources), TLS and QUIC listeners, restarts after
``max_requests``, statsd.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app


class _PromptlyClosedConnection(TCPServer):
    """Hypercorn's connection, whose idle timer stops once the client has closed its side."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


async def serve_asgi(
    app: ASGIFramework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns, then drain.

    Reports the bound addresses (``http://host:port``) once listening. On shutdown it stops
    accepting, lets kept-alive connections close after their current answer, and cancels what
    still runs after ``config.graceful_timeout``. Raises OSError when an address cannot be bound.
    """
    sockets = config.create_sockets()
    listeners = []
    binds = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
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
