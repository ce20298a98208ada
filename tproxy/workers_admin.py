"""The supervisor's admin listener: every worker's admin listener asked, the answers merged.

With ``server.workers`` above 1 (:mod:`tproxy.workers`), each worker has its own admin listener
on a loopback port. The supervisor's admin listener serves the same endpoints for the whole
service by asking every worker (:func:`ask_workers`: one GET each, all at once, each within
:data:`ADMIN_CALL_TIMEOUT`) and merging: ``/metrics`` summed series by series
(:func:`merge_scrapes`), ``/inflight`` joined, ``/readyz`` ready when every worker is.

The GET is httpcore2's, as the upstream calls are: this module and :mod:`tproxy.upstream` are
its only users (tests/test_layering.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import httpcore2
import trio
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tproxy.admin import AdminApp, AdminUnavailable

# Seconds each call to a worker's admin listener may take.
ADMIN_CALL_TIMEOUT = 2.0
# The largest answer read from a worker's admin listener.
MAX_ADMIN_ANSWER = 64 * 1024 * 1024

# Gauges every worker reads from the shared store file or the build: the same, not added up.
_SHARED_GAUGES = frozenset(
    {"tproxy_cache_entries", "tproxy_cache_bytes", "tproxy_cache_max_bytes", "tproxy_build_info"}
)
# Taken the earliest: when the service started, and the certificate to renew first (workers
# that loaded a renewed file and one that could not may differ).
_EARLIEST = frozenset(
    {"process_start_time_seconds", "tproxy_tls_certificate_expiry_timestamp_seconds"}
)

# A worker's answer: its status and body, or 0 and why it gave none.
Answers = dict[int, tuple[int, bytes]]


class AdminCallFailed(Exception):
    """A worker's admin listener gave no whole answer in time."""


async def admin_get(url: str, path: str, token: str | None) -> tuple[int, bytes]:
    """GET ``url + path`` within :data:`ADMIN_CALL_TIMEOUT`: the status and the body.

    Raises :class:`AdminCallFailed` (no connection, a broken or too large answer, the deadline).
    """
    headers = [("Authorization", f"Bearer {token}")] if token is not None else []
    try:
        with trio.fail_after(ADMIN_CALL_TIMEOUT):
            async with (
                httpcore2.AsyncConnectionPool(retries=0) as pool,
                pool.stream("GET", url + path, headers=headers) as response,
                aclosing(response.aiter_stream()) as chunks,
            ):
                body = bytearray()
                async for chunk in chunks:
                    body += chunk
                    if len(body) > MAX_ADMIN_ANSWER:
                        raise AdminCallFailed(f"an answer larger than {MAX_ADMIN_ANSWER} bytes")
                return response.status, bytes(body)
    except trio.TooSlowError as error:
        raise AdminCallFailed(f"no answer within {ADMIN_CALL_TIMEOUT:g}s") from error
    except (httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.TimeoutException) as error:
        raise AdminCallFailed(str(error) or type(error).__name__) from error


async def ask_workers(admins: Mapping[int, str], path: str, token: str | None) -> Answers:
    """GET ``path`` from every worker's admin URL in ``admins`` at once: each worker's status
    and body (0 and the reason when it did not answer)."""
    answers: Answers = {}

    async def ask(number: int, url: str) -> None:
        try:
            answers[number] = await admin_get(url, path, token)
        except AdminCallFailed as error:
            answers[number] = (0, f"worker {number}: {error}".encode())

    async with trio.open_nursery() as nursery:
        for number, url in admins.items():
            nursery.start_soon(ask, number, url)
    return answers


class Workers(Protocol):
    """What the admin listener needs of the supervisor."""

    token: str | None
    stop: trio.Event  # set when the drain starts
    restarts: int

    @property
    def count(self) -> int:
        """The workers the service runs, listening or not."""
        ...

    async def ask_workers(self, path: str) -> Answers:
        """:func:`ask_workers` for the workers that listen now."""
        ...


class WorkersAdmin(AdminApp):
    """The supervisor's admin listener: the same endpoints, token and TLS, for all workers."""

    def __init__(self, workers: Workers) -> None:
        super().__init__(None, token=workers.token, stopping=workers.stop)
        self._workers = workers
        self._certificate_expiry: dict[str, float] = {}  # its own listener's, by listener

    def note_certificate(self, listener: str, expires_at: float) -> None:
        """When the certificate this listener presents expires (at start, after a reload)."""
        self._certificate_expiry[listener] = expires_at

    async def readiness(self) -> tuple[int, dict[str, object]]:
        if self._workers.stop.is_set():
            return 503, {"status": "not ready", "reason": "draining"}
        answers = await self._workers.ask_workers("/readyz")
        workers = {str(number): _document(body) for number, (_, body) in answers.items()}
        total = self._workers.count
        if len(answers) < total or any(status != 200 for status, _ in answers.values()):
            reason = f"{sum(s == 200 for s, _ in answers.values())} of {total} workers ready"
            return 503, {"status": "not ready", "reason": reason, "workers": workers}
        return 200, {"status": "ready", "workers": workers}

    async def metrics(self) -> bytes:
        answers = await self._workers.ask_workers("/metrics")
        failed = [body.decode() for status, body in answers.values() if status != 200]
        if failed:
            raise AdminUnavailable(f"a worker's metrics could not be read: {failed[0]}")
        families = merge_scrapes(body.decode() for _, body in answers.values())
        _add_expiry(families, self._certificate_expiry)
        return generate_latest(_Families([*families, *self._own_metrics(len(answers))]))

    def _own_metrics(self, listening: int) -> list[Metric]:
        return [
            GaugeMetricFamily("tproxy_workers", "Worker processes listening.", value=listening),
            CounterMetricFamily(
                "tproxy_worker_restarts",
                "Workers restarted after they exited on their own.",
                value=self._workers.restarts,
            ),
        ]

    async def inflight(self, tenants: bool) -> dict[str, object]:
        path = "/inflight?tenants=1" if tenants else "/inflight"
        answers = await self._workers.ask_workers(path)
        exchanges: list[dict[str, object]] = []
        for number, (status, body) in sorted(answers.items()):
            if status != 200:
                raise AdminUnavailable(f"worker {number} did not list its exchanges")
            listed = _document(body).get("exchanges", [])
            for exchange in listed if isinstance(listed, list) else []:
                exchanges.append({**exchange, "worker": number})
        exchanges.sort(key=_age, reverse=True)
        return {"count": len(exchanges), "exchanges": exchanges}


def _age(exchange: dict[str, object]) -> float:
    age = exchange.get("age_s")
    return float(age) if isinstance(age, int | float) else 0.0


def _document(body: bytes) -> dict[str, object]:
    try:
        document = json.loads(body)
    except ValueError:
        return {"error": body.decode(errors="replace")}
    return document if isinstance(document, dict) else {"error": "not a JSON object"}


def _add_expiry(families: list[Metric], expiry: Mapping[str, float]) -> None:
    """Add the supervisor's own listeners' certificate expiry to the workers' family of that
    name, or start that family when the workers have none (their proxy listener is plain)."""
    name = "tproxy_tls_certificate_expiry_timestamp_seconds"
    family = next((each for each in families if each.name == name), None)
    for listener, expires_at in expiry.items():
        if family is None:
            family = Metric(
                name, "When the certificate a TLS listener presents expires, Unix time.", "gauge"
            )
            families.append(family)
        family.add_sample(name, {"listener": listener}, expires_at)


def merge_scrapes(scrapes: Iterable[str]) -> list[Metric]:
    """The workers' metrics as one process's: each series (name and labels) summed across the
    workers, histograms bucket by bucket; the store's and the build's gauges (the same in every
    worker) taken once, and ``process_start_time_seconds`` and each certificate's expiry the
    earliest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in scrapes:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            series = values.setdefault(merged.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = series.get(key)
                if seen is None:
                    series[key] = sample.value
                elif family.name in _SHARED_GAUGES:
                    series[key] = max(seen, sample.value)
                elif family.name in _EARLIEST:
                    series[key] = min(seen, sample.value)
                else:
                    series[key] = seen + sample.value
    for name, merged in families.items():
        merged.samples = [
            Sample(sample_name, dict(labels), value)
            for (sample_name, labels), value in values[name].items()
        ]
    return list(families.values())


@dataclass(frozen=True, slots=True)
class _Families:
    """Metric families ready for ``generate_latest``, which asks for a ``collect()``."""

    metrics: list[Metric]

    def collect(self) -> Iterable[Metric]:
        return iter(self.metrics)
