"""A fake OpenAI-compatible upstream that speaks real HTTP/1.1 (h11) on a real socket.

Answers are derived from the request, so every request can be checked against what it asked for:
a chat answer repeats the words of the last message, one SSE event per word. Tests steer faults
and framing with request headers, which the proxy forwards:

- ``x-fake-framing``: ``lf`` (default, llama.cpp/vLLM), ``crlf`` (sse-starlette), ``cr``
- ``x-fake-delay``: seconds between events (a paced stream)
- ``x-fake-break-after``: close the connection after this many events, mid-body
- ``x-fake-stall-after``: stop sending (but keep the connection open) after this many events
- ``x-fake-stall-headers``: never send the response headers
- ``x-fake-hang-up``: close the connection without answering
- ``x-fake-status``: answer with this status and a JSON error
- ``x-fake-no-done``: end the stream after the finish_reason chunk, without ``data: [DONE]``
- ``x-fake-error-event``: send an ``event: error`` instead of the last chunk
- ``x-fake-byte-chunks``: write the stream one byte per socket write
- ``x-fake-header-case``: ``title`` (the default, see below), ``mixed`` or ``lower``

Header names are written the way real servers write them: llama.cpp's server (cpp-httplib) and
Ollama (Go's net/http) write Title-Case (``Content-Type: text/event-stream``) and send their own
``Date`` and ``Server``. ``header_case`` changes that for every answer; ``mixed``
(``cOnTeNt-TyPe``) is a peer no test should be kinder to than to the others. h11 writes the
``Transfer-Encoding`` it adds in Title-Case whatever the choice.
- ``x-fake-cache-control``: send this ``Cache-Control`` with a 200 answer, as servers write it
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate

import h11
import trio
from trio_util import AsyncValue

FRAMINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}

HEADER_CASES = ("title", "mixed", "lower")

SERVER_NAME = b"fake-upstream"


def cased(name: str, case: str) -> bytes:
    """A header name written in ``case``: ``title``, ``mixed`` or ``lower``."""
    if case == "title":
        written = "-".join(part.capitalize() for part in name.split("-"))
    elif case == "mixed":
        written = "".join(c.lower() if i % 2 else c.upper() for i, c in enumerate(name))
    else:
        written = name.lower()
    return written.encode("ascii")


def answer_head(status: int, case: str, headers: dict[str, bytes]) -> h11.Response:
    """A response head with ``headers`` and the ``Date`` and ``Server`` real servers add."""
    every = {**headers, "date": formatdate(usegmt=True).encode(), "server": SERVER_NAME}
    return h11.Response(
        status_code=status, headers=[(cased(name, case), value) for name, value in every.items()]
    )


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    """Serve with :meth:`serve` in a nursery; read what it saw from its attributes."""

    port: int = 0
    header_case: str = "title"
    requests: list[SeenRequest] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    disconnected: trio.Event = field(default_factory=trio.Event)
    active_streams: int = 0
    streams_completed: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(stream, connection)
                if request is None:
                    return
                await self._answer(stream, connection, request)
                if connection.our_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read_request(
        self, stream: trio.SocketStream, connection: h11.Connection
    ) -> SeenRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                connection.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {n.decode().lower(): v.decode("latin-1") for n, v in head.headers}
                seen = SeenRequest(head.method.decode(), head.target.decode(), headers, bytes(body))
                self.requests.append(seen)
                self.calls[seen.target] += 1
                return seen
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(
        self, stream: trio.SocketStream, connection: h11.Connection, request: SeenRequest
    ) -> None:
        async def send(event: h11.Event) -> None:
            data = connection.send(event)
            if data:
                await stream.send_all(data)

        knobs = request.headers
        if "x-fake-stall-headers" in knobs:
            await self._wait_for_close(stream)
            return
        if "x-fake-hang-up" in knobs:
            return  # the connection is closed with our side of the exchange unfinished
        case = knobs.get("x-fake-header-case", self.header_case)
        status = int(knobs.get("x-fake-status", "200"))
        try:
            payload = json.loads(request.body) if request.body else {}
        except ValueError:
            payload = {}
        if status != 200:
            body = json.dumps({"error": {"message": "fake failure", "code": status}}).encode()
            await send(_json_head(status, body, case))
            await send(h11.Data(data=body))
            await send(h11.EndOfMessage())
            return
        path = request.target.split("?")[0]
        if path.endswith("/embeddings"):
            body = json.dumps(embedding_answer(payload)).encode()
        elif payload.get("stream"):
            await self._stream(stream, send, request, payload, case)
            return
        else:
            body = json.dumps(completion_answer(payload)).encode()
        await send(_json_head(200, body, case, _cache_control(knobs)))
        await send(h11.Data(data=body))
        await send(h11.EndOfMessage())

    async def _stream(self, stream, send, request: SeenRequest, payload: dict, case: str) -> None:  # type: ignore[no-untyped-def,type-arg]
        knobs = request.headers
        eol = FRAMINGS[knobs.get("x-fake-framing", "lf")]
        delay = float(knobs.get("x-fake-delay", "0"))
        break_after = int(knobs.get("x-fake-break-after", "-1"))
        stall_after = int(knobs.get("x-fake-stall-after", "-1"))
        events = stream_events(payload, done="x-fake-no-done" not in knobs)
        if "x-fake-error-event" in knobs:
            events[-1] = b"event: error\ndata: " + json.dumps({"error": "boom"}).encode()
        content_type = {"content-type": b"text/event-stream; charset=utf-8"}
        await send(answer_head(200, case, {**content_type, **_cache_control(knobs)}))
        self.active_streams += 1
        try:
            for index, event in enumerate(events):
                if index == break_after:
                    await stream.send_all(b"")
                    await stream.aclose()
                    return
                if index == stall_after:
                    await self._wait_for_close(stream)
                    return
                framed = event.replace(b"\n", eol) + eol + eol
                if "x-fake-byte-chunks" in knobs:
                    for byte in framed:
                        await send(h11.Data(data=bytes([byte])))
                else:
                    await send(h11.Data(data=framed))
                if delay:
                    with trio.move_on_after(delay):
                        await self._wait_for_close(stream)
                        return
            await send(h11.EndOfMessage())
            self.streams_completed.value += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._note_disconnect()  # the peer left while we were writing to it
            raise
        finally:
            self.active_streams -= 1

    async def _wait_for_close(self, stream: trio.SocketStream) -> None:
        """Park until the peer closes the connection; record that it did."""
        while await stream.receive_some(65536):
            pass
        self._note_disconnect()

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()


def _json_head(
    status: int, body: bytes, case: str, extra: dict[str, bytes] | None = None
) -> h11.Response:
    return answer_head(
        status,
        case,
        {
            "content-type": b"application/json",
            "content-length": b"%d" % len(body),
            **(extra or {}),
        },
    )


def _cache_control(knobs: dict[str, str]) -> dict[str, bytes]:
    value = knobs.get("x-fake-cache-control")
    return {} if value is None else {"cache-control": value.encode("latin-1")}


def words_of(payload: dict) -> list[str]:  # type: ignore[type-arg]
    """The words the fake model answers with: those of the last message (or the prompt)."""
    if payload.get("messages"):
        text = str(payload["messages"][-1].get("content", ""))
    else:
        text = str(payload.get("prompt", ""))
    return text.split() or ["empty"]


def completion_answer(payload: dict) -> dict:  # type: ignore[type-arg]
    words = words_of(payload)
    text = " ".join(words)
    usage = {"prompt_tokens": len(words), "completion_tokens": len(words)}
    if "messages" in payload:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": payload.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {**usage, "total_tokens": 2 * len(words)},
        }
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": payload.get("model", "fake"),
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {**usage, "total_tokens": 2 * len(words)},
    }


def stream_events(payload: dict, *, done: bool = True) -> list[bytes]:  # type: ignore[type-arg]
    """The data of each SSE event of a streamed chat answer, unframed (``\\n`` inside)."""
    model = payload.get("model", "fake")
    events = []
    words = words_of(payload)
    for index, word in enumerate(words):
        delta = {"content": word if index == 0 else " " + word}
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        events.append(b"data: " + json.dumps(chunk).encode())
    final = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    events.append(b"data: " + json.dumps(final).encode())
    if done:
        events.append(b"data: [DONE]")
    return events


def embedding_vector(text: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:dimensions]]


def embedding_answer(payload: dict) -> dict:  # type: ignore[type-arg]
    inputs = payload.get("input", "")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(str(item))
        if payload.get("encoding_format") == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding: object = base64.b64encode(packed).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": payload.get("model", "fake-embed"),
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
    }
