"""The supervisor's side of the workers' admin listeners: one GET to each, and the answers merged.

The workers here are fake admin listeners on 127.0.0.1 (``tests/h11peer.py``), or a fake
supervisor whose workers' answers are set by hand; the whole service, real processes included, is
``tests/test_workers.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_on_loopback
from tproxy import workers_admin
from tproxy.admin import AdminUnavailable
from tproxy.workers_admin import (
    AdminCallFailed,
    Answers,
    WorkersAdmin,
    admin_get,
    ask_workers,
    merge_scrapes,
)


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


@dataclass
class FakeWorkers:
    """The supervisor as the admin listener sees it, with each worker's answer set by hand."""

    answers: Answers
    count: int = 2
    token: str | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    restarts: int = 0
    asked: list[str] = field(default_factory=list)

    async def ask_workers(self, path: str) -> Answers:
        self.asked.append(path)
        return self.answers


async def test_the_service_is_ready_only_when_every_worker_is() -> None:
    ready = (200, b'{"status": "ready"}')
    both = WorkersAdmin(FakeWorkers({1: ready, 2: ready}))
    one_silent = WorkersAdmin(FakeWorkers({1: ready, 2: (0, b"worker 2: no answer within 2s")}))
    one_listening = WorkersAdmin(FakeWorkers({1: ready}))
    assert await both.readiness() == (
        200,
        {"status": "ready", "workers": {"1": {"status": "ready"}, "2": {"status": "ready"}}},
    )
    status, document = await one_silent.readiness()
    assert (status, document["reason"]) == (503, "1 of 2 workers ready")
    assert document["workers"] == {
        "1": {"status": "ready"},
        "2": {"error": "worker 2: no answer within 2s"},
    }
    assert (await one_listening.readiness())[0] == 503


async def test_exchanges_in_flight_are_joined_oldest_first_with_their_worker() -> None:
    workers = FakeWorkers(
        {
            1: (200, b'{"count": 1, "exchanges": [{"id": "a", "age_s": 1.5}]}'),
            2: (
                200,
                b'{"count": 2, "exchanges": [{"id": "b", "age_s": 3}, {"id": "c", "age_s": 0.1}]}',
            ),
        }
    )
    joined = await WorkersAdmin(workers).inflight(tenants=True)
    assert workers.asked == ["/inflight?tenants=1"]
    assert joined == {
        "count": 3,
        "exchanges": [
            {"id": "b", "age_s": 3, "worker": 2},
            {"id": "a", "age_s": 1.5, "worker": 1},
            {"id": "c", "age_s": 0.1, "worker": 2},
        ],
    }


async def test_a_worker_that_cannot_be_asked_makes_the_merged_answers_unavailable() -> None:
    admin = WorkersAdmin(FakeWorkers({1: (200, b""), 2: (0, b"worker 2: ConnectError")}))
    with pytest.raises(AdminUnavailable, match="worker 2: ConnectError"):
        await admin.metrics()
    with pytest.raises(AdminUnavailable, match="worker 2 did not list its exchanges"):
        await admin.inflight(tenants=False)


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


EXPIRY_SCRAPE = """\
# HELP tproxy_tls_certificate_expiry_timestamp_seconds When the certificate expires.
# TYPE tproxy_tls_certificate_expiry_timestamp_seconds gauge
tproxy_tls_certificate_expiry_timestamp_seconds{listener="proxy"} %d
"""


async def test_the_certificate_to_renew_first_is_reported_never_a_sum_of_dates() -> None:
    """Each worker reports its proxy certificate (one that reloaded a renewed file and one that
    could not may differ); the supervisor adds its own admin listener's, which no worker has."""
    workers = FakeWorkers(
        {
            1: (200, (EXPIRY_SCRAPE % 1_900_000_000).encode()),
            2: (200, (EXPIRY_SCRAPE % 1_800_000_000).encode()),
        }
    )
    admin = WorkersAdmin(workers)
    admin.note_certificate("admin", 1_850_000_000)
    scraped = {
        (sample.name, tuple(sample.labels.items())): sample.value
        for family in text_string_to_metric_families((await admin.metrics()).decode())
        for sample in family.samples
    }
    expiry = "tproxy_tls_certificate_expiry_timestamp_seconds"
    assert scraped[(expiry, (("listener", "proxy"),))] == 1_800_000_000
    assert scraped[(expiry, (("listener", "admin"),))] == 1_850_000_000
