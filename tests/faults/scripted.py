"""An upstream that misbehaves on cue: real sockets on 127.0.0.1, raw bytes on the wire.

The well-behaved fake (``tests/fakeupstream.py``) speaks through h11, which refuses to write a
wrong Content-Length or a reset. This one reads each request with h11 (so the proxy's side is
checked as usual) and then hands the socket to a *script*: an async function that writes
whatever bytes it likes, resets the connection, or never answers at all.

A request that carries the header ``x-fault`` gets the script; any other gets a whole, correct
answer (an SSE stream or a JSON completion, as the request asked, from the fake upstream's own
answer builders). So a test sends a request with ``x-fault``, then the same request without it:
the cache key ignores that header, so if the fault had left anything in the cache, the second
request would be a hit.

Every connection serves one request and closes (``Connection: close``): the pool never reuses a
socket a script has left in an unknown state.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio
from trio_util import AsyncValue

from tests.fakeupstream import completion_answer, stream_events
from tests.h11peer import (
    REQUEST_TIMEOUT,
    Peer,
    SeenRequest,
    serve_connection,
    serve_on_loopback,
)

Script = Callable[[trio.SocketStream, SeenRequest], Awaitable[None]]

SSE = b"text/event-stream; charset=utf-8"
JSON = b"application/json"


@dataclass
class ScriptedUpstream:
    """Serve with :meth:`serve` in a nursery; ``script`` answers the requests marked ``x-fault``.

    The first ``silent`` connections are accepted and then neither read nor answered: an
    upstream that is listening but hung.
    """

    script: Script
    silent: int = 0
    port: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    received: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
    connections: int = 0
    peer_closed: int = 0
    peer_closed_event: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, target: str) -> int:
        return sum(1 for request in self.requests if request.target == target)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_on_loopback, self._connection)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        if self.connections <= self.silent:
            async with stream:
                await self.wait_for_close(stream)
            return
        await serve_connection(partial(self._received, stream), stream, keep_alive=False)

    async def _received(self, stream: trio.SocketStream, _: Peer, request: SeenRequest) -> None:
        """Hand the socket to the script, or answer well; the connection closes after."""
        self.requests.append(request)
        self.received.value += 1
        if "x-fault" in request.headers:
            await self.script(stream, request)
        else:
            await answer(stream, request)

    async def wait_for_close(self, stream: trio.SocketStream) -> None:
        """Park until the proxy closes (or resets) the connection; count that it did."""
        if await Peer(stream).wait_for_close():
            self.peer_closed += 1
            self.peer_closed_event.set()


async def read_request(stream: trio.SocketStream) -> SeenRequest | None:
    """One whole request, read afresh (a script answers it in raw bytes, so h11 cannot follow
    the connection to the next one), or None if the peer closed before sending one or did not
    send it within :data:`~tests.h11peer.REQUEST_TIMEOUT`."""
    with trio.move_on_after(REQUEST_TIMEOUT):
        return await Peer(stream).next_request()
    return None


def response_head(
    status: int = 200,
    content_type: bytes = SSE,
    *,
    length: int | None = None,
    delimited_by_close: bool = False,
) -> bytes:
    """A response head, chunked unless ``length`` is given or the body is ``delimited_by_close``
    (no framing at all: the body ends when the connection does, as in HTTP/1.0). Header names in
    Title-Case, as llama.cpp's server and Ollama write them."""
    if delimited_by_close:
        framing = b""
    elif length is None:
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        framing = b"Content-Length: %d\r\n" % length
    return b"HTTP/1.1 %d X\r\nContent-Type: %s\r\n%sConnection: close\r\n\r\n" % (
        status,
        content_type,
        framing,
    )


def chunked(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def sse_body(payload: dict[str, object]) -> bytes:
    """The whole SSE answer the fake model gives to ``payload``, LF-framed."""
    return b"".join(event + b"\n\n" for event in stream_events(payload))


async def answer(stream: trio.SocketStream, request: SeenRequest) -> None:
    """A whole, correct answer: an SSE stream (chunked) or a JSON completion; a 400 for a body
    that is not a JSON object, as OpenAI-compatible servers answer."""
    try:
        payload = json.loads(request.body) if request.body else {}
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        body = json.dumps({"error": {"message": "body must be an object"}}).encode()
        await stream.send_all(response_head(400, JSON, length=len(body)) + body)
    elif payload.get("stream"):
        await stream.send_all(response_head() + chunked(sse_body(payload)) + LAST_CHUNK)
    else:
        body = json.dumps(completion_answer(payload)).encode()
        await stream.send_all(response_head(200, JSON, length=len(body)) + body)


async def no_faults_here(stream: trio.SocketStream, request: SeenRequest) -> None:
    """The script of an upstream whose tests never send ``x-fault``."""
    raise AssertionError(f"unexpected x-fault on {request.target}")


def reset(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER on, timeout 0)."""
    Peer(stream).reset_on_close()
