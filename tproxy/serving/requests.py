"""Each request's app task, as a connection starts it: Hypercorn's task group, with the app
called as the plain ASGI 3 callable it is, and the client's departure told the moment
Hypercorn learns of it.

Hypercorn reports a client that left only as ``http.disconnect`` on the app's ``receive()``, so
an app learns of it by keeping a task waiting there for the whole answer. Here the request's
:class:`RequestEnds` also tells a listener the app registered (the ``tproxy.departure`` scope
extension, :class:`tproxy.asgi.Departure`) as soon as the message is queued: no task, coroutine
chain and cancel scope per request just to wait for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import cast

import trio
from hypercorn.config import Config
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveEvent,
    ASGISendEvent,
    Scope,
)

from tproxy import asgi
from tproxy.asgi import DEPARTURE

HypercornSend = Callable[[ASGISendEvent | None], Awaitable[None]]


class RequestEnds:
    """The server's side of one request: ``receive`` for the app (sending ``100 Continue`` first
    when the client waits for it), ``put`` for Hypercorn, and the departure's listener.

    Hypercorn queues the request's body in a bounded channel (``max_app_queue_size``); its
    ``http.disconnect`` closes the channel (see :meth:`put`). Once the app has the whole body
    only the departure can follow, and a flag says it: the channel is let go then, rather than
    held for the whole answer (a channel's state, its two ends and its deque: ~1.7 KB per open
    stream)."""

    __slots__ = ("_continue_if_expected", "_from_server", "_gone", "_left", "_listener", "_to_app")

    def __init__(self, continue_if_expected: Callable[[], Awaitable[None]], size: int) -> None:
        self._continue_if_expected = continue_if_expected
        self._to_app: trio.MemorySendChannel[ASGIReceiveEvent] | None
        self._from_server: trio.MemoryReceiveChannel[ASGIReceiveEvent] | None
        self._to_app, self._from_server = trio.open_memory_channel[ASGIReceiveEvent](size)
        self._listener: Callable[[], None] | None = None
        self._left: trio.Event | None = None  # made only for an app waiting after its body
        self._gone = False

    async def receive(self) -> ASGIReceiveEvent:
        queue = self._from_server
        if queue is None:  # the body is whole: what is left to say is the departure
            if self._gone:
                await trio.lowlevel.checkpoint()
            else:
                if self._left is None:
                    self._left = trio.Event()
                await self._left.wait()
            return {"type": "http.disconnect"}
        await self._continue_if_expected()
        try:
            message = await queue.receive()
        except trio.EndOfChannel:  # the client left before its body was whole (see put)
            self._from_server = None
            return {"type": "http.disconnect"}
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._to_app = self._from_server = None
        return message

    async def put(self, message: ASGIReceiveEvent) -> None:
        """Queue a body message for the app; tell it a departure (``http.disconnect``).

        A departure never waits for room in the queue: it closes the queue, and the app reads
        what was queued, then the departure. A body message waiting for room (an app that
        answered without reading its body, an HTTP/2 client still sending it) is dropped then.
        Waiting, it held the connection's reading task, and the app's own task that closed the
        stream, on a queue nobody would read again: the connection hung for good, and on
        HTTP/2 every stream on it.

        A departure is told once it is past the cancel check, as a task waiting on
        ``receive()`` would learn it: a reading task that is itself cancelled (the drain's
        deadline, closing the sockets) tells nothing, and the request ends as shut down, not as
        a client gone."""
        if message["type"] != "http.disconnect":
            queue = self._to_app
            if queue is None:  # the client has left: nothing more is read
                await trio.lowlevel.checkpoint_if_cancelled()
                return
            with suppress(trio.ClosedResourceError):  # it left while this waited for room
                await queue.send(message)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._gone:
            return
        self._gone = True
        queue, self._to_app = self._to_app, None
        if queue is not None:
            queue.close()
        if self._left is not None:
            self._left.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener()

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` once, when the client leaves (at once if it has already left);
        None stops listening. The listener runs in the connection's reading task: it must not
        block or raise."""
        if listener is not None and self._gone:
            listener()
            return
        self._listener = listener


class RequestTasks(TaskGroup):
    """A connection's task group, starting each request's app as a plain ASGI 3 callable (the
    ``app`` Hypercorn's protocols hand over is the one given to the connection, unwrapped)."""

    def __init__(self, continue_if_expected: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._continue_if_expected = continue_if_expected

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Scope,
        send: HypercornSend,
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        ends = RequestEnds(self._continue_if_expected, config.max_app_queue_size)
        cast(asgi.Scope, scope)["extensions"][DEPARTURE] = ends
        self.spawn(_run_app, cast(ASGIFramework, app), config, scope, ends, send)
        return ends.put


async def _run_app(
    app: ASGIFramework, config: Config, scope: Scope, ends: RequestEnds, send: HypercornSend
) -> None:
    """Run the app for one request, as Hypercorn's own task group does: a failure other than
    cancellation is logged in Hypercorn's error log (the server goes on); either way Hypercorn
    is told the app has finished (``None``), which answers 500 if it had not started its answer
    and ends the stream."""
    try:
        await app(scope, ends.receive, send)
    except trio.Cancelled:
        raise
    except BaseExceptionGroup as group:
        if group.split(trio.Cancelled)[1] is None:
            raise
        await config.log.exception("Error in ASGI Framework")
    except Exception:  # noqa: BLE001 - any failure is logged, the server goes on
        await config.log.exception("Error in ASGI Framework")
    finally:
        await send(None)
