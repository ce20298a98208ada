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

import trio
from trio_util import AsyncValue

from tests.h11peer import Peer, cased, serve_connection, serve_on_loopback
from tests.h11peer import SeenRequest as SeenRequest  # what FakeUpstream.requests holds

FRAMINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}

HEADER_CASES = ("title", "mixed", "lower")

SERVER_NAME = b"fake-upstream"


def answer_headers(case: str, headers: dict[str, bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` and the ``Date`` and ``Server`` real servers add, names written in ``case``."""
    every = {**headers, "date": formatdate(usegmt=True).encode(), "server": SERVER_NAME}
    return [(cased(name, case), value) for name, value in every.items()]


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
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_on_loopback, self._connection)
            task_status.started()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        await serve_connection(self._received, stream)

    async def _received(self, peer: Peer, request: SeenRequest) -> None:
        self.requests.append(request)
        self.calls[request.target] += 1
        await self._answer(peer, request)

    async def _answer(self, peer: Peer, request: SeenRequest) -> None:
        knobs = request.headers
        if "x-fake-stall-headers" in knobs:
            await self._wait_for_close(peer)
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
            await peer.send_head(status, _json_headers(body, case))
            await peer.send_data(body)
            await peer.send_end()
            return
        if request.path.endswith("/embeddings"):
            body = json.dumps(embedding_answer(payload)).encode()
        elif payload.get("stream"):
            await self._stream(peer, request, payload, case)
            return
        else:
            body = json.dumps(completion_answer(payload)).encode()
        await peer.send_head(200, _json_headers(body, case, _cache_control(knobs)))
        await peer.send_data(body)
        await peer.send_end()

    async def _stream(
        self, peer: Peer, request: SeenRequest, payload: dict[str, object], case: str
    ) -> None:
        knobs = request.headers
        eol = FRAMINGS[knobs.get("x-fake-framing", "lf")]
        delay = float(knobs.get("x-fake-delay", "0"))
        break_after = int(knobs.get("x-fake-break-after", "-1"))
        stall_after = int(knobs.get("x-fake-stall-after", "-1"))
        events = stream_events(payload, done="x-fake-no-done" not in knobs)
        if "x-fake-error-event" in knobs:
            events[-1] = b"event: error\ndata: " + json.dumps({"error": "boom"}).encode()
        content_type = {"content-type": b"text/event-stream; charset=utf-8"}
        await peer.send_head(200, answer_headers(case, {**content_type, **_cache_control(knobs)}))
        self.active_streams += 1
        try:
            for index, event in enumerate(events):
                if index == break_after:
                    await peer.stream.aclose()
                    return
                if index == stall_after:
                    await self._wait_for_close(peer)
                    return
                framed = event.replace(b"\n", eol) + eol + eol
                if "x-fake-byte-chunks" in knobs:
                    for byte in framed:
                        await peer.send_data(bytes([byte]))
                else:
                    await peer.send_data(framed)
                if delay:
                    with trio.move_on_after(delay):
                        await self._wait_for_close(peer)
                        return
            await peer.send_end()
            self.streams_completed.value += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._note_disconnect()  # the peer left while we were writing to it
            raise
        finally:
            self.active_streams -= 1

    async def _wait_for_close(self, peer: Peer) -> None:
        """Park until the peer closes the connection; record that it did."""
        if await peer.wait_for_close():
            self._note_disconnect()

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()


def _json_headers(
    body: bytes, case: str, extra: dict[str, bytes] | None = None
) -> list[tuple[bytes, bytes]]:
    return answer_headers(
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
