"""What the app hands the pipeline for one request, and what it hands back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tproxy.core.entry import StoredEntry
from tproxy.core.headers import Header


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A client request, read whole and validated, ready to be sent upstream."""

    request_id: bytes
    method: str
    target: str
    headers: list[Header]
    body: bytes
    client_host: str | None
    scheme: str
    upstreams: tuple[str, ...]
    retries: int
    total_timeout: float


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How to store this request's answer if it completes cleanly, and whether to share it."""

    key: str
    ttl: float
    max_entry_bytes: int
    model: str | None
    shared: bool
    ignore_upstream_no_store: bool = False  # the route stores what the upstream says not to


@dataclass(slots=True)
class CacheReport:
    """What became of caching for one flight, for logs and metrics."""

    stored: bool = False
    reason: str = "not attempted"
    usage: Mapping[str, object] | None = None
    entry: StoredEntry | None = None  # handed to the store writer, maybe not yet committed

    @property
    def attempted(self) -> bool:
        """Whether the answer was meant for the store at all."""
        return self.reason != "not attempted"
