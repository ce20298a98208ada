"""The load generator: several processes, each driving keep-alive connections with Trio.

A proxy that costs ~1 ms of CPU per request cannot be measured with a client that costs as much,
so this client is as thin as we could make it: raw Trio sockets, the request bytes built once,
and a hand-written HTTP/1.1 response reader (status line, ``Content-Length`` or chunked framing;
nothing else is needed against the servers under test). One process per core, each with its
share of the connections; every connection sends its next request as soon as the previous answer
has fully arrived (closed loop).

Time runs in three phases, the same in every process: connect, then ``warmup`` seconds whose
answers are not counted, then ``duration`` seconds of measurement; in-flight requests are cut at
the end. A request counts when its answer completes inside the measured window; its latency and
time to first body byte count when it also started inside it. With ``events`` on, each SSE event
of a chunked body is parsed and its ``"t"`` (the upstream's ``time.time_ns()`` at the write) is
subtracted from the client's clock at the read that delivered the event.

Usable on its own:

    python bench/load.py http://127.0.0.1:8080 --mode stream --connections 16 --duration 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

import trio

READ_SIZE = 65536
_T_FIELD = re.compile(rb'"t":(\d+)')


class Mode(Enum):
    """What one measurement sends."""

    JSON = "json"  # the small non-streamed completion
    STREAM = "stream"  # the 50-event stream, unpaced
    PACED = "paced"  # the 50-event stream with a gap between events; events are timed


# One earlier exchange of a conversation, for the requests that carry ``turns`` of them.
_TURN = [
    {"role": "user", "content": "Tell me one more thing about benchmarks, briefly. " * 2},
    {"role": "assistant", "content": "A benchmark measures one thing under a fixed load. " * 2},
]


def request_body(mode: Mode, turns: int = 0) -> bytes:
    """The request body of a mode: the same bytes for every target, so cache keys match.

    ``turns`` earlier exchanges (~250 bytes each) make it the size of a real conversation.
    """
    return json.dumps(
        {
            "model": "bench",
            "messages": [
                *(_TURN * turns),
                {"role": "user", "content": "Say hello to the benchmark."},
            ],
            "stream": mode is not Mode.JSON,
        },
        separators=(",", ":"),
    ).encode()


def request_bytes(
    host: str,
    port: int,
    mode: Mode,
    interval_ms: float,
    extra: tuple[bytes, ...] = (),
    turns: int = 0,
) -> bytes:
    """The whole request, built once per measurement; ``extra`` are more header lines."""
    body = request_body(mode, turns)
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: %s:%d" % (host.encode(), port),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        *extra,
    ]
    if mode is Mode.PACED:
        lines.append(b"X-Bench-Interval-Ms: %g" % interval_ms)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One process's share of a measurement. ``start_at`` is a ``time.time()`` all share."""

    host: str
    port: int
    request: bytes
    connections: int
    first_connection: int  # this process's connections are numbered from here
    total_connections: int  # over all processes
    stagger: float  # connection k starts k / total_connections * stagger seconds late
    start_at: float
    warmup: float
    duration: float
    events: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """What one process saw; times in nanoseconds."""

    completed: int  # answers completed inside the measured window
    errors: dict[str, int]
    latencies: list[int]
    ttfbs: list[int]
    event_delays: list[int]
    cpu_seconds: float  # this process's CPU time inside the measured window


@dataclass(slots=True)
class _Tally:
    completed: int = 0
    cpu_seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[int] = field(default_factory=list)
    ttfbs: list[int] = field(default_factory=list)
    event_delays: list[int] = field(default_factory=list)


class ProtocolError(Exception):
    """The server sent something this reader does not handle, or closed mid-answer."""


class LoadStuckError(Exception):
    """A load process did not report back in time (it should stop by itself at the end)."""


class _Connection:
    """One keep-alive connection and its unread bytes."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.read_at = 0  # time.time_ns() of the read that delivered the newest bytes

    async def fill(self) -> None:
        data = await self.sock.recv(READ_SIZE)
        if not data:
            raise ProtocolError("connection closed by the server")
        self.read_at = time.time_ns()
        self.buf += data

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def line(self) -> int:
        """Index of the next CRLF in the buffer, reading until there is one."""
        while (index := self.buf.find(b"\r\n")) < 0:
            await self.fill()
        return index


@dataclass(slots=True)
class _Answer:
    status: int = 0
    close: bool = False
    first_body_at: int = 0
    ended_at: int = 0


async def _open(host: str, port: int) -> _Connection:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await sock.connect((host, port))
    return _Connection(sock)


def _framing(head: bytes) -> tuple[int, bytes, bool, bool]:
    """Status, body framing and the end of keep-alive: (status, length or b"", chunked, close)."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 "):
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:40]!r}")
    status = int(lines[0][9:12])
    length = b""
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = value.strip()
        elif name == b"transfer-encoding":
            chunked = value.strip().lower() == b"chunked"
        elif name == b"connection":
            close = value.strip().lower() == b"close"  # Hypercorn: after 1,000 requests
    if not chunked and not length:
        raise ProtocolError("an answer with neither Content-Length nor chunked framing")
    return status, length, chunked, close


def _take_events(pending: bytearray, read_at: int, delays: list[int]) -> None:
    while (end := pending.find(b"\n\n")) >= 0:
        found = _T_FIELD.search(pending, 0, end)
        if found is not None:
            delays.append(read_at - int(found.group(1)))
        del pending[: end + 2]


async def _exchange(conn: _Connection, request: bytes, delays: list[int] | None) -> _Answer:
    """Send one request and read its whole answer; event delays go to ``delays`` if given."""
    answer = _Answer()
    await conn.send_all(request)
    buf = conn.buf
    while (end := buf.find(b"\r\n\r\n")) < 0:
        await conn.fill()
    answer.status, length, chunked, answer.close = _framing(bytes(buf[:end]))
    del buf[: end + 4]
    if not chunked:
        size = int(length)
        while len(buf) < size:
            if buf:
                answer.first_body_at = answer.first_body_at or conn.read_at
            await conn.fill()
        answer.first_body_at = answer.first_body_at or conn.read_at
        del buf[:size]
        answer.ended_at = conn.read_at
        return answer
    pending = bytearray()
    while True:
        index = await conn.line()
        size = int(bytes(buf[:index]).split(b";", 1)[0], 16)
        if size == 0:
            del buf[: index + 2]
            while (index := await conn.line()) > 0:  # trailers, if any, up to the empty line
                del buf[: index + 2]
            del buf[:2]
            answer.ended_at = conn.read_at
            return answer
        need = index + 2 + size + 2
        while len(buf) < need:
            await conn.fill()
        answer.first_body_at = answer.first_body_at or conn.read_at
        if delays is not None:
            pending += buf[index + 2 : index + 2 + size]
            _take_events(pending, conn.read_at, delays)
        del buf[:need]


async def _drive(spec: WorkerSpec, tally: _Tally, window: tuple[int, int], delay: float) -> None:
    """One connection's closed loop, reconnecting after an error; cancelled at the end."""
    measure_from, measure_to = window
    conn: _Connection | None = None
    await trio.sleep(delay)
    while True:
        try:
            if conn is None:
                conn = await _open(spec.host, spec.port)
            started = time.time_ns()
            delays: list[int] | None = [] if spec.events else None
            with trio.fail_after(spec.timeout):
                answer = await _exchange(conn, spec.request, delays)
        except (OSError, ProtocolError, ValueError, trio.TooSlowError) as error:
            detail = f": {error}" if isinstance(error, ProtocolError) else ""
            tally.errors[type(error).__name__ + detail] += 1
            if conn is not None:
                conn.sock.close()
                conn = None
            await trio.sleep(0.01)  # never spin on a refused connection
            continue
        if answer.close:
            conn.sock.close()
            conn = None
        if answer.status != 200:
            tally.errors[f"status {answer.status}"] += 1
            continue
        if measure_from <= answer.ended_at <= measure_to:
            tally.completed += 1
            if started >= measure_from:
                tally.latencies.append(answer.ended_at - started)
                tally.ttfbs.append(answer.first_body_at - started)
                if delays:
                    tally.event_delays.extend(delays)


async def _time_cpu(tally: _Tally, window: tuple[float, float]) -> None:
    await trio.sleep(max(0.0, window[0] - time.time()))
    start = time.process_time()
    await trio.sleep(max(0.0, window[1] - time.time()))
    tally.cpu_seconds = time.process_time() - start


async def _run(spec: WorkerSpec, tally: _Tally) -> None:
    window = (spec.start_at + spec.warmup, spec.start_at + spec.warmup + spec.duration)
    measure_from, measure_to = int(window[0] * 1e9), int(window[1] * 1e9)
    await trio.sleep(max(0.0, spec.start_at - time.time()))
    with trio.move_on_after(spec.warmup + spec.duration + 0.05):  # + time to read the CPU
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_time_cpu, tally, window)
            for k in range(spec.first_connection, spec.first_connection + spec.connections):
                delay = spec.stagger * k / spec.total_connections
                nursery.start_soon(_drive, spec, tally, (measure_from, measure_to), delay)


def run_worker(spec: WorkerSpec) -> WorkerResult:
    """Entry point of one load process: run the spec, report what it saw."""
    tally = _Tally()
    trio.run(_run, spec, tally)
    return WorkerResult(
        completed=tally.completed,
        errors=dict(tally.errors),
        latencies=tally.latencies,
        ttfbs=tally.ttfbs,
        event_delays=tally.event_delays,
        cpu_seconds=tally.cpu_seconds,
    )


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measurement merged over every load process."""

    rate: float  # answers per second in the measured window
    completed: int
    errors: dict[str, int]
    latencies: list[int]
    ttfbs: list[int]
    event_delays: list[int]
    client_cpu_seconds: float  # of every load process, inside the measured window

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Running:
    """A measurement under way. ``window`` is its measured span, in ``time.time()`` seconds."""

    def __init__(
        self,
        pending: multiprocessing.pool.AsyncResult[list[WorkerResult]],
        window: tuple[float, float],
    ) -> None:
        self.window = window
        self._pending = pending

    def wait(self) -> Measurement:
        """The merged result, once every load process has reported.

        Raises :class:`LoadStuckError` when one has not reported 30 s after the window closed.
        """
        budget = self.window[1] - time.time() + 30.0
        try:
            results = self._pending.get(max(budget, 0.0))
        except multiprocessing.TimeoutError as error:
            raise LoadStuckError(f"load processes still running {budget:.0f} s later") from error
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result.errors)
        completed = sum(r.completed for r in results)
        duration = self.window[1] - self.window[0]
        return Measurement(
            rate=completed / duration,
            completed=completed,
            errors=dict(errors),
            latencies=[x for r in results for x in r.latencies],
            ttfbs=[x for r in results for x in r.ttfbs],
            event_delays=[x for r in results for x in r.event_delays],
            client_cpu_seconds=sum(r.cpu_seconds for r in results),
        )


class LoadPool:
    """The load processes, started once (spawned: no state inherited) and reused."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = multiprocessing.get_context("spawn").Pool(processes)

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def start(
        self,
        url: str,
        mode: Mode,
        connections: int,
        *,
        duration: float,
        warmup: float,
        interval_ms: float = 10.0,
        stagger: float = 0.0,
        timeout: float = 10.0,
        headers: tuple[bytes, ...] = (),
        turns: int = 0,
    ) -> Running:
        """Start one measurement over the processes (at most one process per connection).

        ``stagger`` spreads the connections' first requests evenly over that many seconds, so
        that paced streams do not run in lockstep (every request, then every event, arriving
        in one burst); keep ``warmup`` at least as long, so that all are running when counting
        starts.
        """
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        request = request_bytes(host, port, mode, interval_ms, headers, turns)
        processes = min(self.processes, connections)
        start_at = time.time() + 0.3  # time for every process to receive its spec and connect
        shares = [
            connections // processes + (i < connections % processes) for i in range(processes)
        ]
        specs = [
            WorkerSpec(
                host=host,
                port=port,
                request=request,
                connections=share,
                first_connection=sum(shares[:i]),
                total_connections=connections,
                stagger=stagger,
                start_at=start_at,
                warmup=warmup,
                duration=duration,
                events=mode is Mode.PACED,
                timeout=timeout,
            )
            for i, share in enumerate(shares)
        ]
        pending = self._pool.map_async(run_worker, specs, chunksize=1)
        return Running(pending, (start_at + warmup, start_at + warmup + duration))


def percentile(samples: list[int], fraction: float) -> float:
    """Nearest-rank percentile, in milliseconds (samples are nanoseconds); NaN when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure one target; prints a JSON summary.")
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="json")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="spread the connections' starts over this many seconds (keep --warmup longer)",
    )
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    pool = LoadPool(args.processes)
    try:
        result = pool.start(
            args.url,
            Mode(args.mode),
            args.connections,
            duration=args.duration,
            warmup=args.warmup,
            interval_ms=args.interval_ms,
            stagger=args.stagger,
        ).wait()
    finally:
        pool.close()
    summary = {
        "per_second": round(result.rate, 1),
        "completed": result.completed,
        "errors": result.errors,
        "latency_ms_p50_p99": [percentile(result.latencies, q) for q in (0.5, 0.99)],
        "ttfb_ms_p50_p99": [percentile(result.ttfbs, q) for q in (0.5, 0.99)],
        "event_delay_ms_p50_p99": [percentile(result.event_delays, q) for q in (0.5, 0.99)],
        "client_cpu_seconds": round(result.client_cpu_seconds, 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
