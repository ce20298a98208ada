"""The admin listener: liveness, readiness, metrics and the exchanges in flight.

It is served on an address apart from the proxy's, loopback by default. Bound anywhere else it
must ask for a bearer token (``admin.token_env``; the configuration refuses to start without
one). ``/healthz`` stays open either way: it says only that the process answers, and probes
often cannot send a token.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from urllib.parse import parse_qs

import trio

from tproxy.asgi import ASGIReceive, ASGISend, Scope, send_whole
from tproxy.config import Settings
from tproxy.core.errors import ConfigError, StoreError, TproxyError
from tproxy.core.exchange import Exchange
from tproxy.core.headers import Header, header_value
from tproxy.inflight import Inflight
from tproxy.store import CacheStore
from tproxy.telemetry import METRICS_CONTENT_TYPE, Telemetry, tenant_label

_OPEN_PATHS = frozenset({"/healthz"})
_JSON = b"application/json"


def read_admin_token(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token from the variable ``admin.token_env`` names; None when none is named.

    Raises :class:`ConfigError` when the variable is named but unset or empty, so a server that
    should be protected fails at start rather than serving without a token.
    """
    name = settings.admin.token_env
    if name is None:
        return None
    token = (os.environ if environ is None else environ).get(name)
    if not token:
        raise ConfigError([f"admin.token_env: environment variable {name} is not set"])
    return token


class AdminApp:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/inflight``.

    ``/readyz`` is 503 once ``stopping`` is set (the server is draining) or when the store
    cannot be read; ``/metrics`` and ``/inflight`` answer 404 when built without ``telemetry``
    or ``inflight``.
    """

    def __init__(
        self,
        store: CacheStore | None,
        *,
        inflight: Inflight | None = None,
        telemetry: Telemetry | None = None,
        token: str | None = None,
        stopping: trio.Event | None = None,
    ) -> None:
        self._store = store
        self._inflight = inflight
        self._telemetry = telemetry
        self._token = None if token is None else token.encode()
        self._stopping = stopping

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        head = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await _reply_json(send, 405, {"error": "the admin endpoints answer GET only"}, head)
            return
        refusal = self._refusal(path, scope["headers"])
        if refusal is not None:
            status, message = refusal
            await _reply(
                send,
                status,
                json.dumps({"error": message}).encode(),
                _JSON,
                head,
                extra=[(b"www-authenticate", b'Bearer realm="tproxy admin"')],
            )
            return
        try:
            await self._answer(path, scope, send, head)
        except AdminUnavailable as unavailable:
            await _reply_json(send, 503, {"error": str(unavailable)}, head)

    async def _answer(self, path: str, scope: Scope, send: ASGISend, head: bool) -> None:
        if path == "/healthz":
            await _reply_json(send, 200, {"status": "ok"}, head)
        elif path == "/readyz":
            status, document = await self.readiness()
            await _reply_json(send, status, document, head)
        elif path == "/metrics" and (text := await self.metrics()) is not None:
            await _reply(send, 200, text, METRICS_CONTENT_TYPE, head)
        elif path == "/inflight" and (listing := await self.inflight(_tenants(scope))):
            await _reply_json(send, 200, listing, head)
        else:
            await _reply_json(send, 404, {"error": f"no admin endpoint {path}"}, head)

    def _refusal(self, path: str, headers: list[Header]) -> tuple[int, str] | None:
        """401 without a bearer token, 403 with a wrong one; None when the request may pass."""
        if self._token is None or path in _OPEN_PATHS:
            return None
        credential = header_value(headers, b"authorization")
        scheme, _, presented = (credential or b"").partition(b" ")
        if credential is None or scheme.lower() != b"bearer":
            return 401, "a bearer token is required"
        if not hmac.compare_digest(presented.strip(), self._token):
            return 403, "the bearer token is not the admin token"
        return None

    async def readiness(self) -> tuple[int, dict[str, object]]:
        """``/readyz``: its status code and document."""
        if self._stopping is not None and self._stopping.is_set():
            return 503, {"status": "not ready", "reason": "draining"}
        if self._store is None:
            return 200, {"status": "ready", "cache": "disabled"}
        try:
            stats = self._store.stats()
        except StoreError as error:
            return 503, {"status": "not ready", "cache": str(error)}
        return 200, {"status": "ready", "cache": "open", "entries": stats.entries}

    async def metrics(self) -> bytes | None:
        """``/metrics`` in the Prometheus text format; None: not served (404)."""
        return None if self._telemetry is None else self._telemetry.metrics_text()

    async def inflight(self, tenants: bool) -> dict[str, object] | None:
        """``/inflight``; the tenants' hashes only when asked for; None: not served (404)."""
        if self._inflight is None:
            return None
        now = trio.current_time()
        exchanges = sorted(self._inflight.snapshot(), key=lambda exchange: exchange.started_at)
        return {
            "count": len(exchanges),
            "exchanges": [_describe(exchange, now, tenants) for exchange in exchanges],
        }


def _tenants(scope: Scope) -> bool:
    """Whether ``/inflight?tenants=1`` asks for the tenants' hashes."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("tenants", ["0"])[-1] in ("1", "true", "yes")


class AdminUnavailable(TproxyError):
    """An endpoint cannot answer now (a worker did not): 503 with this message."""


def _describe(exchange: Exchange, now: float, tenants: bool) -> dict[str, object]:
    """One live exchange for ``/inflight``; the tenant's hash only when asked for."""
    document: dict[str, object] = {
        "request_id": exchange.request_id,
        "state": exchange.state.value,
        "age_s": round(max(0.0, now - exchange.started_at), 3),
        "method": exchange.method,
        "path": exchange.path.partition("?")[0],
        "client": exchange.client,
        "upstream": exchange.upstream,
        "model": exchange.model,
        "status": exchange.status,
        "cache_status": None if exchange.cache_status is None else exchange.cache_status.text,
        "bytes_out": exchange.delivered_bytes,
        "upstream_bytes": exchange.upstream_bytes,
        "events": exchange.events,
        "followers": exchange.followers,
    }
    if tenants:
        document["tenant"] = tenant_label(exchange.tenant)
    return document


async def _reply_json(send: ASGISend, status: int, document: object, head: bool) -> None:
    await _reply(send, status, json.dumps(document).encode(), _JSON, head)


async def _reply(
    send: ASGISend,
    status: int,
    body: bytes,
    content_type: bytes,
    head: bool,
    *,
    extra: list[Header] | None = None,
) -> None:
    headers: list[Header] = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(extra or []),
    ]
    await send_whole(send, status, headers, b"" if head else body)
