"""The supervisor's side of the workers' admin listeners: one GET to each, and the answers merged.

The workers here are fake admin listeners on 127.0.0.1 (``tests/h11peer.py``); the whole service,
real processes included, is ``tests/test_workers.py``'s.
"""

from __future__ import annotations

import pytest
import trio

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_on_loopback
from tproxy import workers_admin
from tproxy.workers_admin import AdminCallFailed, admin_get, ask_workers, merge_scrapes


async def start_worker_admin(nursery: trio.Nursery, *, silent: bool = False) -> str:
    """A worker's admin listener that echoes the path and the Authorization it got, as JSON (or
    reads the request and never answers)."""

    async def answer(peer: Peer, request: SeenRequest) -> None:
        if silent:
            await peer.wait_for_close()
            return
        body = b'{"path": "%s", "authorization": "%s"}' % (
            request.target.encode(),
            request.headers.get("authorization", "").encode(),
        )
        headers = [(b"Content-Type", b"application/json")]
        await peer.respond(200, [*headers, (b"Content-Length", b"%d" % len(body))], body)

    port = await nursery.start(serve_on_loopback, connection_handler(answer))
    return f"http://127.0.0.1:{port}"


async def test_a_get_returns_the_status_and_body_and_carries_the_token(
    nursery: trio.Nursery,
) -> None:
    url = await start_worker_admin(nursery)
    status, body = await admin_get(url, "/inflight?tenants=1", "s3cret")
    assert (status, body) == (
        200,
        b'{"path": "/inflight?tenants=1", "authorization": "Bearer s3cret"}',
    )
    _, untokened = await admin_get(url, "/metrics", None)
    assert b'"authorization": ""' in untokened


async def test_each_worker_that_gives_no_answer_is_named_with_the_reason(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_admin, "ADMIN_CALL_TIMEOUT", 0.2)
    with trio.socket.socket() as unlistened:
        await unlistened.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        admins = {
            1: await start_worker_admin(nursery),
            2: f"http://127.0.0.1:{unlistened.getsockname()[1]}",
            3: await start_worker_admin(nursery, silent=True),
        }
        answers = await ask_workers(admins, "/readyz", None)
    assert answers[1][0] == 200
    assert answers[2][0] == 0
    assert answers[2][1].startswith(b"worker 2: ")
    assert answers[3] == (0, b"worker 3: no answer within 0.2s")


async def test_an_answer_over_the_limit_is_refused(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_admin, "MAX_ADMIN_ANSWER", 10)
    url = await start_worker_admin(nursery)
    with pytest.raises(AdminCallFailed, match="an answer larger than 10 bytes"):
        await admin_get(url, "/metrics", None)


def test_merged_metrics_add_up_series_and_take_shared_gauges_once() -> None:
    scrape = """\
# HELP tproxy_requests_total Requests.
# TYPE tproxy_requests_total counter
tproxy_requests_total{cache="hit"} %d
# HELP tproxy_ttfb_seconds Time to first byte.
# TYPE tproxy_ttfb_seconds histogram
tproxy_ttfb_seconds_bucket{le="0.1"} %d
tproxy_ttfb_seconds_bucket{le="+Inf"} %d
tproxy_ttfb_seconds_sum 0.5
tproxy_ttfb_seconds_count %d
# HELP tproxy_cache_entries Entries.
# TYPE tproxy_cache_entries gauge
tproxy_cache_entries 7
# HELP process_start_time_seconds Start time.
# TYPE process_start_time_seconds gauge
process_start_time_seconds %d
"""
    families = {
        family.name: {(s.name, tuple(s.labels.items())): s.value for s in family.samples}
        for family in merge_scrapes([scrape % (1, 1, 2, 2, 100), scrape % (3, 2, 2, 2, 90)])
    }
    assert families["tproxy_requests"] == {("tproxy_requests_total", (("cache", "hit"),)): 4}
    assert families["tproxy_ttfb_seconds"] == {
        ("tproxy_ttfb_seconds_bucket", (("le", "0.1"),)): 3,
        ("tproxy_ttfb_seconds_bucket", (("le", "+Inf"),)): 4,
        ("tproxy_ttfb_seconds_sum", ()): 1.0,
        ("tproxy_ttfb_seconds_count", ()): 4,
    }
    assert families["tproxy_cache_entries"] == {("tproxy_cache_entries", ()): 7}
    assert families["process_start_time_seconds"] == {("process_start_time_seconds", ()): 90}
