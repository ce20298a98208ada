"""Telemetry: the access log, the payload log and the Prometheus metrics, off the client's path.

When an exchange reaches its terminal state the app builds an :class:`ExchangeRecord` (what
happened, never a credential) and calls :meth:`Telemetry.exchange_finished`. That call is
synchronous, never awaits and never raises: it updates the metrics (plain counters in memory)
and offers the record to each sink, which queues it without waiting or drops and counts it.

The package, lowest first (each module imports only those above it in this list):

- :mod:`~tproxy.telemetry.records`: :class:`ExchangeRecord`, what one exchange was;
- :mod:`~tproxy.telemetry.payload`: :class:`PayloadCapture`, the payload log's content;
- :mod:`~tproxy.telemetry.logs`: the log formatters and the access line;
- :mod:`~tproxy.telemetry.sinks`: the access, file and HTTP sinks, each on a bounded queue;
- :mod:`~tproxy.telemetry.metrics`: the registry, its counters and the scrape-time collector;
- this module: the :class:`Telemetry` facade the app, the pipeline and the admin listener call.

docs/telemetry.md lists every log field and metric.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from tproxy.config import Settings
from tproxy.core.dialects import JSON_ONLY, Dialect
from tproxy.telemetry.logs import ACCESS_FIELDS, JsonLogFormatter, access_log, log_formatter
from tproxy.telemetry.metrics import (
    METRICS_CONTENT_TYPE,
    InflightView,
    Metrics,
    ProcessMetrics,
    StoreView,
    StoreWriterView,
)
from tproxy.telemetry.payload import Payload, PayloadCapture, encode_payload_event, payload_event
from tproxy.telemetry.records import (
    ExchangeRecord,
    cache_label,
    tenant_label,
    upstream_error_kind,
)
from tproxy.telemetry.sinks import (
    ACCESS_BATCH,
    CLOUDEVENTS_BATCH,
    DROP_REASONS,
    AccessSink,
    Sink,
    SinkStatistics,
    payload_sinks,
    split_for_rotation,
)

__all__ = [
    "ACCESS_FIELDS",
    "CLOUDEVENTS_BATCH",
    "DROP_REASONS",
    "METRICS_CONTENT_TYPE",
    "ExchangeRecord",
    "JsonLogFormatter",
    "Payload",
    "PayloadCapture",
    "ProcessMetrics",
    "SinkStatistics",
    "Telemetry",
    "cache_label",
    "encode_payload_event",
    "log_formatter",
    "open_telemetry",
    "payload_event",
    "split_for_rotation",
    "tenant_label",
    "upstream_error_kind",
]


class Telemetry:
    """Access log, payload log and metrics of one server. Calls from requests never wait.

    Raises :class:`ConfigError` when ``payload_log.http_token_env`` names a variable that is
    not set.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        inflight: InflightView | None = None,
        store: StoreView | None = None,
        store_writer: StoreWriterView | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._access: Sink | None = None
        if settings.telemetry.access_log:
            self._access = AccessSink("access", settings.telemetry.queue_size, ACCESS_BATCH)
        self._payload_settings = settings.payload_log
        self._payload_sinks = payload_sinks(
            settings.payload_log, os.environ if environ is None else environ
        )
        self._sinks: list[Sink] = [
            *([self._access] if self._access is not None else []),
            *self._payload_sinks,
        ]
        self._metrics = Metrics(
            settings, inflight=inflight, store=store, store_writer=store_writer, sinks=self._sinks
        )

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
        self._metrics.count(record)
        if self._access is not None and access_log.isEnabledFor(logging.INFO):
            self._access.offer((record, None))
        if payload is not None:
            for sink in self._payload_sinks:
                sink.offer((record, payload))

    def note_certificate(self, listener: str, expires_at: float) -> None:
        """Record when the certificate ``listener`` (``proxy`` or ``admin``) presents expires."""
        self._metrics.note_certificate(listener, expires_at)

    def note_background_completion(self, outcome: str) -> None:
        """Count an answer finished in the background (``stored``, ``failed``, ``timed_out``...)."""
        self._metrics.note_background_completion(outcome)

    def metrics_text(self) -> bytes:
        """The metrics in the Prometheus text format (:data:`METRICS_CONTENT_TYPE`)."""
        return self._metrics.text()

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


@asynccontextmanager
async def open_telemetry(
    settings: Settings,
    *,
    inflight: InflightView | None,
    store: StoreView | None,
    store_writer: StoreWriterView | None,
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
