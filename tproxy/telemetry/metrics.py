"""The Prometheus metrics: counters moved by each finished exchange, and figures read at scrape.

Metrics live on a :class:`prometheus_client.CollectorRegistry` of this instance (no global
state), exposed without ``_created`` series, with the process's own figures (``process_*``) and
``tproxy_build_info``. Counters move in :meth:`Metrics.count`; labels that name a route or an
upstream take names from the configuration only. What other parts own (in-flight exchanges, the
store, the store writer, the sinks' own counts) is read when ``/metrics`` is scraped, by a custom
collector, through the small protocols below: telemetry needs their figures, not their classes.
docs/telemetry.md lists every metric.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

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

from tproxy import __version__
from tproxy.config import Settings
from tproxy.core.breaker import BreakerState
from tproxy.core.errors import StoreError
from tproxy.core.exchange import Exchange, State
from tproxy.store import LATENCY_BUCKETS, SharedStatistics, StoreStats
from tproxy.telemetry.records import ExchangeRecord, cache_label, upstream_error_kind
from tproxy.telemetry.sinks import Sink

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_MAX_LABEL_CHARS = 128
_MAX_MODEL_LABELS = 64
_MAX_OUTCOME_LABELS = 16
_SAVING_CACHE_LABELS = frozenset({"hit", "collapsed"})
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class InflightView(Protocol):
    """What the metrics read of the exchanges in flight (:class:`tproxy.inflight.Inflight`)."""

    def snapshot(self) -> Sequence[Exchange]: ...


class StoreView(Protocol):
    """What the metrics read of the cache store; ``stats`` may raise :class:`StoreError`."""

    def stats(self) -> StoreStats: ...


class SharedTierView(Protocol):
    """What the metrics read of the shared tier (:class:`tproxy.store.SharedTier`)."""

    def statistics(self) -> SharedStatistics: ...


class StoreWriterStatisticsView(Protocol):
    @property
    def batches(self) -> int: ...

    def outcomes(self) -> Mapping[str, int]: ...


class StoreWriterView(Protocol):
    """What the metrics read of the store writer (:class:`tproxy.storewriter.StoreWriter`)."""

    @property
    def shared(self) -> SharedTierView | None: ...

    def statistics(self) -> StoreWriterStatisticsView: ...


class Metrics:
    """The registry of one server, and the counters each finished exchange moves."""

    def __init__(
        self,
        settings: Settings,
        *,
        inflight: InflightView | None,
        store: StoreView | None,
        store_writer: StoreWriterView | None,
        sinks: Sequence[Sink],
    ) -> None:
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
        self.registry.register(_ScrapeCollector(inflight, store, store_writer, sinks))
        self._request_series = _Series(self._requests.labels)
        self._ttfb_series = _Series(self._ttfb.labels)
        self._duration_series = _Series(self._duration.labels)
        self._upstream_error_series = _Series(self._upstream_errors.labels)
        self._token_series = _Series(self._tokens.labels)
        self._saved_token_series = _Series(self._saved_tokens.labels)

    def text(self) -> bytes:
        """The metrics in the Prometheus text format (:data:`METRICS_CONTENT_TYPE`)."""
        return generate_latest(self._exposed)

    def note_certificate(self, listener: str, expires_at: float) -> None:
        """Record when the certificate ``listener`` (``proxy`` or ``admin``) presents expires."""
        self._certificate_expiry.labels(listener=listener).set(expires_at)

    def note_background_completion(self, outcome: str) -> None:
        """Count an answer finished in the background (``stored``, ``failed``, ``timed_out``...)."""
        self._background.labels(outcome=self._outcomes(outcome)).inc()

    def count(self, record: ExchangeRecord) -> None:
        """Move the counters and histograms ``record`` concerns."""
        cache = cache_label(record.cache_status)
        route = self._routes(record.route)
        upstream = self._upstreams(record.upstream)
        self._request_series(record.state, cache, route, upstream).inc()
        source = "cache" if cache == "hit" else "upstream" if record.upstream else "proxy"
        if record.ttfb is not None:
            self._ttfb_series(source, route, upstream).observe(record.ttfb)
        if record.duration is not None:
            self._duration_series(source, route, upstream).observe(record.duration)
        kind = upstream_error_kind(record)
        if kind is not None:
            self._upstream_error_series(kind, route, upstream).inc()
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
                self._saved_token_series(model, kind, cache).inc(count)
            else:
                self._token_series(model, kind).inc(count)


_Child = TypeVar("_Child")


class _Series(Generic[_Child]):
    """A labelled metric's children, each looked up in prometheus-client once.

    Its ``labels()`` checks and converts the values and takes a lock on every call, five times
    per request; every label here has a bounded set of values (configured names, enumerations,
    :class:`_Labels`), so this dict stays as small as the metric itself.
    """

    def __init__(self, labels: Callable[..., _Child]) -> None:
        self._labels = labels
        self._children: dict[tuple[str, ...], _Child] = {}

    def __call__(self, *values: str) -> _Child:
        """The child for ``values``, in the order of the metric's label names."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._labels(*values)
        return child


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
        inflight: InflightView | None,
        store: StoreView | None,
        store_writer: StoreWriterView | None,
        sinks: Sequence[Sink],
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
        for outcome, count in stats.outcomes().items():
            entries.add_metric([outcome], count)
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
