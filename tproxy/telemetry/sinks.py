"""The sinks: each a bounded queue of records, written in batches by a task of its own.

    exchange_finished ──offer──▶ [access queue]  ──▶ access log (worker thread → logging)
                     ├─offer──▶ [file queue]    ──▶ JSON lines, rotated by size
                     └─offer──▶ [http queue]    ──▶ POST CloudEvents batches, retried

A sink that is slow or down lets its queue (a :class:`~tproxy.batchqueue.BatchQueue`) fill; from
then on records for it are dropped and counted
(``tproxy_log_records_dropped_total{sink,reason="queue_full"}``), and the client never waits. A
sink that recovers takes the next records as they come. Writing happens in worker threads (files,
the logging handlers) or on sockets with deadlines (HTTP), so even a blocked standard error cannot
stall the event loop. Memory ceiling of the payload log: per sink, ``queue_size`` ×
(2 × ``max_record_bytes``) plus one batch being written.
"""

from __future__ import annotations

import logging
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from tproxy import __version__
from tproxy.batchqueue import BatchQueue
from tproxy.config import PayloadLogSettings
from tproxy.core.errors import ConfigError, UpstreamError
from tproxy.telemetry.logs import emit_access
from tproxy.telemetry.payload import Payload, encode_payload_event
from tproxy.telemetry.records import ExchangeRecord
from tproxy.upstream import post_once, system_roots

log = logging.getLogger("tproxy.telemetry")

DROP_REASONS = ("queue_full", "failed", "closed", "shutdown")
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"

# Seconds a sink waits for more records before it delivers a batch that is not full. Delivery is
# a hop to a worker thread (or a POST); one per batch instead of one per request saves the event
# loop ~0.5 ms of thread handoff per request at low load, for access lines ≤ 20 ms late.
_LINGER = 0.02
ACCESS_BATCH = 256
_FILE_BATCH = 256
_MAX_BACKOFF = 30.0
_PRIVATE_FILE = 0o600
_PRIVATE_DIRECTORY = 0o700
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

Item = tuple[ExchangeRecord, Payload | None]


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


class Sink(ABC):
    """A :class:`BatchQueue` of records and the delivery of its batches."""

    def __init__(self, name: str, queue_size: int, batch_size: int) -> None:
        self.name = name
        self._queue = BatchQueue[Item](queue_size, batch_size, linger=_LINGER)
        self._written = 0
        self._failed_records = 0
        self._failing = False

    def offer(self, item: Item) -> None:
        """Queue ``item`` without waiting; when the queue is full it is dropped and counted."""
        self._queue.offer(item)

    def close(self) -> None:
        self._queue.close()

    async def run(self) -> None:
        """Deliver batches until the queue is closed and empty; count what is left if cancelled."""
        await self._queue.serve(self._deliver)

    @abstractmethod
    async def _deliver(self, batch: list[Item]) -> None:
        """Write ``batch``, counting it as delivered or failed. Raises nothing but Cancelled."""

    def _delivered(self, count: int) -> None:
        self._written += count
        if self._failing:
            self._failing = False
            log.warning("telemetry sink %s recovered", self.name)

    def _failed(self, count: int, why: str) -> None:
        self._failed_records += count
        if not self._failing:
            self._failing = True
            log.warning("telemetry sink %s failing, dropping records: %s", self.name, why)

    async def flush(self) -> None:
        """Wait until every record accepted so far was written or dropped."""
        await self._queue.flush()

    def statistics(self) -> SinkStatistics:
        queue = self._queue.statistics()
        dropped = {
            "queue_full": queue.refused_full,
            "failed": self._failed_records,
            "closed": queue.refused_closed,
            "shutdown": queue.abandoned,
        }
        return SinkStatistics(self.name, queue.queued, self._written, dropped)


class AccessSink(Sink):
    """Emits access lines through ``logging`` in a worker thread: a blocked stderr stalls only
    this sink."""

    async def _deliver(self, batch: list[Item]) -> None:
        await trio.to_thread.run_sync(emit_access, [record for record, _ in batch])
        self._delivered(len(batch))


class FileSink(Sink):
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

    async def _deliver(self, batch: list[Item]) -> None:
        try:
            await trio.to_thread.run_sync(self._write, batch)
        except OSError as error:
            self._failed(len(batch), str(error))
        else:
            self._delivered(len(batch))

    def _write(self, batch: list[Item]) -> None:
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


def _json_line(record: ExchangeRecord, payload: Payload) -> bytes:
    return encode_payload_event(record, payload) + b"\n"


# What one attempt may fail with besides a status: worth another attempt.
_TRANSIENT_ERRORS = (UpstreamError, trio.TooSlowError)


class HttpSink(Sink):
    """POSTs batches of CloudEvents (``application/cloudevents-batch+json``) to one URL.

    Each attempt opens a connection, sends the batch, reads the status and closes
    (:func:`tproxy.upstream.post_once`: the HTTP client lives in one module); it has ``timeout``
    seconds in all. Connection errors, timeouts, 408, 429 and 5xx are retried
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
        self._url = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        # Loaded once here, not per attempt: loading the CAs blocks the event loop for ~20 ms.
        self._ssl_context = system_roots() if parts.scheme == "https" else None
        self._headers = [
            ("host", parts.netloc),
            ("user-agent", f"tproxy/{__version__}"),
            ("content-type", CLOUDEVENTS_BATCH),
            ("connection", "close"),
        ]
        if token is not None:
            self._headers.append(("authorization", f"Bearer {token}"))
        self._timeout = timeout
        self._attempts = 1 + retries
        self._backoff = backoff

    async def _deliver(self, batch: list[Item]) -> None:
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
            return await post_once(self._url, self._headers, body, ssl_context=self._ssl_context)


def _cloudevents_batch(batch: list[Item]) -> bytes:
    events = [
        encode_payload_event(record, payload) for record, payload in batch if payload is not None
    ]
    return b"[" + b",".join(events) + b"]"


def payload_sinks(settings: PayloadLogSettings, environ: Mapping[str, str]) -> list[Sink]:
    if not settings.enabled:
        return []
    sinks: list[Sink] = []
    if settings.file is not None:
        sinks.append(
            FileSink(
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
            HttpSink(
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
