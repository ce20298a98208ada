"""The ASGI application: read and check a request, answer from the cache or open an exchange.

Everything that can be refused is refused here, before any upstream is involved: targets that
are not origin-form (tproxy is never an open proxy), bodies over ``server.max_body_bytes`` (413
before reading the rest), requests no route accepts. A refusal decided before the body is
wholly read closes an HTTP/1.1 connection: what follows could be that body or a next request,
depending on whose framing one believes. Answers from the cache are replayed in one body message:
a cache hit has nothing to wait for, and each ASGI message has a fixed cost.

The cache has one or two tiers: the local store, read inline (microseconds), then, when it has
nothing usable and ``[shared_store]`` is configured, the shared tier, under its own short
deadline. A shared hit is replayed the same way, its ``Cache-Status`` says ``detail=shared``, and
it is copied into the local store off the client's path.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import trio

from tproxy.asgi import DEPARTURE, ASGIReceive, ASGISend, Message, Scope, send_whole
from tproxy.config import CacheSettings, RouteSettings, Settings
from tproxy.core.body import BodyMemo, RequestBody
from tproxy.core.cachekey import CacheDecision, Verdict, decide, tenant_namespace
from tproxy.core.cachestatus import CacheStatus, Forward
from tproxy.core.clientauth import ClientKeys
from tproxy.core.dialects import dialect_for
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import RequestRejected
from tproxy.core.events import (
    CacheHit,
    Classified,
    ClientGone,
    Identified,
    InternalError,
    Rejected,
    ResponseFinished,
    ShutDown,
)
from tproxy.core.exchange import Exchange
from tproxy.core.headers import Header, client_request_id, header_value
from tproxy.core.target import check_request_line
from tproxy.inflight import Inflight
from tproxy.pipeline import CachePlan, CacheReport, Exchanger, ProxyRequest, send_error
from tproxy.routing import choose_route, needs_model
from tproxy.store import CacheStore, CacheTier, LocalTier, SharedTier, look_up
from tproxy.telemetry import ExchangeRecord, PayloadCapture, Telemetry

_BYPASS = {
    Verdict.DISABLED: Forward.BYPASS,
    Verdict.METHOD: Forward.BYPASS,
    Verdict.PATH: Forward.BYPASS,
    Verdict.NO_STORE: Forward.REQUEST,
}


class _ClientLeftError(Exception):
    """The client disconnected while its request body was being read."""


class _RefusedUnread(RequestRejected):
    """A refusal decided before the request's body was wholly and unambiguously read.

    What follows on the connection cannot be told apart from that body, so the answer closes it
    (RFC 9112 §6.3, §9.6): nothing the client sent after this head is ever parsed as a request.
    """


@dataclass(frozen=True, slots=True)
class _Lookup:
    """The cache's answer for one request: an entry to replay, or how to go upstream."""

    entry: StoredEntry | None
    age: float
    plan: CachePlan | None
    cache_status: CacheStatus
    refuse_miss: bool = False  # only-if-cached and nothing usable is stored
    model: str | None = None


class ProxyApp:
    """The proxy's ASGI entry point; one instance serves every request of a server."""

    def __init__(
        self,
        settings: Settings,
        exchanger: Exchanger,
        store: CacheStore | None,
        inflight: Inflight,
        telemetry: Telemetry,
        client_keys: ClientKeys | None = None,
        shared: SharedTier | None = None,
    ) -> None:
        self._settings = settings
        self._client_keys = client_keys
        self._inflight = inflight
        self._telemetry = telemetry
        self._exchanger = exchanger
        self._store = store
        # The tiers a lookup asks, in order; tier 1 includes answers not yet committed.
        self._tiers: list[CacheTier] = []
        if store is not None:
            self._tiers.append(LocalTier(store, landed=exchanger.landed_answer))
            if shared is not None:
                self._tiers.append(shared)
        self._model_routing = needs_model(settings.routes)
        self._bodies = BodyMemo()  # a repeated body (a cache hit) is not parsed again
        self.handled = 0  # HTTP requests finished, for the server's status line

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        # One coroutine from here to the exchange's (a frame per level is held for the whole of
        # a stream: docs/benchmarks.md, memory per open stream).
        if scope["type"] == "websocket":  # refused in _read_request, answered as HTTP
            send = _websocket_denial(send)
        elif scope["type"] != "http":
            return
        headers: list[Header] = scope["headers"]
        request_id = client_request_id(headers) or uuid.uuid4().hex.encode()
        client = scope.get("client")
        exchange = Exchange(
            request_id.decode(),
            trio.current_time(),
            method=scope.get("method", "GET"),  # a WebSocket's scope has none
            path=scope["path"],
            client=client[0] if client else None,
        )
        try:
            with self._inflight.track(exchange):
                await self._serve_exchange(scope, receive, send, exchange, request_id)
        finally:
            if scope["type"] == "http":
                self.handled += 1

    async def _serve_exchange(
        self,
        scope: Scope,
        receive: ASGIReceive,
        send: ASGISend,
        exchange: Exchange,
        request_id: bytes,
    ) -> None:
        report: CacheReport | None = None
        capture: PayloadCapture | None = None
        route_name: str | None = None
        replayed: StoredEntry | None = None
        bytes_in = 0
        try:
            try:
                request, route, body, model = await self._read_request(scope, receive, request_id)
            except RequestRejected as rejection:
                exchange.handle(Rejected(rejection.status, rejection.code), trio.current_time())
                close = isinstance(rejection, _RefusedUnread) and scope["http_version"] != "2"
                await send_error(_closing(send) if close else send, rejection, request_id, None)
                return
            except _ClientLeftError:
                exchange.handle(ClientGone(), trio.current_time())
                return
            route_name = route.name
            bytes_in = len(request.body)
            capture = self._telemetry.capture(
                request.body, dialect_for(request.target.partition("?")[0])
            )
            # The credential's hash, once: the exchange's tenant and the cache key's namespace.
            tenant = tenant_namespace(request.headers, shared=False)
            exchange.handle(Identified(tenant), trio.current_time())
            lookup = await self._look_up(request, route, body, tenant)
            exchange.handle(
                Classified(lookup.model or model, lookup.cache_status), trio.current_time()
            )
            if lookup.entry is not None:
                replayed = lookup.entry
                exchange.handle(CacheHit(lookup.age), trio.current_time())
                await replay(send, lookup.entry, request_id, lookup.age, lookup.cache_status)
                exchange.note_delivered(lookup.entry.body_size)
                exchange.handle(ResponseFinished(), trio.current_time())
                if capture is not None:
                    capture.observe_entry(lookup.entry, self._settings.cache.max_line_bytes)
                return
            if lookup.refuse_miss:
                refusal = RequestRejected(504, "not_cached", "only-if-cached: no stored answer")
                exchange.handle(Rejected(504, "not_cached"), trio.current_time())
                await send_error(send, refusal, request_id, lookup.cache_status.header)
                return
            report = await self._exchanger.run(
                request, exchange, scope["extensions"][DEPARTURE], send, lookup.plan, capture
            )
        except BaseException as error:
            # Every exchange ends once in a known state, even on the way out of an exception:
            # a cancellation from outside is the server shutting down; anything else is a bug.
            if not exchange.finished:
                ending = (
                    ShutDown() if _only_cancelled(error) else InternalError(type(error).__name__)
                )
                exchange.handle(ending, trio.current_time())
            raise
        finally:
            record = ExchangeRecord.from_exchange(
                exchange,
                route=route_name,
                bytes_in=bytes_in,
                usage=(
                    replayed.usage
                    if replayed is not None
                    else report.usage
                    if report is not None
                    else None
                ),
                cache_outcome=report.reason if report is not None and report.attempted else None,
                now_unix=time.time(),
            )
            self._telemetry.exchange_finished(
                record, capture.finish() if capture is not None else None
            )

    async def _read_request(
        self, scope: Scope, receive: ASGIReceive, request_id: bytes
    ) -> tuple[ProxyRequest, RouteSettings, RequestBody, str | None]:
        """Validate the request line and headers, read the body, choose the route.

        Returns the request, its route, its body (parsed at most once, from here on) and the
        model routing read from it (None when no route matches on models).

        Raises :class:`RequestRejected` for anything the proxy refuses, :class:`_ClientLeftError`
        if the client disconnects while sending its body.
        """
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        method: str = scope.get("method", "GET")
        headers: list[Header] = scope["headers"]
        try:
            refusal = (
                RequestRejected(400, "websocket_refused", "tproxy does not proxy WebSockets")
                if scope["type"] == "websocket"
                else self._check_head_size(scope, method, raw_path, headers)
                or check_request_line(method, raw_path, headers)
            )
            if refusal is None and self._client_keys is not None:
                refusal = self._client_keys.check(headers)
            if refusal is not None:
                raise refusal
            data = await self._read_body(headers, receive)
        except RequestRejected as early:
            raise _RefusedUnread(early.status, early.code, early.message) from None
        path = raw_path.decode("latin-1")
        body = RequestBody(path, data, self._settings.cache.ignore_fields, self._bodies)
        model = body.model if self._model_routing else None
        route = choose_route(self._settings.routes, path, model)
        if route is None:
            raise RequestRejected(404, "no_route", f"no route accepts {method} {path}")
        query: bytes = scope.get("query_string", b"")
        target = path + ("?" + query.decode("latin-1") if query else "")
        client = scope.get("client")
        request = ProxyRequest(
            request_id=request_id,
            method=method,
            target=target,
            headers=headers,
            body=data,
            client_host=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            upstreams=route.upstreams,
            retries=route.retries,
            total_timeout=self._settings.upstream(route.upstreams[0]).total_timeout,
        )
        return request, route, body, model

    def _check_head_size(
        self, scope: Scope, method: str, raw_path: bytes, headers: list[Header]
    ) -> RequestRejected | None:
        """431 when the head is larger than ``server.max_header_bytes``.

        Hypercorn's parser only bounds a head it has not yet read whole, and it reads 64 KiB at a
        time, so a head that arrives in one read could reach twice the limit. Counted here as
        HTTP/1.1 writes it: ``METHOD SP target SP HTTP/1.1 CRLF``, each ``name: value CRLF``, the
        final CRLF (whitespace h11 strips and obs-folds it unfolds are not counted).
        """
        limit = self._settings.server.max_header_bytes
        query: bytes = scope.get("query_string", b"")
        target = len(raw_path) + (1 + len(query) if query else 0)
        size = len(method) + 1 + target + len(" HTTP/1.1\r\n") + 2
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size <= limit:
            return None
        return RequestRejected(
            431,
            "header_too_large",
            f"request line and headers larger than server.max_header_bytes ({limit})",
        )

    async def _read_body(self, headers: list[Header], receive: ASGIReceive) -> bytes:
        limit = self._settings.server.max_body_bytes
        declared = header_value(headers, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestRejected(400, "bad_content_length", "Content-Length is not a number")
            if int(declared) > limit:
                raise _too_large(limit)
        parts: list[bytes] = []
        size = 0
        # Hypercorn's idle timer stops once the head is in: the body needs a deadline of ours.
        # One deadline for the whole body, so one cancel scope (5-10 µs each) rather than one per
        # message: Hypercorn gives every body at least two, the last one empty.
        with trio.move_on_at(trio.current_time() + self._settings.server.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientLeftError
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(parts)
        raise RequestRejected(
            408,
            "request_timeout",
            f"the request body did not arrive within server.body_timeout"
            f" ({self._settings.server.body_timeout:g}s)",
        )

    async def _look_up(
        self, request: ProxyRequest, route: RouteSettings, body: RequestBody, tenant: str
    ) -> _Lookup:
        cache = self._settings.cache
        path, _, query = request.target.partition("?")
        decision = decide(
            enabled=cache.enabled and route.cache and self._store is not None,
            method=request.method,
            route=route.name,
            path=path,
            query=query,
            cacheable_paths=cache.paths,
            headers=request.headers,
            body=body,
            tenant=tenant,
            shared=cache.shared,
        )
        if decision.verdict is not Verdict.CACHEABLE or decision.key is None:
            bypass = _BYPASS.get(decision.verdict)
            status = (
                CacheStatus.forwarded(Forward.MISS, detail=decision.verdict.value)
                if bypass is None
                else CacheStatus.forwarded(bypass)
            )
            return _Lookup(None, 0.0, None, status, refuse_miss=decision.only_if_cached)
        fwd = Forward.MISS if decision.lookup else Forward.REQUEST
        if decision.lookup and self._tiers:
            now = time.time()
            max_age = decision.max_age
            found = await look_up(
                self._tiers, decision.key, now, lambda entry: _fresh_enough(entry, now, max_age)
            )
            if found.entry is not None:
                if found.tier == 0:
                    return _hit(found.entry, now, decision, tier=None)
                self._keep_locally(decision.key, found.entry)
                return _hit(found.entry, now, decision, tier=self._tiers[found.tier].name)
            if found.stale:
                fwd = Forward.STALE
        status = CacheStatus.forwarded(fwd)
        if decision.only_if_cached:
            return _Lookup(None, 0.0, None, status, refuse_miss=True, model=decision.model)
        plan = _plan(cache, route, decision) if decision.store else None
        return _Lookup(None, 0.0, plan, status, model=decision.model)

    def _keep_locally(self, key: str, entry: StoredEntry) -> None:
        """Copy a shared hit into the local store, off the client's path (dropped when busy)."""
        writer = self._exchanger.store_writer
        if writer is not None:
            writer.submit(key, entry, share=False)


def _fresh_enough(entry: StoredEntry, now: float, max_age: float | None) -> bool:
    return max_age is None or max(0.0, now - entry.created_at) <= max_age


def _hit(entry: StoredEntry, now: float, decision: CacheDecision, tier: str | None) -> _Lookup:
    """A hit from the local store (``tier`` None) or from the tier ``tier`` names."""
    ttl = int(entry.expires_at - now) if entry.expires_at != float("inf") else None
    status = CacheStatus.hit(ttl, tier)
    return _Lookup(entry, max(0.0, now - entry.created_at), None, status, model=decision.model)


def _plan(cache: CacheSettings, route: RouteSettings, decision: CacheDecision) -> CachePlan:
    assert decision.key is not None
    return CachePlan(
        key=decision.key,
        ttl=route.ttl if route.ttl is not None else cache.default_ttl,
        max_entry_bytes=cache.max_entry_bytes,
        model=decision.model,
        shared=cache.coalesce and decision.lookup,
        ignore_upstream_no_store=route.ignore_upstream_no_store,
    )


def _only_cancelled(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation, alone or grouped by nurseries on its way out."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return isinstance(error, trio.Cancelled)


def _closing(send: ASGISend) -> ASGISend:
    """``send``, with ``Connection: close`` on the answer's head (Hypercorn then closes the
    connection once the answer is out); HTTP/2 streams need nothing: their framing is the
    frames'."""

    async def send_and_close(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
        await send(message)

    return send_and_close


def _websocket_denial(send: ASGISend) -> ASGISend:
    """``send`` for an answer to a WebSocket handshake given as a plain HTTP response (the ASGI
    ``websocket.http.response`` extension), so the client reads why it was refused."""

    async def send_denial(message: Message) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    return send_denial


def _too_large(limit: int) -> RequestRejected:
    return RequestRejected(
        413, "request_too_large", f"request body larger than server.max_body_bytes ({limit})"
    )


async def replay(
    send: ASGISend, entry: StoredEntry, request_id: bytes, age: float, cache_status: CacheStatus
) -> None:
    """Send a stored answer in one body message, byte for byte as the upstream sent it."""
    body = b"".join(entry.chunks)
    headers = [
        *entry.headers,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
        (b"age", str(int(age)).encode()),
        (b"cache-status", cache_status.header),
    ]
    await send_whole(send, entry.status, headers, body)
