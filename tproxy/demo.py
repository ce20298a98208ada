"""``tproxy demo``: the point of tproxy in one command, with no model server at hand.

It starts a small OpenAI-compatible demo model on a loopback port (deterministic, paced like a
real model: a pause before the first token, then one token every ``token_delay`` seconds), starts
tproxy in front of it in the same process (:func:`~tproxy.server.serve_tproxy`, free loopback
ports, the store in a temporary directory unless one is given), and sends the same streamed chat
request twice. Tokens are printed as they arrive; then the time to the first token, the total time
and the ``Cache-Status`` of each answer, and where the store lives.

The client is raw h11 on a Trio socket with the SSE decoder of :mod:`tproxy.core.sse`: it sees
the bytes exactly as any client would, and measures from the moment the request is written.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import h11
import trio

from tproxy.config import Overrides, Settings, load_settings
from tproxy.core.errors import TproxyError
from tproxy.core.sse import SSEDecoder
from tproxy.server import Listening, serve_tproxy

MODEL = "tproxy-demo"
TOKEN_DELAY = 0.03
FIRST_TOKEN_DELAY = 0.25
REPLY = (
    "tproxy passes every token on the moment the model sends it, and keeps the whole answer once"
    " the stream has ended cleanly. Ask the same question again and the answer comes back from"
    " the cache at once, byte for byte, without spending a single token on the model."
)
PROMPT = "Why put a caching proxy in front of a language model?"
_WIDTH = 76
_MAX_BODY_BYTES = 1 << 20


class DemoFailed(TproxyError):
    """A demo request did not get a whole streamed answer."""


def reply_tokens() -> list[str]:
    """The demo model's answer, one token per word (with its leading space, as models do)."""
    words = REPLY.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


@dataclass
class DemoModel:
    """A deterministic OpenAI-compatible chat model on 127.0.0.1; serve it in a nursery."""

    token_delay: float = TOKEN_DELAY
    first_token_delay: float = FIRST_TOKEN_DELAY
    port: int = 0
    requests: int = 0

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
        async with stream:
            try:
                while True:
                    request = await _read_request(stream, connection)
                    if request is None:
                        return
                    head, body = request
                    await self._answer(stream, connection, head, body)
                    if connection.our_state is not h11.DONE:
                        return
                    connection.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                return

    async def _answer(
        self, stream: trio.SocketStream, connection: h11.Connection, head: h11.Request, body: bytes
    ) -> None:
        async def send(event: h11.Event) -> None:
            data = connection.send(event)
            if data:
                await stream.send_all(data)

        self.requests += 1
        path = head.target.decode("latin-1").split("?")[0]
        if head.method == b"GET" and path == "/v1/models":
            document: dict[str, Any] = {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tproxy"}],
            }
            await _send_json(send, 200, document)
            return
        if head.method != b"POST" or path != "/v1/chat/completions":
            message = "the demo model answers POST /v1/chat/completions and GET /v1/models"
            await _send_json(send, 404, {"error": {"message": message, "type": "not_found"}})
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            error = {"message": "the body must be a JSON object", "type": "invalid_request_error"}
            await _send_json(send, 400, {"error": error})
            return
        model = str(request.get("model", MODEL))
        if not request.get("stream"):
            await _send_json(send, 200, _completion(model))
            return
        await send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
        await trio.sleep(self.first_token_delay)
        tokens = reply_tokens()
        for index, token in enumerate(tokens):
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            await send(h11.Data(data=_event(_chunk(model, delta, None))))
            await trio.sleep(self.token_delay)
        usage = {"prompt_tokens": 12, "completion_tokens": len(tokens)}
        final = {**_chunk(model, {}, "stop"), "usage": {**usage, "total_tokens": 12 + len(tokens)}}
        await send(h11.Data(data=_event(final) + b"data: [DONE]\n\n"))
        await send(h11.EndOfMessage())


def _chunk(model: str, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _completion(model: str) -> dict[str, Any]:
    tokens = len(reply_tokens())
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
    }


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


async def _send_json(
    send: Callable[[h11.Event], Any], status: int, document: dict[str, Any]
) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send(h11.Response(status_code=status, headers=headers))
    await send(h11.Data(data=body))
    await send(h11.EndOfMessage())


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """One whole request (head and body), or None when the client closed the connection."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_BODY_BYTES:
                raise h11.LocalProtocolError("request body too large for the demo model")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


@dataclass(frozen=True, slots=True)
class Answer:
    """One streamed answer as the demo client saw it; times in seconds from the request."""

    cache_status: str
    first_token: float
    total: float
    text: str
    tokens: int


def chat_request(port: int) -> tuple[h11.Request, bytes]:
    """The demo's streamed chat request to tproxy on 127.0.0.1:``port``."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "temperature": 0,
        }
    ).encode()
    head = h11.Request(
        method="POST",
        target="/v1/chat/completions",
        headers=[
            ("host", f"127.0.0.1:{port}"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ],
    )
    return head, body


async def stream_chat(port: int, on_token: Callable[[str], None]) -> Answer:
    """Send the demo request to 127.0.0.1:``port`` and read the streamed answer.

    ``on_token`` gets each token as it arrives. Raises :class:`DemoFailed` unless the answer is
    a 200 event stream that ends with ``data: [DONE]``.
    """
    head, body = chat_request(port)
    connection = h11.Connection(h11.CLIENT)
    decoder = SSEDecoder()
    tokens: list[str] = []
    first_token: float | None = None
    cache_status = "(none)"
    done = False
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as error:
        raise DemoFailed(f"cannot connect to tproxy on port {port}: {error}") from error
    async with stream:
        started = time.perf_counter()
        await stream.send_all(_encode(connection, head, h11.Data(data=body), h11.EndOfMessage()))
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as error:
                raise DemoFailed(f"the answer broke off: {error}") from error
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                headers = {name.decode(): value.decode("latin-1") for name, value in event.headers}
                cache_status = headers.get("cache-status", cache_status)
                if event.status_code != 200:
                    raise DemoFailed(f"tproxy answered {event.status_code} ({cache_status})")
            elif isinstance(event, h11.Data):
                for frame in decoder.feed(event.data):
                    if frame.event is None:
                        continue
                    if frame.event.data == "[DONE]":
                        done = True
                        continue
                    token = _token_of(frame.event.data)
                    if token:
                        if first_token is None:
                            first_token = time.perf_counter() - started
                        tokens.append(token)
                        on_token(token)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    total = time.perf_counter() - started
    if not done or first_token is None:
        raise DemoFailed("the answer ended before data: [DONE]")
    return Answer(cache_status, first_token, total, "".join(tokens), len(tokens))


def _encode(connection: h11.Connection, *events: h11.Event) -> bytes:
    return b"".join(connection.send(event) or b"" for event in events)


def _token_of(data: str) -> str:
    try:
        chunk = json.loads(data)
        content = chunk["choices"][0]["delta"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


class _Printer:
    """Prints tokens as they arrive, wrapped under a gutter, so the stream is visible live."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._column = 0

    def start(self) -> None:
        self._out.write("  │ ")
        self._column = 4

    def token(self, token: str) -> None:
        if self._column + len(token) > _WIDTH and self._column > 4:
            self._out.write("\n  │ ")
            self._column = 4
            token = token.lstrip()
        self._out.write(token)
        self._column += len(token)
        self._out.flush()

    def end(self) -> None:
        self._out.write("\n")


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _demo_settings(model_url: str, cache_dir: Path) -> Settings:
    return load_settings(
        None,
        Overrides(
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            upstream=model_url,
            cache_dir=cache_dir,
        ),
    )


async def run_demo(
    out: TextIO,
    cache_dir: Path,
    *,
    temporary: bool,
    token_delay: float = TOKEN_DELAY,
    first_token_delay: float = FIRST_TOKEN_DELAY,
) -> bool:
    """Run the demo, writing to ``out``; True when the repeat was answered from the cache.

    Raises :class:`DemoFailed` when an answer did not arrive whole, and whatever
    :func:`serve_tproxy` raises when the store cannot be opened.
    """
    model = DemoModel(token_delay=token_delay, first_token_delay=first_token_delay)
    stop = trio.Event()
    async with trio.open_nursery() as model_nursery:
        await model_nursery.start(model.serve)
        async with trio.open_nursery() as proxy_nursery:
            listening: Listening = await proxy_nursery.start(
                serve_tproxy, _demo_settings(model.url, cache_dir), stop
            )
            _introduce(out, model, listening.proxy[0], cache_dir, temporary=temporary)
            answers = [await _ask(out, number, listening) for number in (1, 2)]
            stop.set()  # tproxy drains and closes its store; then the model can go
        model_nursery.cancel_scope.cancel()
    return _summarize(out, answers, model.requests, cache_dir)


def _introduce(
    out: TextIO, model: DemoModel, proxy_url: str, cache_dir: Path, *, temporary: bool
) -> None:
    kept = (
        "temporary: removed when the demo ends; keep one with --cache-dir DIR"
        if temporary
        else f"kept: tproxy cache ls --cache-dir {cache_dir}"
    )
    out.write(
        "tproxy demo: a paced demo model, tproxy in front of it, the same request twice\n\n"
        f"  demo model   {model.url}  (deterministic, {_seconds(model.first_token_delay)} to the"
        f" first token, then {_seconds(model.token_delay)} per token)\n"
        f"  tproxy       {proxy_url}/v1\n"
        f"  cache store  {cache_dir}\n"
        f"               ({kept})\n"
    )


async def _ask(out: TextIO, number: int, listening: Listening) -> Answer:
    """Send the demo request once, printing tokens as they come; wait until it is stored."""
    title = "POST /v1/chat/completions, streamed" if number == 1 else "the same request again"
    out.write(f"\nRequest {number} of 2: {title}\n")
    printer = _Printer(out)
    printer.start()
    answer = await stream_chat(int(listening.proxy[0].rsplit(":", 1)[1]), printer.token)
    printer.end()
    out.write(
        f"  Cache-Status: {answer.cache_status}\n"
        f"  first token after {_seconds(answer.first_token)},"
        f" whole answer after {_seconds(answer.total)} ({answer.tokens} tokens)\n"
    )
    await listening.inflight.wait_idle()
    if listening.store_writer is not None:
        await listening.store_writer.flush()
    return answer


def _summarize(out: TextIO, answers: list[Answer], model_requests: int, cache_dir: Path) -> bool:
    """Say what the two answers show; False when the repeat was not a cache hit (a bug)."""
    first, second = answers
    if not _is_hit(second):
        out.write(
            f"\nThe repeat was not answered from the cache (Cache-Status: {second.cache_status})."
            " That is a bug: please report it with this output.\n"
        )
        return False
    if _is_hit(first):
        out.write(
            f"\nBoth answers came from the store in {cache_dir}, filled by an earlier run. To see"
            f" a miss again: tproxy cache purge --all --cache-dir {cache_dir}\n"
        )
        return True
    same = "the same text" if first.text == second.text else "a different text (a bug)"
    speedup = first.first_token / max(second.first_token, 1e-6)
    asked = "once" if model_requests == 1 else f"{model_requests} times"
    out.write(
        f"\nThe model was asked {asked} for two answers. The repeat came from the cache with"
        f" {same};\nits first token arrived {speedup:.0f}x sooner, and it cost the model nothing.\n"
        "\nNext, in front of your own model server:\n"
        "  tproxy serve --upstream http://127.0.0.1:8000\n"
        "and point your clients at http://127.0.0.1:8080/v1\n"
    )
    return True


def _is_hit(answer: Answer) -> bool:
    return "; hit" in answer.cache_status


def demo(
    out: TextIO,
    cache_dir: Path | None,
    *,
    token_delay: float = TOKEN_DELAY,
    first_token_delay: float = FIRST_TOKEN_DELAY,
) -> bool:
    """Run the demo to completion (the ``tproxy demo`` command); see :func:`run_demo`."""
    delays = {"token_delay": token_delay, "first_token_delay": first_token_delay}
    if cache_dir is not None:
        return trio.run(partial(run_demo, out, cache_dir, temporary=False, **delays))
    with tempfile.TemporaryDirectory(prefix="tproxy-demo-") as directory:
        store = Path(directory) / "store"
        return trio.run(partial(run_demo, out, store, temporary=True, **delays))
