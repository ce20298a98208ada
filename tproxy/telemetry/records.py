"""What one finished exchange was, as the access log, the payload log and the metrics see it.

An :class:`ExchangeRecord` is built once, from the exchange in its terminal state, and holds no
credential: the tenant is hashed again (:func:`tenant_label`) and the query string is cut off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from tproxy.core.assemble import normalise_usage
from tproxy.core.cachekey import ANONYMOUS, SHARED
from tproxy.core.cachestatus import CacheStatus
from tproxy.core.exchange import Exchange, State

_MAX_REASON_CHARS = 300
_TIMEOUT_PHASES = frozenset({"connect", "first_byte", "idle", "total"})
_TENANT_DOMAIN = b"tproxy/log-tenant\x00"
_TENANT_HEX_DIGITS = 12


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
    cache_status: CacheStatus | None
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
            collapsed=exchange.collapsed,
            upstream_answered=State.STREAMING in exchange.history,
        )

    def to_json(self) -> dict[str, object]:
        """The access log's fields, in their documented order."""
        return {
            "time": iso_time(self.time),
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "upstream": self.upstream,
            "model": self.model,
            "status": self.status,
            "cache_status": None if self.cache_status is None else self.cache_status.text,
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
        parts.append(f"cache={cache_label(self.cache_status)}")
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


def cache_label(cache_status: CacheStatus | None) -> str:
    """An exchange's Cache-Status as one word for a metric label or a console line: its
    :attr:`~tproxy.core.cachestatus.CacheStatus.label`, or ``none`` when the cache was not
    asked (the request was refused before)."""
    return "none" if cache_status is None else cache_status.label


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


def iso_time(unix: float) -> str:
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
