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
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio
from trio_util import AsyncValue

from tests.fakeupstream import SeenRequest, completion_answer, stream_events

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
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            if self.connections <= self.silent:
                await self.wait_for_close(stream)
                return
            request = await read_request(stream)
            if request is None:
                return
            self.requests.append(request)
            self.received.value += 1
            if "x-fault" in request.headers:
                await self.script(stream, request)
            else:
                await answer(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def wait_for_close(self, stream: trio.SocketStream) -> None:
        """Park until the proxy closes (or resets) the connection; count that it did."""
        with trio.move_on_after(30):  # bounded: a proxy that never closes fails the test later
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            self.peer_closed += 1
            self.peer_closed_event.set()


async def read_request(stream: trio.SocketStream) -> SeenRequest | None:
    """One whole request, or None if the peer closed before sending one."""
    connection = h11.Connection(h11.SERVER)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and head is None:
                return None
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {n.decode().lower(): v.decode("latin-1") for n, v in head.headers}
            return SeenRequest(head.method.decode(), head.target.decode(), headers, bytes(body))
        else:
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
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
