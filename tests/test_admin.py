"""The admin listener: health, readiness, metrics, the exchanges in flight, and its token.

The app is called directly as an ASGI callable: its answers are small and whole, and nothing
here streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tproxy.admin import AdminApp, read_admin_token
from tproxy.config import (
    AdminSettings,
    CacheSettings,
    LogSettings,
    ServerSettings,
    Settings,
)
from tproxy.core.cachestatus import CacheStatus, Forward
from tproxy.core.errors import ConfigError
from tproxy.core.events import (
    Classified,
    FollowerJoined,
    HeadersReceived,
    Identified,
    ResponseFinished,
    UpstreamEnded,
    UpstreamRequested,
)
from tproxy.core.exchange import Exchange
from tproxy.inflight import Inflight
from tproxy.store import LmdbStore
from tproxy.telemetry import ExchangeRecord, Telemetry, tenant_label

TOKEN = "admin-secret-token"
SETTINGS = Settings(
    server=ServerSettings(),
    cache=CacheSettings(),
    log=LogSettings(),
    upstreams=(),
    routes=(),
    source="test",
)


class Reply:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


async def request(
    app: AdminApp,
    path: str,
    *,
    query: bytes = b"",
    token: str | None = None,
    method: str = "GET",
) -> Reply:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    scope["headers"] = headers
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[arg-type]
    start, body = sent
    assert body["more_body"] is False
    headers_sent = start["headers"]
    assert isinstance(headers_sent, list)
    status, content = start["status"], body["body"]
    assert isinstance(status, int)
    assert isinstance(content, bytes)
    return Reply(status, dict(headers_sent), content)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    opened = LmdbStore(tmp_path / "store", max_total_bytes=1 << 20, max_entry_bytes=1 << 16)
    yield opened
    opened.close()


def streaming_exchange(
    request_id: str,
    *,
    tenant: str | None = None,
    model: str | None = None,
    cache_status: CacheStatus | None = None,
) -> Exchange:
    exchange = Exchange(request_id, trio.current_time(), method="POST", path="/v1/chat/completions")
    if tenant is not None:
        exchange.handle(Identified(tenant), trio.current_time())
    if cache_status is not None:
        exchange.handle(Classified(model, cache_status), trio.current_time())
    exchange.handle(UpstreamRequested("local", 1), trio.current_time())
    exchange.handle(HeadersReceived(200), trio.current_time())
    exchange.note_upstream_chunk(300, trio.current_time())
    exchange.note_delivered(300)
    exchange.note_events(4)
    return exchange


# --- health and readiness ----------------------------------------------------------------------


async def test_healthz_says_the_process_answers() -> None:
    reply = await request(AdminApp(None), "/healthz")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert reply.headers[b"cache-control"] == b"no-store"


async def test_readyz_is_ready_with_an_open_store_and_without_a_cache(store: LmdbStore) -> None:
    reply = await request(AdminApp(store), "/readyz")
    assert (reply.status, reply.json()) == (200, {"status": "ready", "cache": "open", "entries": 0})
    reply = await request(AdminApp(None), "/readyz")
    assert (reply.status, reply.json()["cache"]) == (200, "disabled")


async def test_readyz_is_not_ready_once_the_store_is_closed(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "s", max_total_bytes=1 << 20, max_entry_bytes=1 << 16)
    store.close()
    reply = await request(AdminApp(store), "/readyz")
    assert (reply.status, reply.json()["status"]) == (503, "not ready")


async def test_readyz_is_not_ready_while_the_server_drains(store: LmdbStore) -> None:
    stopping = trio.Event()
    app = AdminApp(store, stopping=stopping)
    assert (await request(app, "/readyz")).status == 200
    stopping.set()
    reply = await request(app, "/readyz")
    assert (reply.status, reply.json()) == (503, {"status": "not ready", "reason": "draining"})


async def test_unknown_paths_and_other_methods_are_refused() -> None:
    assert (await request(AdminApp(None), "/nope")).status == 404
    assert (await request(AdminApp(None), "/healthz", method="POST")).status == 405


async def test_head_gets_the_headers_without_the_body() -> None:
    reply = await request(AdminApp(None), "/healthz", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers[b"content-length"] == b"16"


async def test_without_telemetry_or_inflight_those_endpoints_do_not_exist() -> None:
    assert (await request(AdminApp(None), "/metrics")).status == 404
    assert (await request(AdminApp(None), "/inflight")).status == 404


# --- metrics -----------------------------------------------------------------------------------


async def test_metrics_are_prometheus_text_and_move_as_exchanges_finish(
    store: LmdbStore,
) -> None:
    inflight = Inflight()
    telemetry = Telemetry(SETTINGS, inflight=inflight, store=store)
    app = AdminApp(store, inflight=inflight, telemetry=telemetry)

    def requests_total(body: bytes) -> float:
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "tproxy_requests_total" and sample.labels["state"] == "completed":
                    return sample.value
        return 0.0

    before = await request(app, "/metrics")
    assert before.status == 200
    assert before.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert requests_total(before.body) == 0
    exchange = streaming_exchange("r1")
    exchange.handle(UpstreamEnded(), trio.current_time())
    exchange.handle(ResponseFinished(), trio.current_time())
    record = ExchangeRecord.from_exchange(
        exchange,
        route=None,
        bytes_in=1,
        usage=None,
        cache_outcome=None,
        now_unix=0.0,
    )
    telemetry.exchange_finished(record)
    telemetry.exchange_finished(record)
    assert requests_total((await request(app, "/metrics")).body) == 2


# --- in flight ---------------------------------------------------------------------------------


async def test_inflight_shows_a_live_exchange_and_not_after_it_leaves(
    autojump_clock: trio.abc.Clock,
) -> None:
    inflight = Inflight()
    app = AdminApp(None, inflight=inflight)
    exchange = streaming_exchange(
        "live-1", model="m1", tenant="a" * 32, cache_status=CacheStatus.forwarded(Forward.MISS)
    )
    for _ in range(2):  # two identical requests joined the flight it opened
        exchange.handle(FollowerJoined(), trio.current_time())
    with inflight.track(exchange):
        await trio.sleep(1.5)  # the autojump clock: the exchange is 1.5 s old
        document = (await request(app, "/inflight")).json()
    assert document == {
        "count": 1,
        "exchanges": [
            {
                "request_id": "live-1",
                "state": "streaming",
                "age_s": 1.5,
                "method": "POST",
                "path": "/v1/chat/completions",
                "client": None,
                "upstream": "local",
                "model": "m1",
                "status": 200,
                "cache_status": "tproxy; fwd=miss",
                "bytes_out": 300,
                "upstream_bytes": 300,
                "events": 4,
                "followers": 2,
            }
        ],
    }
    assert (await request(app, "/inflight")).json() == {"count": 0, "exchanges": []}


async def test_inflight_shows_the_tenant_hash_only_when_asked() -> None:
    inflight = Inflight()
    app = AdminApp(None, inflight=inflight)
    namespace = "b" * 32
    with inflight.track(streaming_exchange("t1", tenant=namespace)):
        plain = (await request(app, "/inflight")).json()
        asked = (await request(app, "/inflight", query=b"tenants=1")).json()
    assert "tenant" not in plain["exchanges"][0]  # type: ignore[index]
    tenant = asked["exchanges"][0]["tenant"]  # type: ignore[index]
    assert tenant == tenant_label(namespace)
    assert namespace not in json.dumps(asked)


# --- the admin token ---------------------------------------------------------------------------


async def test_with_a_token_a_request_without_one_is_refused() -> None:
    reply = await request(AdminApp(None, token=TOKEN), "/readyz")
    assert reply.status == 401
    assert reply.headers[b"www-authenticate"].startswith(b"Bearer")
    assert TOKEN.encode() not in reply.body


async def test_the_right_token_is_accepted_and_a_wrong_one_refused() -> None:
    inflight = Inflight()
    app = AdminApp(None, inflight=inflight, token=TOKEN)
    assert (await request(app, "/inflight", token=TOKEN)).status == 200
    wrong = await request(app, "/inflight", token=TOKEN + "x")
    assert wrong.status == 403
    assert TOKEN.encode() not in wrong.body
    assert (await request(app, "/inflight", token="")).status == 403


async def test_healthz_stays_open_for_probes_that_cannot_send_a_token() -> None:
    assert (await request(AdminApp(None, token=TOKEN), "/healthz")).status == 200


def test_the_token_is_read_from_the_variable_the_settings_name() -> None:
    settings = Settings(
        server=ServerSettings(),
        cache=CacheSettings(),
        log=LogSettings(),
        upstreams=(),
        routes=(),
        source="test",
        admin=AdminSettings(token_env="TPROXY_ADMIN_TOKEN"),
    )
    assert read_admin_token(settings, {"TPROXY_ADMIN_TOKEN": TOKEN}) == TOKEN
    assert read_admin_token(SETTINGS, {"TPROXY_ADMIN_TOKEN": TOKEN}) is None
    with pytest.raises(ConfigError, match="TPROXY_ADMIN_TOKEN is not set"):
        read_admin_token(settings, {})
    with pytest.raises(ConfigError):
        read_admin_token(settings, {"TPROXY_ADMIN_TOKEN": ""})
