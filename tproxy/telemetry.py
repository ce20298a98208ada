"""Telemetry: the access log, the payload log and the Prometheus metrics, off the client's path.

When an exchange reaches its terminal state the app builds an :class:`ExchangeRecord` (what
happened, never a credential) and calls :meth:`Telemetry.exchange_finished`. That call is
synchronous, never awaits and never raises: it updates the metrics (plain counters in memory)
and offers the record to each sink with ``send_nowait``. Every sink sits behind its own bounded
memory channel and drains it in its own task:

    exchange_finished ──send_nowait──▶ [access queue]  ──▶ access log (worker thread → logging)
                     ├─send_nowait──▶ [file queue]    ──▶ JSON lines, rotated by size
                     └─send_nowait──▶ [http queue]    ──▶ POST CloudEvents batches, retried

A sink that is slow or down lets its queue fill; from then on records for it are dropped and
counted (``tproxy_log_records_dropped_total{sink,reason="queue_full"}``), and the client never
waits. A sink that recovers takes the next records as they come. Writing happens in worker
threads (files, the logging handlers) or on sockets with deadlines (HTTP), so even a blocked
standard error cannot stall the event loop.

The payload log keeps the request body and the answer. :class:`PayloadCapture` is fed by the
pipeline while the answer passes (events of a stream, or the bytes of a JSON body) and keeps at
most ``payload_log.max_record_bytes`` of each side; with ``raw_events`` it keeps the events, else
it assembles them (:mod:`tproxy.core.assemble`). Memory ceiling of the payload log: per sink,
``queue_size`` × (2 × ``max_record_bytes``) plus one batch being written.

Metrics live on a :class:`prometheus_client.CollectorRegistry` of this instance (no global
state), exposed without ``_created`` series, with the process's own figures (``process_*``) and
``tproxy_build_info``. Counters move in :meth:`Telemetry.exchange_finished`; labels that name a
route or an upstream take names from the configuration only. What other parts own (in-flight
exchanges, the store, the store writer, the sinks' own counts) is read when ``/metrics`` is
scraped, by a custom collector. docs/telemetry.md lists every log field and metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import ssl
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from trio_util import AsyncValue

from tproxy import __version__
from tproxy.config import LogSettings, PayloadLogSettings, Settings
from tproxy.core.assemble import DEFAULT_MAX_CHARS, Answer, normalise_usage
from tproxy.core.breaker import BreakerState
from tproxy.core.cachekey import ANONYMOUS, SHARED
from tproxy.core.dialects import JSON_ONLY, Dialect
from tproxy.core.dialects.base import Assembler
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import ConfigError, StoreError
from tproxy.core.exchange import Exchange, State
from tproxy.core.sse import ServerSentEvent, SSEDecoder
from tproxy.inflight import Inflight
from tproxy.sharedstore import LATENCY_BUCKETS, SharedStatistics
from tproxy.store import CacheStore
from tproxy.storewriter import STORE_WRITER_OUTCOMES, StoreWriter

access_log = logging.getLogger("tproxy.access")
log = logging.getLogger("tproxy.telemetry")

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
ACCESS_FIELDS = "tproxy_access"  # the LogRecord attribute holding an access line's fields
DROP_REASONS = ("queue_full", "failed", "closed", "shutdown")
CLOUDEVENT_TYPE = "tproxy.exchange.payload"
CLOUDEVENT_SOURCE = "/tproxy"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"

_ACCESS_BATCH = 256
# Seconds a sink waits for more records before it delivers a batch that is not full. Delivery is
# a hop to a worker thread (or a POST); one per batch instead of one per request saves the event
# loop ~0.5 ms of thread handoff per request at low load, for access lines ≤ 20 ms late.
_LINGER = 0.02
_FILE_BATCH = 256
_MAX_BACKOFF = 30.0
_MAX_REASON_CHARS = 300
_MAX_LABEL_CHARS = 128
_MAX_MODEL_LABELS = 64
_MAX_OUTCOME_LABELS = 16
_SAVING_CACHE_LABELS = frozenset({"hit", "collapsed"})
_TIMEOUT_PHASES = frozenset({"connect", "first_byte", "idle", "total"})
_KNOWN_FWD = frozenset({"miss", "stale", "request", "bypass", "uri-miss", "vary-miss", "method"})
_PRIVATE_FILE = 0o600
_PRIVATE_DIRECTORY = 0o700
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_TENANT_DOMAIN = b"tproxy/log-tenant\x00"
_TENANT_HEX_DIGITS = 12
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


# --- what one exchange was ---------------------------------------------------------------------


def tenant_label(namespace: str | None) -> str | None:
    """A short hash of an exchange's tenant, for logs and /inflight; never the credential.

    ``Exchange.tenant`` should already be a hash (the cache namespace); hashing it again, with a
    domain of its own, means even a raw credential put there by mistake never reaches a log, and
    a log line cannot be matched to a cache key.
    """
    if namespace is None or namespace in (ANONYMOUS, SHARED):
        return namespace
    digest = hashlib.sha256(_TENANT_DOMAIN + namespace.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:_TENANT_HEX_DIGITS]


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    """One finished exchange, as the access log, the payload log and the metrics see it."""

    time: float  # Unix time when the record was made, just after the terminal state
    request_id: str
    client: str | None
    method: str
    path: str  # without the query string, which may carry a key
    route: str | None  # the route's name from the configuration; None before one was chosen
    upstream: str | None
    model: str | None
    status: int | None
    cache_status: str | None
    state: str
    reason: str | None
    bytes_in: int
    bytes_out: int
    events: int
    attempts: int
    followers: int
    ttfb: float | None  # seconds from the request to the first byte of the answer's body
    duration: float | None  # seconds from the request to the terminal state
    usage: Mapping[str, int] | None
    tenant: str | None
    cache: str | None  # "stored", or why the answer was not stored
    collapsed: bool
    upstream_answered: bool  # the upstream's response started (its status reached the client)

    @classmethod
    def from_exchange(
        cls,
        exchange: Exchange,
        *,
        route: str | None,
        bytes_in: int,
        usage: Mapping[str, object] | None,
        cache_outcome: str | None,
        collapsed: bool,
        now_unix: float,
    ) -> ExchangeRecord:
        """The record of ``exchange``, which should be finished.

        ``route`` is the name of the route that took the request (None: refused before one was
        chosen). ``usage`` is the answer's ``usage`` object (for a cache hit, the stored
        answer's); only its top-level counts are kept.
        ``cache_outcome`` is ``"stored"`` or the reason the answer was not stored (None: caching
        was not attempted). ``now_unix`` is ``time.time()``.
        """
        started = exchange.started_at
        first = exchange.first_byte_at
        if first is None and State.REPLAYING in exchange.history:
            first = exchange.headers_at  # a replay's body goes out with its headers
        return cls(
            time=now_unix,
            request_id=exchange.request_id,
            client=exchange.client,
            method=exchange.method,
            path=exchange.path.partition("?")[0],
            route=route,
            upstream=exchange.upstream,
            model=exchange.model,
            status=exchange.status,
            cache_status=exchange.cache_status,
            state=exchange.state.value,
            reason=None if exchange.reason is None else exchange.reason[:_MAX_REASON_CHARS],
            bytes_in=bytes_in,
            bytes_out=exchange.delivered_bytes,
            events=exchange.events,
            attempts=exchange.attempts,
            followers=exchange.followers,
            ttfb=None if first is None else max(0.0, first - started),
            duration=None if exchange.ended_at is None else max(0.0, exchange.ended_at - started),
            usage=normalise_usage(usage),
            tenant=tenant_label(exchange.tenant),
            cache=cache_outcome,
            collapsed=collapsed,
            upstream_answered=State.STREAMING in exchange.history,
        )

    def to_json(self) -> dict[str, object]:
        """The access log's fields, in their documented order."""
        return {
            "time": _iso_time(self.time),
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "upstream": self.upstream,
            "model": self.model,
            "status": self.status,
            "cache_status": self.cache_status,
            "state": self.state,
            "reason": self.reason,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "events": self.events,
            "attempts": self.attempts,
            "followers": self.followers,
            "ttfb_ms": _ms(self.ttfb),
            "duration_ms": _ms(self.duration),
            "usage": None if self.usage is None else dict(self.usage),
            "tenant": self.tenant,
            "cache": self.cache,
            "collapsed": self.collapsed,
        }

    def summary(self) -> str:
        """One line for people: the console form of the access log."""
        parts = [
            str(self.status) if self.status is not None else "-",
            self.method,
            self.path,
            self.state,
            f"{_ms(self.duration)}ms" if self.duration is not None else "-",
        ]
        if self.ttfb is not None:
            parts.append(f"ttfb={_ms(self.ttfb)}ms")
        parts.append(f"in={self.bytes_in}B out={self.bytes_out}B events={self.events}")
        parts.append(f"cache={cache_label(self.cache_status, self.collapsed)}")
        for name, value in (("upstream", self.upstream), ("model", self.model)):
            if value is not None:
                parts.append(f"{name}={value}")
        if self.usage is not None:
            prompt = self.usage.get("prompt_tokens", 0)
            parts.append(f"tokens={prompt}+{self.usage.get('completion_tokens', 0)}")
        if self.reason is not None:
            parts.append(f"reason={self.reason!r}")
        parts.append(f"id={self.request_id}")
        return _printable(" ".join(parts))


def cache_label(cache_status: str | None, collapsed: bool = False) -> str:
    """A ``Cache-Status`` value reduced to one word for a metric label or a console line.

    ``hit``, ``collapsed`` (joined an identical request in flight), the ``fwd`` reason
    (``miss``, ``stale``, ``request``, ``bypass``...), ``other``, or ``none`` without a header.
    """
    parameters = [] if cache_status is None else [p.strip() for p in cache_status.split(";")[1:]]
    if "hit" in parameters:
        return "hit"
    if collapsed or "collapsed" in parameters:
        return "collapsed"
    if cache_status is None:
        return "none"
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name == "fwd":
            return value if value in _KNOWN_FWD else "other"
    return "other"


# --- payloads ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Payload:
    """What the payload log keeps of one exchange: the request body and the answer.

    ``answer`` is the assembled answer; with ``payload_log.raw_events``, ``events`` (a stream)
    or ``body`` (a JSON answer) is kept instead. ``truncated`` says a side was cut to
    ``payload_log.max_record_bytes``.
    """

    request: bytes
    answer: Answer | None = None
    events: tuple[ServerSentEvent, ...] = ()
    body: bytes | None = None
    truncated: bool = False


class PayloadCapture:
    """Keeps what the payload log needs while an answer passes; sync, cheap, bounded. The
    request's API family (``dialect``) puts its answer together."""

    __slots__ = (
        "_assembler",
        "_body",
        "_dialect",
        "_events",
        "_left",
        "_raw",
        "_request",
        "_truncated",
    )

    def __init__(
        self, request: bytes, *, raw_events: bool, max_bytes: int, dialect: Dialect = JSON_ONLY
    ) -> None:
        self._request = request[:max_bytes]
        self._truncated = len(request) > max_bytes
        self._raw = raw_events
        self._dialect = dialect
        self._assembler: Assembler | None = None
        self._events: list[ServerSentEvent] = []
        self._body: bytearray | None = None
        self._left = max_bytes

    def observe_event(self, event: ServerSentEvent) -> None:
        """Take the next event of a streamed answer."""
        if not self._raw:
            if self._assembler is None:
                self._assembler = self._dialect.assembler(self._left)
            self._assembler.feed(event)
        elif len(event.data) <= self._left:
            self._events.append(event)
            self._left -= len(event.data)
        else:
            self._truncated = True
            self._left = 0

    def observe_body(self, data: bytes) -> None:
        """Take the next bytes of an answer that is not an event stream."""
        if self._body is None:
            self._body = bytearray()
        kept = data[: self._left]
        self._body += kept
        self._left -= len(kept)
        if len(kept) < len(data):
            self._truncated = True

    def observe_entry(self, entry: StoredEntry, max_line_bytes: int = 1 << 20) -> None:
        """Take a stored answer that is being replayed from the cache."""
        if not entry.streamed:
            for chunk in entry.chunks:
                self.observe_body(chunk)
            return
        decoder = self._dialect.decoder(entry.headers, max_line_bytes) or SSEDecoder(max_line_bytes)
        frames = [frame for chunk in entry.chunks for frame in decoder.feed(chunk)]
        frames += decoder.close()
        for frame in frames:
            if frame.event is not None:
                self.observe_event(frame.event)

    def finish(self) -> Payload:
        """The payload, once the answer is over (or cut short)."""
        if self._assembler is not None:
            assembled = self._assembler.result()
            truncated = self._truncated or assembled.truncated
            return Payload(self._request, assembled, truncated=truncated)
        if self._raw:
            body = None if self._body is None else bytes(self._body)
            return Payload(self._request, None, tuple(self._events), body, self._truncated)
        answer = (
            None
            if self._body is None
            else self._dialect.whole_answer(bytes(self._body), DEFAULT_MAX_CHARS)
        )
        return Payload(self._request, answer, truncated=self._truncated)


def payload_event(
    record: ExchangeRecord, payload: Payload, *, bodies_as_text: bool = False
) -> dict[str, object]:
    """One payload record as a CloudEvent (structured mode, JSON data).

    Bodies that are JSON are embedded as JSON, others as text; ``bodies_as_text`` embeds both as
    text, for a body whose JSON cannot be written back (NaN, or nested too deep).
    """
    embed = _text if bodies_as_text else _json_or_text
    response: object
    if payload.answer is not None:
        response = payload.answer.to_json()
    elif payload.body is not None:
        response = embed(payload.body)
    elif payload.events:
        response = {
            "events": [
                {"event": event.event, "data": event.data, "id": event.id}
                for event in payload.events
            ]
        }
    else:
        response = None
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": CLOUDEVENT_SOURCE,
        "type": CLOUDEVENT_TYPE,
        "subject": record.request_id,
        "time": _iso_time(record.time),
        "datacontenttype": "application/json",
        "data": {
            "exchange": record.to_json(),
            "request": embed(payload.request),
            "response": response,
            "truncated": payload.truncated,
        },
    }


# --- log formatting ----------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line. Access lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            document.update(fields)
        else:
            document["message"] = record.getMessage()
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"))


def log_formatter(settings: LogSettings, *, terminal: bool) -> logging.Formatter:
    """The formatter ``log.format`` asks for; ``auto`` is console on a terminal, JSON otherwise.

    Access lines read well in both: their message is :meth:`ExchangeRecord.summary`.
    """
    if settings.format == "json" or (settings.format == "auto" and not terminal):
        return JsonLogFormatter()
    return logging.Formatter("%(asctime)s %(levelname)-7s %(message)s")


# --- sinks -------------------------------------------------------------------------------------

_Item = tuple[ExchangeRecord, Payload | None]


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """A sink's counts. ``dropped`` maps each reason of :data:`DROP_REASONS` to a count."""

    name: str
    queued: int
    written: int
    dropped: Mapping[str, int]

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class _Sink(ABC):
    """A bounded queue of records and the task that drains it in batches."""

    def __init__(self, name: str, queue_size: int, batch_size: int) -> None:
        self.name = name
        self._batch_size = batch_size
        self._send, self._receive = trio.open_memory_channel[_Item](queue_size)
        self._written = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._accepted = 0
        self._handled = AsyncValue(0)
        self._failing = False

    def offer(self, item: _Item) -> None:
        """Queue ``item`` without waiting; when the queue is full it is dropped and counted."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._dropped["queue_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped["closed"] += 1
        else:
            self._accepted += 1

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Deliver batches until the queue is closed and empty; count what is left if cancelled."""
        batch: list[_Item] = []
        async with self._receive:
            try:
                async for first in self._receive:
                    batch = [first]
                    with trio.move_on_after(_LINGER):
                        while len(batch) < self._batch_size:
                            try:
                                batch.append(await self._receive.receive())
                            except trio.EndOfChannel:
                                break
                    await self._deliver(batch)
                    self._handled.value += len(batch)
                    batch = []
            finally:
                left = len(batch) + self._drain()
                if left:
                    self._dropped["shutdown"] += left
                    self._handled.value += left

    def _drain(self) -> int:
        count = 0
        while True:
            try:
                self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return count
            count += 1

    @abstractmethod
    async def _deliver(self, batch: list[_Item]) -> None:
        """Write ``batch``, counting it as delivered or failed. Raises nothing but Cancelled."""

    def _delivered(self, count: int) -> None:
        self._written += count
        if self._failing:
            self._failing = False
            log.warning("telemetry sink %s recovered", self.name)

    def _failed(self, count: int, why: str) -> None:
        self._dropped["failed"] += count
        if not self._failing:
            self._failing = True
            log.warning("telemetry sink %s failing, dropping records: %s", self.name, why)

    async def flush(self) -> None:
        """Wait until every record accepted so far was written or dropped."""
        target = self._accepted
        await self._handled.wait_value(lambda handled: handled >= target)

    def statistics(self) -> SinkStatistics:
        queued = self._receive.statistics().current_buffer_used
        return SinkStatistics(self.name, queued, self._written, dict(self._dropped))


class _AccessSink(_Sink):
    """Emits access lines through ``logging`` in a worker thread: a blocked stderr stalls only
    this sink."""

    async def _deliver(self, batch: list[_Item]) -> None:
        await trio.to_thread.run_sync(_emit_access, [record for record, _ in batch])
        self._delivered(len(batch))


def _emit_access(records: list[ExchangeRecord]) -> None:
    for record in records:
        access_log.info("%s", record.summary(), extra={ACCESS_FIELDS: record.to_json()})


class _FileSink(_Sink):
    """Appends CloudEvents as JSON lines to ``path``; rotates it past ``max_bytes``.

    Rotation renames ``path`` to ``path.1`` (``path.1`` to ``path.2``, ...) and keeps ``keep``
    rotated files. A line is never split across files: a file passes ``max_bytes`` only when a
    single line is larger than that.
    """

    def __init__(
        self, path: Path, *, max_bytes: int, keep: int, queue_size: int, batch_size: int
    ) -> None:
        super().__init__("file", queue_size, batch_size)
        self._path = path
        self._max_bytes = max_bytes
        self._keep = keep

    async def _deliver(self, batch: list[_Item]) -> None:
        try:
            await trio.to_thread.run_sync(self._write, batch)
        except OSError as error:
            self._failed(len(batch), str(error))
        else:
            self._delivered(len(batch))

    def _write(self, batch: list[_Item]) -> None:
        """Serialise and append ``batch`` (in a worker thread); raises OSError."""
        lines = [_json_line(record, payload) for record, payload in batch if payload is not None]
        self._path.parent.mkdir(mode=_PRIVATE_DIRECTORY, parents=True, exist_ok=True)
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            size = 0
        for number, segment in enumerate(split_for_rotation(size, lines, self._max_bytes)):
            if number:
                self._rotate()
            if segment:
                # Created for the owner only, as the store is: the records hold prompts. A
                # rotated file is this one renamed, so it keeps the mode.
                descriptor = os.open(self._path, _APPEND_FLAGS, _PRIVATE_FILE)
                with open(descriptor, "ab") as handle:
                    handle.write(b"".join(segment))

    def _rotate(self) -> None:
        if self._keep == 0:
            self._path.unlink(missing_ok=True)
            return
        for number in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{number}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{number + 1}"))
        os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))


def split_for_rotation(size: int, lines: Sequence[bytes], max_bytes: int) -> list[list[bytes]]:
    """Group ``lines`` by the file they go to: the first group is appended to the current file
    (``size`` bytes now), each later group starts a fresh file after a rotation."""
    groups: list[list[bytes]] = [[]]
    for line in lines:
        if size and size + len(line) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += len(line)
    return groups


def encode_payload_event(record: ExchangeRecord, payload: Payload) -> bytes:
    """:func:`payload_event` as strict JSON (no NaN), on one line. Never raises."""
    try:
        document = payload_event(record, payload)
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError):
        document = payload_event(record, payload, bodies_as_text=True)
        return json.dumps(document, separators=(",", ":")).encode()


def _json_line(record: ExchangeRecord, payload: Payload) -> bytes:
    return encode_payload_event(record, payload) + b"\n"


class _SinkFailure(Exception):
    """The HTTP endpoint did not take a batch."""


_TRANSIENT_ERRORS = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    h11.ProtocolError,
    _SinkFailure,
)


class _HttpSink(_Sink):
    """POSTs batches of CloudEvents (``application/cloudevents-batch+json``) to one URL.

    Each attempt opens a connection, sends the batch, reads the status and closes; it has
    ``timeout`` seconds in all. Connection errors, timeouts, 408, 429 and 5xx are retried
    ``retries`` times with exponential backoff (``backoff`` × 2ⁿ, jittered, at most 30 s); any
    other status drops the batch at once. While a batch waits, new records queue up and, once
    the queue is full, are dropped.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        queue_size: int,
        batch_size: int,
    ) -> None:
        super().__init__("http", queue_size, batch_size)
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._target = parts.path or "/"
        self._host_header = parts.netloc
        self._token = token
        self._timeout = timeout
        self._attempts = 1 + retries
        self._backoff = backoff
        self._ssl = ssl.create_default_context() if self._tls else None

    async def _deliver(self, batch: list[_Item]) -> None:
        body = await trio.to_thread.run_sync(_cloudevents_batch, batch)
        why = ""
        for attempt in range(self._attempts):
            if attempt:
                delay = min(_MAX_BACKOFF, self._backoff * 2 ** (attempt - 1))
                await trio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                status = await self._post(body)
            except _TRANSIENT_ERRORS as error:
                why = f"{type(error).__name__}: {error}"
                continue
            if 200 <= status < 300:
                self._delivered(len(batch))
                return
            why = f"status {status}"
            if status not in (408, 429) and status < 500:
                break
        self._failed(len(batch), why)

    async def _post(self, body: bytes) -> int:
        """One attempt: the response's status. Raises one of the transient errors."""
        with trio.fail_after(self._timeout):
            if self._ssl is not None:
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    self._host, self._port, ssl_context=self._ssl
                )
            else:
                stream = await trio.open_tcp_stream(self._host, self._port)
            async with stream:
                connection = h11.Connection(h11.CLIENT)
                headers = [
                    ("host", self._host_header),
                    ("user-agent", f"tproxy/{__version__}"),
                    ("content-type", CLOUDEVENTS_BATCH),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                if self._token is not None:
                    headers.append(("authorization", f"Bearer {self._token}"))
                request = h11.Request(method="POST", target=self._target, headers=headers)
                await stream.send_all(
                    _h11_bytes(connection, request)
                    + _h11_bytes(connection, h11.Data(data=body))
                    + _h11_bytes(connection, h11.EndOfMessage())
                )
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        return event.status_code
                    elif isinstance(event, h11.ConnectionClosed):
                        raise _SinkFailure("connection closed before a response")


def _h11_bytes(connection: h11.Connection, event: h11.Event) -> bytes:
    return connection.send(event) or b""


def _cloudevents_batch(batch: list[_Item]) -> bytes:
    events = [
        encode_payload_event(record, payload) for record, payload in batch if payload is not None
    ]
    return b"[" + b",".join(events) + b"]"


# --- metrics -----------------------------------------------------------------------------------


class _Labels:
    """At most ``limit`` distinct values of a client- or upstream-chosen label; then "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return "unknown"
        value = value[:_MAX_LABEL_CHARS]
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(value)
        return value


class _ConfiguredNames:
    """Route or upstream names as label values: only names from the configuration, so the label
    stays bounded; "none" where there is no name, "other" for one the configuration lacks."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(names)

    def __call__(self, name: str | None) -> str:
        if name is None:
            return "none"
        return name if name in self._names else "other"


class _WithoutCreated:
    """A registry's metrics without the ``_created`` series prometheus-client adds to counters
    and histograms (a start time for each of their series: as many series again for counters,
    and dashboards do not use them). For this registry only: the library's own switch is global
    to the process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            created = f"{metric.name}_created"
            # Every collect() builds its families afresh: changing them here is safe.
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric


class ProcessMetrics(ProcessCollector):
    """prometheus-client's ``process_*`` metrics, also where /proc shows only processes.

    The library reads the boot time from /proc/stat and reports nothing at all without it; the
    unit's ``ProcSubset=pid`` hides that file. The kernel computes that ``btime`` as the time now
    less the time since boot, and so does this, from clocks that need no file.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class _ScrapeCollector:
    """Reads, at scrape time, what other parts of the server own."""

    def __init__(
        self,
        inflight: Inflight | None,
        store: CacheStore | None,
        store_writer: StoreWriter | None,
        sinks: Sequence[_Sink],
    ) -> None:
        self._inflight = inflight
        self._store = store
        self._store_writer = store_writer
        self._sinks = sinks

    def collect(self) -> Iterable[Metric]:
        yield from self._collect_inflight()
        yield from self._collect_store()
        yield from self._collect_store_writer()
        yield from self._collect_sinks()

    def _collect_inflight(self) -> Iterable[Metric]:
        if self._inflight is None:
            return
        exchanges = self._inflight.snapshot()
        by_state = GaugeMetricFamily(
            "tproxy_inflight_exchanges", "Exchanges in flight, by state.", labels=["state"]
        )
        for state in State:
            if not state.terminal:
                count = sum(1 for exchange in exchanges if exchange.state is state)
                by_state.add_metric([state.value], count)
        yield by_state
        yield GaugeMetricFamily(
            "tproxy_inflight_followers",
            "Clients following an exchange in flight (coalesced), now.",
            value=sum(exchange.followers for exchange in exchanges),
        )

    def _collect_store(self) -> Iterable[Metric]:
        if self._store is None:
            return
        try:
            stats = self._store.stats()
        except StoreError:
            return
        for name, text, value in (
            ("entries", "Entries in the cache store.", stats.entries),
            ("bytes", "Bytes of the entries in the cache store.", stats.bytes),
            ("max_bytes", "The cache store's size limit, in bytes.", stats.max_bytes),
        ):
            yield GaugeMetricFamily(f"tproxy_cache_{name}", text, value=value)
        for name, text, value in (
            ("hits", "Cache lookups that found a live entry.", stats.hits),
            ("misses", "Cache lookups that found none.", stats.misses),
            ("evictions", "Entries evicted to stay under the size limit.", stats.evictions),
            ("expired", "Entries removed because they expired.", stats.expired),
        ):
            yield CounterMetricFamily(f"tproxy_cache_{name}", text, value=value)

    def _collect_store_writer(self) -> Iterable[Metric]:
        if self._store_writer is None:
            return
        stats = self._store_writer.statistics()
        entries = CounterMetricFamily(
            "tproxy_store_writer_entries",
            "Answers handed to the store writer, by outcome.",
            labels=["outcome"],
        )
        for outcome in STORE_WRITER_OUTCOMES:
            entries.add_metric([outcome], getattr(stats, outcome))
        yield entries
        yield CounterMetricFamily(
            "tproxy_store_writer_batches", "Write transactions committed.", value=stats.batches
        )
        if self._store_writer.shared is not None:
            yield from _shared_metrics(self._store_writer.shared.statistics())

    def _collect_sinks(self) -> Iterable[Metric]:
        written = CounterMetricFamily(
            "tproxy_log_records_written", "Log records written, by sink.", labels=["sink"]
        )
        dropped = CounterMetricFamily(
            "tproxy_log_records_dropped",
            "Log records dropped, by sink and reason.",
            labels=["sink", "reason"],
        )
        queued = GaugeMetricFamily(
            "tproxy_log_queue_records", "Log records waiting, by sink.", labels=["sink"]
        )
        for sink in self._sinks:
            stats = sink.statistics()
            written.add_metric([sink.name], stats.written)
            queued.add_metric([sink.name], stats.queued)
            for reason, count in stats.dropped.items():
                dropped.add_metric([sink.name, reason], count)
        yield from (written, dropped, queued)


def _shared_metrics(stats: SharedStatistics) -> Iterable[Metric]:
    """The shared cache tier (``[shared_store]``): lookups, writes, latency, the breaker."""
    lookups = CounterMetricFamily(
        "tproxy_shared_store_lookups",
        "Shared-tier lookups, by result (skipped: the breaker was open).",
        labels=["result"],
    )
    for result, count in stats.lookups.items():
        lookups.add_metric([result], count)
    writes = CounterMetricFamily(
        "tproxy_shared_store_writes",
        "Answers handed to the shared tier, by outcome (dropped: its queue was full).",
        labels=["outcome"],
    )
    for outcome, count in stats.writes.items():
        writes.add_metric([outcome], count)
    buckets = [
        (str(bound), count)
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), stats.latency_buckets, strict=True)
    ]
    latency = HistogramMetricFamily(
        "tproxy_shared_store_lookup_seconds",
        "Time a shared-tier lookup took, its deadline included.",
        buckets=buckets,
        sum_value=stats.latency_sum,
    )
    breaker = GaugeMetricFamily(
        "tproxy_shared_store_breaker",
        "The shared tier's circuit breaker: 1 for its current state.",
        labels=["state"],
    )
    for state in BreakerState:
        breaker.add_metric([state.value], 1 if stats.breaker is state else 0)
    yield from (lookups, writes, latency, breaker)
    yield GaugeMetricFamily(
        "tproxy_shared_store_up",
        "1 when the shared tier is being asked (breaker closed), 0 when it is failing.",
        value=1 if stats.breaker is BreakerState.CLOSED else 0,
    )
    yield CounterMetricFamily(
        "tproxy_shared_store_written_bytes",
        "Encoded bytes written to the shared tier.",
        value=stats.bytes_written,
    )
    yield GaugeMetricFamily(
        "tproxy_shared_store_queue_entries",
        "Answers waiting to be written to the shared tier.",
        value=stats.queued,
    )


# --- the facade the app calls ------------------------------------------------------------------


class Telemetry:
    """Access log, payload log and metrics of one server. Calls from requests never wait.

    Raises :class:`ConfigError` when ``payload_log.http_token_env`` names a variable that is
    not set.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        inflight: Inflight | None = None,
        store: CacheStore | None = None,
        store_writer: StoreWriter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._access: _Sink | None = None
        if settings.telemetry.access_log:
            self._access = _AccessSink("access", settings.telemetry.queue_size, _ACCESS_BATCH)
        self._payload_settings = settings.payload_log
        self._payload_sinks = _payload_sinks(
            settings.payload_log, os.environ if environ is None else environ
        )
        self._sinks: list[_Sink] = [
            *([self._access] if self._access is not None else []),
            *self._payload_sinks,
        ]
        self._models = _Labels(_MAX_MODEL_LABELS)
        self._outcomes = _Labels(_MAX_OUTCOME_LABELS)
        self._routes = _ConfiguredNames(route.name for route in settings.routes)
        self._upstreams = _ConfiguredNames(upstream.name for upstream in settings.upstreams)
        self.registry = CollectorRegistry()
        self._exposed = _WithoutCreated(self.registry)
        ProcessMetrics(registry=self.registry)
        Info(
            "tproxy_build",
            "The tproxy version and the Python that runs it.",
            registry=self.registry,
        ).info({"version": __version__, "python": platform.python_version()})
        self._requests = Counter(
            "tproxy_requests",
            "Requests finished, by terminal state, cache status, route and upstream.",
            ["state", "cache", "route", "upstream"],
            registry=self.registry,
        )
        self._ttfb = Histogram(
            "tproxy_time_to_first_byte_seconds",
            "Time from the request to the first byte of the answer's body.",
            ["source", "route", "upstream"],
            buckets=_TTFB_BUCKETS,
            registry=self.registry,
        )
        self._duration = Histogram(
            "tproxy_request_duration_seconds",
            "Time from the request to its terminal state.",
            ["source", "route", "upstream"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._upstream_errors = Counter(
            "tproxy_upstream_errors",
            "Exchanges the upstream failed, by kind, route and upstream.",
            ["kind", "route", "upstream"],
            registry=self.registry,
        )
        self._followers = Counter(
            "tproxy_coalesced_followers",
            "Requests answered by joining an identical request in flight.",
            registry=self.registry,
        )
        self._certificate_expiry = Gauge(
            "tproxy_tls_certificate_expiry_timestamp_seconds",
            "When the certificate a TLS listener presents expires, Unix time.",
            ["listener"],
            registry=self.registry,
        )
        self._background = Counter(
            "tproxy_background_completions",
            "Answers finished in the background after their clients left, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "tproxy_tokens",
            "Tokens the upstreams reported in usage, by model and kind.",
            ["model", "kind"],
            registry=self.registry,
        )
        self._saved_tokens = Counter(
            "tproxy_tokens_saved",
            "Tokens of answers served without an upstream call (cache hits, coalesced followers),"
            " from the answers' usage, by model, kind and cache status.",
            ["model", "kind", "cache"],
            registry=self.registry,
        )
        self.registry.register(_ScrapeCollector(inflight, store, store_writer, self._sinks))

    @property
    def wants_payloads(self) -> bool:
        """Whether the payload log is on: only then is a :class:`Payload` worth building."""
        return bool(self._payload_sinks)

    def capture(self, request_body: bytes, dialect: Dialect = JSON_ONLY) -> PayloadCapture | None:
        """A capture for one exchange's payload, or None when the payload log is off."""
        if not self._payload_sinks:
            return None
        return PayloadCapture(
            request_body,
            raw_events=self._payload_settings.raw_events,
            max_bytes=self._payload_settings.max_record_bytes,
            dialect=dialect,
        )

    def exchange_finished(self, record: ExchangeRecord, payload: Payload | None = None) -> None:
        """Count ``record`` and offer it to every sink. Never blocks, never raises."""
        self._count(record)
        if self._access is not None and access_log.isEnabledFor(logging.INFO):
            self._access.offer((record, None))
        if payload is not None:
            for sink in self._payload_sinks:
                sink.offer((record, payload))

    def note_certificate(self, listener: str, expires_at: float) -> None:
        """Record when the certificate ``listener`` (``proxy`` or ``admin``) presents expires."""
        self._certificate_expiry.labels(listener=listener).set(expires_at)

    def note_background_completion(self, outcome: str) -> None:
        """Count an answer finished in the background (``stored``, ``failed``, ``timed_out``...)."""
        self._background.labels(outcome=self._outcomes(outcome)).inc()

    def metrics_text(self) -> bytes:
        """The metrics in the Prometheus text format (:data:`METRICS_CONTENT_TYPE`)."""
        return generate_latest(self._exposed)

    def statistics(self) -> dict[str, SinkStatistics]:
        """Each sink's counts, by sink name (``access``, ``file``, ``http``)."""
        return {sink.name: sink.statistics() for sink in self._sinks}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the sinks until :meth:`close` is called and their queues are written."""
        async with trio.open_nursery() as nursery:
            for sink in self._sinks:
                nursery.start_soon(sink.run)
            task_status.started()

    def close(self) -> None:
        """Accept no more records; :meth:`serve` returns once the queues are written."""
        for sink in self._sinks:
            sink.close()

    async def flush(self) -> None:
        """Wait until every record offered so far was written or dropped by its sink."""
        for sink in self._sinks:
            await sink.flush()

    def _count(self, record: ExchangeRecord) -> None:
        cache = cache_label(record.cache_status, record.collapsed)
        route = self._routes(record.route)
        upstream = self._upstreams(record.upstream)
        self._requests.labels(state=record.state, cache=cache, route=route, upstream=upstream).inc()
        source = "cache" if cache == "hit" else "upstream" if record.upstream else "proxy"
        if record.ttfb is not None:
            self._ttfb.labels(source, route, upstream).observe(record.ttfb)
        if record.duration is not None:
            self._duration.labels(source, route, upstream).observe(record.duration)
        kind = upstream_error_kind(record)
        if kind is not None:
            self._upstream_errors.labels(kind=kind, route=route, upstream=upstream).inc()
        if record.collapsed:
            self._followers.inc()
        if record.usage is not None:
            self._count_tokens(record, cache)

    def _count_tokens(self, record: ExchangeRecord, cache: str) -> None:
        """The upstream spent the tokens of the answer it produced once; a hit or a follower was
        served that answer again without an upstream call: its tokens are what was saved."""
        assert record.usage is not None
        saved = cache in _SAVING_CACHE_LABELS
        if saved and record.state != State.COMPLETED.value:
            return  # a client that left early was not served the whole answer
        model = self._models(record.model)
        for kind, member in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            count = record.usage.get(member)
            if not count:
                continue
            if saved:
                self._saved_tokens.labels(model=model, kind=kind, cache=cache).inc(count)
            else:
                self._tokens.labels(model=model, kind=kind).inc(count)


def upstream_error_kind(record: ExchangeRecord) -> str | None:
    """How the upstream failed this exchange, as a metric label; None when it did not.

    ``connect`` (no response), ``broken`` (the body broke), ``timeout_<phase>``, or the
    upstream's own error statuses ``http_429`` and ``http_5xx``.
    """
    if record.state == State.TIMED_OUT.value:
        phase = (record.reason or "").removeprefix("timeout:")
        return f"timeout_{phase}" if phase in _TIMEOUT_PHASES else "timeout_other"
    if record.state == State.UPSTREAM_FAILED.value:
        return "broken" if record.upstream_answered else "connect"
    if record.upstream is None or record.status is None or record.state == State.REJECTED.value:
        return None
    if record.status == 429:
        return "http_429"
    return "http_5xx" if record.status >= 500 else None


def _payload_sinks(settings: PayloadLogSettings, environ: Mapping[str, str]) -> list[_Sink]:
    if not settings.enabled:
        return []
    sinks: list[_Sink] = []
    if settings.file is not None:
        sinks.append(
            _FileSink(
                settings.file,
                max_bytes=settings.max_bytes,
                keep=settings.keep,
                queue_size=settings.queue_size,
                batch_size=_FILE_BATCH,
            )
        )
    if settings.http_url is not None:
        token = None
        if settings.http_token_env is not None:
            token = environ.get(settings.http_token_env)
            if not token:
                raise ConfigError(
                    [
                        f"payload_log.http_token_env: environment variable"
                        f" {settings.http_token_env} is not set"
                    ]
                )
        sinks.append(
            _HttpSink(
                settings.http_url,
                token=token,
                timeout=settings.http_timeout,
                retries=settings.http_retries,
                backoff=settings.http_backoff,
                queue_size=settings.queue_size,
                batch_size=settings.batch_size,
            )
        )
    return sinks


@asynccontextmanager
async def open_telemetry(
    settings: Settings,
    *,
    inflight: Inflight | None,
    store: CacheStore | None,
    store_writer: StoreWriter | None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Telemetry]:
    """Telemetry running in its own nursery; on exit the queues are written, for at most
    ``telemetry.flush_timeout`` seconds, and what is left then is counted as dropped."""
    telemetry = Telemetry(
        settings, inflight=inflight, store=store, store_writer=store_writer, environ=environ
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.serve)
        try:
            yield telemetry
        finally:
            telemetry.close()
            nursery.cancel_scope.deadline = trio.current_time() + settings.telemetry.flush_timeout


# --- small helpers -----------------------------------------------------------------------------


def _iso_time(unix: float) -> str:
    """RFC 3339 in UTC with milliseconds, as CloudEvents and log collectors expect."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a request path cannot forge a log line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


def _json_or_text(data: bytes) -> Any:
    """A body as JSON when it is JSON, else as text (invalid UTF-8 replaced)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _text(data)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
