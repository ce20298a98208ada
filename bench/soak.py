"""The bounded soak of issue 7: mixed requests with injected faults, every answer checked.

    .venv/bin/python bench/soak.py                                 # 100,000 requests or 8 min
    .venv/bin/python bench/soak.py --requests 5000 --seconds 60    # a smoke test

Starts, on free loopback ports, a fault-injecting upstream (this script with
``--serve-upstream PORT``: Trio + h11, one process) and ``tproxy serve`` (cache on, default
settings, but ``first_byte_timeout = 1``, ``idle_timeout = 1`` and ``client_stall_timeout = 5``),
then runs 64 closed-loop clients over raw Trio sockets until the request budget or the time
budget runs out.

The upstream's answers are a pure function of the request body (the prompt's words echoed back,
an embedding derived from the input's hash), so the driver computes the exact bytes each request
must get. A request may carry ``x-soak-fault``, which the upstream obeys: ``reset`` (RST after
half the answer), ``stall`` (half the answer, then silence past the idle timeout), ``status_500``,
``close_mid_event`` (FIN in the middle of an event or of the JSON body) and ``slow_start`` (0.3 s
before the head, under the first-byte timeout: the answer must still be whole). The cache key
ignores the header, so a faulted request may share a flight or a cache entry with clean ones:
that is part of the test. A client may also leave mid-stream (``client_disconnect``), or
attempt a CL+TE desync (``cl_te``: ``Content-Length`` and ``Transfer-Encoding: chunked`` on one
request, a second request hidden where the two framings disagree): the answer must be a 400 that
closes the connection, and the hidden request (``/v1/smuggled``) must never reach the upstream.

Beside the 64 clients, ``H2_STOPPERS`` HTTP/2 clients (prior knowledge) in a loop open a few
streams whose answers exceed the flow-control window, never send WINDOW_UPDATE, then either
close the connection at once or keep it until tproxy resets the stalled streams
(``client_stall_timeout = 5`` here). What they did receive must be a prefix of the answer.

The verdict on every answer: a 200 whose framing completed must be byte for byte the expected
body; a body cut short must be a prefix of it; anything else is a *wrong answer*. Errors
(statuses, truncations, timeouts) are counted by kind and by the fault the request asked for.
Leaks: open file descriptors and RSS of the tproxy process (``/proc``) and its in-flight
exchanges (``/metrics``) before, during and after the load. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx2
import trio
from prometheus_client.parser import text_string_to_metric_families
from upstream import MAX_BODY_BYTES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the fakes' HTTP/1.1 peer (tests/h11peer.py)

from tests.h11peer import Peer, SeenRequest, connection_handler  # noqa: E402

LEVEL = re.compile(r'"level":\s*"(\w+)"')
CLIENTS = 64
UPSTREAM_FAULTS = ("reset", "stall", "status_500", "close_mid_event", "slow_start")
FAULT_HEADER = b"x-soak-fault"
STALL_SECONDS = 3.0  # past tproxy's idle_timeout = 1
CLIENT_STALL_SECONDS = 5.0  # tproxy's client_stall_timeout: a stalled HTTP/2 stream is reset
SMUGGLED = b"/v1/smuggled"  # the target of the request hidden behind a CL+TE one
H2_STOPPERS = 4  # HTTP/2 clients that stop reading, each in a loop
H2_STREAMS = 3  # streams per HTTP/2 connection, each answer larger than the 64 KiB window
H2_PROMPT_WORDS = 6000  # about 40 KB of answer per stream
SLOW_START_SECONDS = 0.3  # under tproxy's first_byte_timeout = 1
REQUEST_DEADLINE = 15.0  # a client gives up on one answer after this long
POOL_PROMPTS = 200  # repeated prompts: mostly cache hits
HOT_PROMPTS = 6  # per window of HOT_WINDOW requests: fresh, so they collapse, then hit
HOT_WINDOW = 400
WORDS = (
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"),
    *("juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"),
    *("sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"),
)


# --- the answers: a pure function of the request body, shared by the upstream and the checker


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def answer_parts(path: bytes, body: bytes) -> tuple[bytes, list[bytes]]:
    """Content type and the writes of the upstream's answer to this request.

    A stream is one write per event; a JSON answer is one write. The client's expected body is
    the writes joined.
    """
    document = json.loads(body)
    if path == b"/v1/embeddings":
        text = document["input"]
        digest = hashlib.sha256(text.encode()).digest()
        answer = {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": 0,
                    "embedding": [round((byte - 128) / 128, 6) for byte in digest[:16]],
                }
            ],
            "model": document["model"],
            "usage": {"prompt_tokens": len(text.split()), "total_tokens": len(text.split())},
        }
        return b"application/json", [_dumps(answer)]
    prompt = document["messages"][-1]["content"]
    words = prompt.split()
    ident = "chatcmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:20]
    head = {"id": ident, "created": 1700000000, "model": document["model"]}
    if not document.get("stream"):
        answer = {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "echo: " + " ".join(words)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": len(words), "completion_tokens": len(words) + 1},
        }
        return b"application/json", [_dumps(answer)]
    pieces = ["echo:", *(" " + word for word in words)]
    events = [
        b"data: "
        + _dumps(
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
        )
        + b"\n\n"
        for piece in pieces
    ]
    last = {
        **head,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    events += [b"data: " + _dumps(last) + b"\n\n", b"data: [DONE]\n\n"]
    return b"text/event-stream", events


# --- the fault-injecting upstream (its own process)


@dataclass(slots=True)
class UpstreamStats:
    """What the upstream did, served at ``GET /soak/stats`` (one process, one event loop)."""

    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)


def _head(content_type: bytes, length: int | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return headers


async def _answer(stats: UpstreamStats, peer: Peer, request: SeenRequest) -> None:
    """Answer one request; a fault leaves the answer unfinished, so the connection closes."""
    if request.target == "/soak/stats":
        data = _dumps({"requests": stats.requests, "faults": stats.faults})
        await peer.respond(200, _head(b"application/json", len(data)), data)
        return
    fault = request.headers.get(FAULT_HEADER.decode(), "")
    stats.requests[request.target] += 1
    if fault:
        stats.faults[fault] += 1
    if fault == "status_500":
        data = _dumps({"error": {"message": "injected", "type": "server_error"}})
        await peer.respond(500, _head(b"application/json", len(data)), data)
        return
    if fault == "slow_start":
        await trio.sleep(SLOW_START_SECONDS)
    content_type, parts = answer_parts(request.target.encode(), request.body)
    streamed = content_type == b"text/event-stream"
    if not streamed and fault in ("reset", "stall", "close_mid_event"):
        whole = parts[0]
        parts = [whole[: len(whole) // 2], whole[len(whole) // 2 :]]
    await peer.send_head(200, _head(content_type, None if streamed else sum(map(len, parts))))
    if fault in ("reset", "stall", "close_mid_event"):
        for part in parts[: max(1, len(parts) // 2)]:
            await peer.send_data(part)
        if fault == "stall":
            await trio.sleep(STALL_SECONDS)
        elif fault == "reset":
            peer.reset_on_close()
        elif streamed:
            middle = parts[len(parts) // 2]
            await peer.send_data(middle[: len(middle) // 2])
        return
    for part in parts:
        await peer.send_data(part)
    await peer.send_end()


def serve_upstream(port: int) -> None:
    """Run the fault-injecting upstream on 127.0.0.1:PORT until killed."""
    handler = connection_handler(partial(_answer, UpstreamStats()), max_body=MAX_BODY_BYTES)
    trio.run(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))


# --- the client: raw sockets, a minimal HTTP/1.1 reader


class Outcome(Enum):
    """What became of one request, from the client's side."""

    WHOLE = "whole"  # 200, framing complete, body identical to the expected one
    STATUS = "status"  # a non-200 status with a complete body
    TRUNCATED = "truncated"  # the body stopped before its framing said it ended
    LEFT = "left"  # the client left mid-stream on purpose
    TIMEOUT = "timeout"  # no complete answer within REQUEST_DEADLINE
    REFUSED = "refused"  # the connection failed before any answer
    WRONG = "wrong"  # a clean answer that is not the expected one, or a cut non-prefix


class _ClosedError(Exception):
    """The proxy closed the connection (or reset it) before the answer was complete."""


class _Reader:
    """Buffered reads of one HTTP/1.1 response from a socket stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError as error:
            raise _ClosedError from error
        if not data:
            raise _ClosedError
        self.buffer += data

    async def until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    async def exactly(self, size: int, into: bytearray) -> None:
        while len(self.buffer) < size:
            if self.buffer:
                into += self.buffer
                size -= len(self.buffer)
                self.buffer.clear()
            await self._fill()
        into += self.buffer[:size]
        del self.buffer[:size]


@dataclass(frozen=True, slots=True)
class Spec:
    """One request: what to send and what must come back."""

    path: bytes
    body: bytes
    expected: bytes
    streamed: bool
    fault: str  # "" for a clean request


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    status: int | None
    cache: str  # the first parameter of Cache-Status: hit, fwd=miss, collapsed...
    keep: bool  # the connection can carry the next request


def _cache_status(headers: dict[bytes, bytes]) -> str:
    value = headers.get(b"cache-status", b"").decode()
    parts = [part.strip() for part in value.split(";")]
    if len(parts) < 2:
        return "none"
    return "collapsed" if "collapsed" in value else parts[1]


async def exchange(stream: trio.SocketStream, reader: _Reader, spec: Spec, port: int) -> Result:
    """Send one request on a kept-alive connection and judge its answer."""
    head = [
        b"POST %s HTTP/1.1" % spec.path,
        b"Host: 127.0.0.1:%d" % port,
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(spec.body),
    ]
    if spec.fault == "cl_te":
        return await _desync_attempt(stream, reader, head, port)
    if spec.fault and spec.fault != "client_disconnect":
        head.append(FAULT_HEADER + b": " + spec.fault.encode())
    await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n" + spec.body)
    body = bytearray()
    status: int | None = None
    cache = "none"
    try:
        lines = (await reader.until(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        cache = _cache_status(headers)
        keep = headers.get(b"connection", b"").lower() != b"close"
        if spec.fault == "client_disconnect":
            if headers.get(b"transfer-encoding") == b"chunked":
                await reader.until(b"\r\n")  # the first chunk's size line: the stream has begun
            return Result(Outcome.LEFT, status, cache, keep=False)
        if b"content-length" in headers:
            await reader.exactly(int(headers[b"content-length"]), body)
        elif headers.get(b"transfer-encoding") == b"chunked":
            while size := int((await reader.until(b"\r\n")).split(b";")[0], 16):
                await reader.exactly(size, body)
                await reader.until(b"\r\n")
            await reader.until(b"\r\n")  # the empty trailer section
        else:
            keep = False
            while True:  # delimited by the close: a cut cannot be told from an end
                try:
                    await reader._fill()
                except _ClosedError:
                    break
                body += reader.buffer
                reader.buffer.clear()
    except _ClosedError:
        if status == 200 and not spec.expected.startswith(body):
            return Result(Outcome.WRONG, status, cache, keep=False)
        return Result(Outcome.TRUNCATED, status, cache, keep=False)
    if status != 200:
        return Result(Outcome.STATUS, status, cache, keep)
    outcome = Outcome.WHOLE if bytes(body) == spec.expected else Outcome.WRONG
    return Result(outcome, status, cache, keep)


async def _desync_attempt(
    stream: trio.SocketStream, reader: _Reader, head: list[bytes], port: int
) -> Result:
    """Content-Length and chunked on one request, a request hidden where they disagree: a 400
    that closes the connection is right; anything else (and the hidden request upstream) is
    wrong."""
    hidden = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\n\r\n{}" % (
        SMUGGLED,
        port,
    )
    body = b"0\r\n\r\n" + hidden
    head = [*head[:-1], b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n" + body)
    status: int | None = None
    try:
        lines = (await reader.until(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
        await reader.exactly(int(headers.get(b"content-length", b"0")), bytearray())
        await reader._fill()  # the connection must end here
    except _ClosedError:
        right = status == 400 and headers.get(b"connection") == b"close"
        return Result(Outcome.STATUS if right else Outcome.WRONG, status, "none", keep=False)
    return Result(Outcome.WRONG, status, "none", keep=False)


@dataclass(slots=True)
class Tally:
    """The driver's counts, shared by the 64 client tasks of one event loop."""

    limit: int
    deadline: float
    nonce: str
    started: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # outcome/status by fault asked
    kinds: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def claim(self) -> int | None:
        if self.started >= self.limit or time.monotonic() >= self.deadline:
            return None
        self.started += 1
        return self.started - 1


def make_spec(index: int, rng: random.Random, nonce: str) -> tuple[str, Spec]:
    """Draw one request of the mix: its kind, its prompt and its fault."""
    kind = rng.choices(("chat_stream", "chat_json", "embeddings"), weights=(45, 25, 30))[0]
    draw = rng.random()
    if draw < 0.2:  # hot: a handful of fresh prompts per window, asked at once: they collapse
        seed = f"hot {index // HOT_WINDOW} {rng.randrange(HOT_PROMPTS)}"
    elif draw < 0.6:  # the pool: asked again and again, mostly cache hits
        seed = f"pool {rng.randrange(POOL_PROMPTS)}"
    else:
        seed = f"distinct {index}"
    words = random.Random(seed).choices(WORDS, k=4 + len(seed) % 13)
    prompt = f"{nonce} {seed} " + " ".join(words)
    draw = rng.random()
    fault = ""
    if draw < 0.10:
        fault = UPSTREAM_FAULTS[rng.randrange(len(UPSTREAM_FAULTS))]
    elif draw < 0.13 and kind == "chat_stream":
        fault = "client_disconnect"
    elif draw < 0.14:
        fault = "cl_te"
    document: dict[str, object]
    if kind == "embeddings":
        path, document = b"/v1/embeddings", {"model": "soak-embed", "input": prompt}
    else:
        path = b"/v1/chat/completions"
        document = {
            "model": "soak",
            "messages": [{"role": "user", "content": prompt}],
            "stream": kind == "chat_stream",
        }
    body = _dumps(document)
    expected = b"".join(answer_parts(path, body)[1])
    return kind, Spec(path, body, expected, kind == "chat_stream", fault)


async def client(port: int, tally: Tally, seed: int) -> None:
    """One closed-loop client: a kept-alive connection, reopened whenever it breaks."""
    rng = random.Random(seed)
    stream: trio.SocketStream | None = None
    reader: _Reader | None = None
    try:
        while (index := tally.claim()) is not None:
            kind, spec = make_spec(index, rng, tally.nonce)
            tally.kinds[kind] += 1
            tally.faults[spec.fault or "none"] += 1
            try:
                with trio.fail_after(REQUEST_DEADLINE):
                    if stream is None or reader is None:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                        reader = _Reader(stream)
                    result = await exchange(stream, reader, spec, port)
            except trio.TooSlowError:
                result = Result(Outcome.TIMEOUT, None, "none", keep=False)
            except (OSError, trio.BrokenResourceError, _ClosedError, ValueError, IndexError):
                result = Result(Outcome.REFUSED, None, "none", keep=False)
            label = f"{spec.fault or 'none'} -> {result.outcome.value}"
            if result.outcome is Outcome.STATUS:
                label += f" {result.status}"
            if spec.fault or result.outcome is not Outcome.WHOLE:
                label += f" [{result.cache}]"
            tally.outcomes[label] += 1
            tally.cache[result.cache] += 1
            if result.outcome is Outcome.WRONG and len(tally.wrong) < 10:
                tally.wrong.append(f"{index} {kind} {spec.fault} {spec.body[:120]!r}")
            if not result.keep and stream is not None:
                await stream.aclose()
                stream = reader = None
    finally:
        if stream is not None:
            await stream.aclose()


# --- HTTP/2 clients that stop reading


async def h2_stopper(port: int, tally: Tally, number: int) -> None:
    """Rounds of HTTP/2 connections whose client stops reading, while the load runs."""
    rounds = 0
    while time.monotonic() < tally.deadline and tally.started < tally.limit:
        rounds += 1
        try:
            with trio.fail_after(CLIENT_STALL_SECONDS * 4):
                label = await _h2_round(port, f"{tally.nonce} h2 {number} {rounds % 7}", rounds % 2)
        except trio.TooSlowError:
            label = "timeout"
        except (OSError, trio.BrokenResourceError, h2.exceptions.ProtocolError):
            label = "refused"
        tally.outcomes[f"h2_stop_reading -> {label}"] += 1


async def _h2_round(port: int, seed: str, hold: int) -> str:
    """Open H2_STREAMS streams, read until the window is shut, then close (or hold until tproxy
    resets the stalled streams). Each stream's bytes must be a prefix of its answer."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    expected: dict[int, bytes] = {}
    received: dict[int, bytearray] = {}
    ended: set[int] = set()
    reset: set[int] = set()

    def take(data: bytes) -> None:
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received[event.stream_id] += event.data
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                reset.add(event.stream_id)

    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(connection.data_to_send())
        for index in range(H2_STREAMS):
            stream_id = 1 + 2 * index
            words = random.Random(f"{seed} {index}").choices(WORDS, k=H2_PROMPT_WORDS)
            document = {"model": "soak", "messages": [{"role": "user", "content": " ".join(words)}]}
            body = _dumps(document)
            expected[stream_id] = b"".join(answer_parts(b"/v1/chat/completions", body)[1])
            received[stream_id] = bytearray()
            connection.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":authority", f"127.0.0.1:{port}"),
                    (":path", "/v1/chat/completions"),
                    ("content-type", "application/json"),
                ],
            )
            while body:
                window = min(
                    connection.local_flow_control_window(stream_id),
                    connection.max_outbound_frame_size,
                )
                if window:
                    piece, body = body[:window], body[window:]
                    connection.send_data(stream_id, piece, end_stream=not body)
                else:
                    take(await stream.receive_some())
                await stream.send_all(connection.data_to_send())
        finished = ended | reset
        while len(finished) < H2_STREAMS and (hold or connection.inbound_flow_control_window > 0):
            data = await stream.receive_some()
            if not data:
                break
            take(data)
            await stream.send_all(connection.data_to_send())  # acknowledgements, never a window
            finished = ended | reset
    for stream_id, answer in expected.items():
        got = bytes(received[stream_id])
        if not answer.startswith(got) or (stream_id in ended and got != answer):
            return "wrong"
    return "reset" if reset else "closed"


# --- watching the tproxy process


def proc_figures(pid: int) -> dict[str, int]:
    """Open file descriptors (and how many are sockets) and resident memory in KiB of a process."""
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            continue
    figures = {"fds": len(fds), "sockets": sockets}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):  # RssFile: mostly the LMDB map's pages
            figures[name] = int(value.split()[0])
    return figures


TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def socket_breakdown(pid: int, ports: dict[str, int]) -> Counter[str]:
    """The process's sockets by TCP state and peer (upstream, client, admin), or ``non-tcp``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    roles = {ports["upstream"]: "upstream", ports["proxy"]: "client", ports["admin"]: "admin"}
    kinds: Counter[str] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            inodes.discard(fields[9])
            local, remote = (int(fields[i].rsplit(":", 1)[1], 16) for i in (1, 2))
            role = roles.get(remote) or roles.get(local, "other")
            kinds[f"{TCP_STATES.get(fields[3], fields[3])} {role}"] += 1
    kinds["non-tcp"] += len(inodes)
    return kinds


async def metrics(http: httpx2.AsyncClient, admin: str) -> dict[str, float]:
    text = (await http.get(admin + "/metrics")).text
    figures: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        figures[name] = figures.get(name, 0.0) + value

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tproxy_inflight_exchanges":
                add("inflight", sample.value)
            elif sample.name == "tproxy_inflight_followers":
                add("followers", sample.value)
            elif sample.name == "tproxy_requests_total":
                add(f"requests {sample.labels['state']}/{sample.labels['cache']}", sample.value)
            elif sample.name == "tproxy_upstream_errors_total":
                add(f"upstream_error {sample.labels['kind']}", sample.value)
            elif sample.name in ("tproxy_cache_entries", "tproxy_cache_bytes"):
                add(sample.name.removeprefix("tproxy_"), sample.value)
            elif sample.name == "tproxy_coalesced_followers_total":
                add("coalesced", sample.value)
    return figures


async def wait_until_idle(http: httpx2.AsyncClient, admin: str) -> tuple[float, float]:
    """Poll /metrics until no exchange is in flight; seconds waited and the last value."""
    started = time.monotonic()
    inflight = (await metrics(http, admin)).get("inflight", 0.0)
    while inflight and time.monotonic() - started < 60:
        await trio.sleep(0.1)  # another process's state: polling is all there is
        inflight = (await metrics(http, admin)).get("inflight", 0.0)
    return time.monotonic() - started, inflight


async def wait_until_up(http: httpx2.AsyncClient, url: str) -> None:
    with trio.fail_after(20):
        while True:
            try:
                await http.get(url)
            except httpx2.TransportError:
                await trio.sleep(0.05)  # a process starting up: polling is all there is
            else:
                return


async def drive(args: argparse.Namespace, ports: dict[str, int], pid: int) -> dict[str, object]:
    proxy_port, admin_port, upstream_port = ports["proxy"], ports["admin"], ports["upstream"]
    admin = f"http://127.0.0.1:{admin_port}"
    report: dict[str, object] = {"loadavg_before": os.getloadavg()}
    async with httpx2.AsyncClient(timeout=10) as http:
        await wait_until_up(http, admin + "/healthz")
        await wait_until_up(http, f"http://127.0.0.1:{upstream_port}/soak/stats")
        report["before"] = {
            **proc_figures(pid),
            "socket_kinds": socket_breakdown(pid, ports),
            "inflight": (await metrics(http, admin)).get("inflight", 0.0),
        }
        tally = Tally(args.requests, time.monotonic() + args.seconds, uuid.uuid4().hex[:8])
        samples: list[tuple[float, int, dict[str, int]]] = []
        started = time.monotonic()

        async def sample_every(period: float) -> None:
            while True:
                await trio.sleep(period)
                figures = proc_figures(pid)
                samples.append((time.monotonic() - started, tally.started, figures))
                print(
                    f"{samples[-1][0]:6.0f} s {tally.started:7d} requests "
                    f"fds {figures['fds']} rss {figures['VmRSS']} KiB "
                    f"(anon {figures['RssAnon']}, file {figures['RssFile']})",
                    file=sys.stderr,
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_every, 10.0)
            async with trio.open_nursery() as clients:
                for number in range(CLIENTS):
                    clients.start_soon(client, proxy_port, tally, args.seed * 1000 + number)
                for number in range(H2_STOPPERS):
                    clients.start_soon(h2_stopper, proxy_port, tally, number)
            nursery.cancel_scope.cancel()
        duration = time.monotonic() - started
        waited, inflight = await wait_until_idle(http, admin)
        after_load = {
            **proc_figures(pid),
            "inflight": inflight,
            "socket_kinds": socket_breakdown(pid, ports),
        }
        # tproxy's pool keeps idle upstream connections 30 s and prunes them on its next use.
        await trio.sleep(args.settle)
        response = await http.post(
            f"http://127.0.0.1:{proxy_port}/v1/embeddings",
            json={"model": "soak-embed", "input": "settle"},
            headers={"connection": "close"},
        )
        await wait_until_idle(http, admin)
        upstream_stats = (await http.get(f"http://127.0.0.1:{upstream_port}/soak/stats")).json()
        report.update(
            requests=tally.started,
            duration=duration,
            kinds=tally.kinds,
            faults=tally.faults,
            outcomes=tally.outcomes,
            cache=tally.cache,
            wrong=sum(n for label, n in tally.outcomes.items() if label.endswith("wrong")),
            wrong_examples=tally.wrong,
            idle_after=waited,
            after_load=after_load,
            settled={
                **proc_figures(pid),
                "socket_kinds": socket_breakdown(pid, ports),
                "settle_request": response.status_code,
            },
            samples=samples,
            metrics=await metrics(http, admin),
            upstream=upstream_stats,
            smuggled_reached_upstream=upstream_stats["requests"].get(SMUGGLED.decode(), 0),
            loadavg_after=os.getloadavg(),
        )
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(args: argparse.Namespace) -> dict[str, object]:
    """Start the upstream and tproxy, drive the load, stop them."""
    ports = {"proxy": free_port(), "admin": free_port(), "upstream": free_port()}
    with tempfile.TemporaryDirectory(prefix="tproxy-soak-") as tmp:
        config = Path(tmp) / "tproxy.toml"
        config.write_text(
            f'[cache]\ndir = "{tmp}/store"\n\n'
            f'[upstreams.soak]\nurl = "http://127.0.0.1:{ports["upstream"]}"\n'
            "first_byte_timeout = 1.0\nidle_timeout = 1.0\n"
            f"\n[server]\nclient_stall_timeout = {CLIENT_STALL_SECONDS}\n"
        )
        log_path = Path(tmp) / "tproxy.log"
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", str(ports["upstream"])]
        )
        with log_path.open("wb") as log:
            tproxy = subprocess.Popen(
                [
                    *(sys.executable, "-m", "tproxy", "serve", "--config", str(config)),
                    *("--workers", "1"),
                    *("--listen", f"127.0.0.1:{ports['proxy']}"),
                    *("--admin-listen", f"127.0.0.1:{ports['admin']}"),
                ],
                stderr=log,
                cwd=ROOT,
            )
        try:
            report = trio.run(drive, args, ports, tproxy.pid)
        finally:
            for process in (tproxy, upstream):
                process.terminate()
            report_exit = tproxy.wait(timeout=30)
            upstream.wait(timeout=15)
        text = log_path.read_text(errors="replace")
        report["tproxy_exit"] = report_exit
        report["log_tracebacks"] = text.count("Traceback")
        levels = Counter(LEVEL.findall(text))
        report["log_levels"] = levels
        report["log_errors"] = [line[:300] for line in text.splitlines() if "error" in line][:5]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=480.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--settle", type=float, default=31.0, help="seconds idle before the last fd count"
    )
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
