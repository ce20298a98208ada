"""Single flight: identical requests in flight at the same time share one upstream call.

Where a test needs a request to arrive at a known moment of the flight, the upstream is a
:class:`PacedAnswer`: it sends the head and the first part of its stream, then waits for the test
to release the rest. Requests carrying ``x-fault`` get that answer (the cache key ignores it).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, aclosing

import httpx2
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.fakeupstream import FakeUpstream, SeenRequest
from tests.faults.scripted import LAST_CHUNK, ScriptedUpstream, chunked, response_head, sse_body
from tproxy.core.entry import StoredEntry
from tproxy.store import LmdbStore, PutResult

CHAT = "/v1/chat/completions"
FAULT = {"x-fault": "1"}


class PacedAnswer:
    """An upstream answer paced by the test: the head and the first ``lead`` bytes of the whole
    SSE answer at once, the rest (and the end of the body) when the test sets ``go``."""

    def __init__(self, lead: int) -> None:
        self.lead = lead
        self.go = trio.Event()

    async def script(self, stream: trio.SocketStream, request: SeenRequest) -> None:
        whole = sse_body(json.loads(request.body))
        await stream.send_all(response_head() + chunked(whole[: self.lead]))
        with trio.fail_after(20):
            await self.go.wait()
        await stream.send_all(chunked(whole[self.lead :]) + LAST_CHUNK)


async def paced_upstream(nursery: trio.Nursery, answer: PacedAnswer) -> ScriptedUpstream:
    upstream = ScriptedUpstream(answer.script)
    await nursery.start(upstream.serve)
    return upstream


async def read_at_least(chunks: AsyncIterator[bytes], size: int) -> bytes:
    """The body's bytes as they come, until there are ``size`` of them."""
    data = b""
    while len(data) < size:
        data += await anext(chunks)
    return data


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` that carry ``labels`` (and perhaps more)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def chat(content: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


def words(count: int) -> str:
    return " ".join(f"word{i}" for i in range(count))


async def test_fifty_identical_streams_make_one_upstream_call(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    bodies: list[bytes] = []
    statuses: list[str] = []

    async def ask(http: httpx2.AsyncClient) -> None:
        response = await http.post(CHAT, json=chat(words(6)), headers={"x-fake-delay": "0.05"})
        bodies.append(response.content)
        statuses.append(response.headers["cache-status"])

    limits = httpx2.Limits(max_connections=64)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20, limits=limits) as http:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(ask, http)
    assert upstream.calls[CHAT] == 1
    assert len(bodies) == 50
    assert len(set(bodies)) == 1
    assert b"word5" in bodies[0]
    assert statuses.count("tproxy; fwd=miss") == 1
    assert set(statuses) <= {"tproxy; fwd=miss", "tproxy; fwd=miss; collapsed"} | {
        s for s in statuses if s.startswith("tproxy; hit")
    }


async def test_identical_json_requests_wait_for_the_one_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    bodies: list[bytes] = []

    async def ask(http: httpx2.AsyncClient) -> None:
        response = await http.post(CHAT, json=chat("json please", stream=False))
        bodies.append(response.content)

    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(10):
            nursery.start_soon(ask, http)
    assert upstream.calls[CHAT] == 1
    assert len(set(bodies)) == 1


async def test_a_follower_joining_mid_stream_gets_the_whole_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat(words(20))
    knobs = {"x-fake-delay": "0.02"}
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        http.stream("POST", CHAT, json=body, headers=knobs) as leader,
        aclosing(leader.aiter_raw()) as chunks,
    ):
        first = await anext(chunks)
        follower = await http.post(CHAT, json=body, headers=knobs)
        rest = b"".join([chunk async for chunk in chunks])
    assert follower.headers["cache-status"] == "tproxy; fwd=miss; collapsed"
    assert follower.content == first + rest
    assert upstream.calls[CHAT] == 1


async def test_the_first_client_leaving_does_not_end_the_flight_for_the_others(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat(words(20))
    knobs = {"x-fake-delay": "0.02"}
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        AsyncExitStack() as leader_stack,
    ):
        leader = await leader_stack.enter_async_context(
            http.stream("POST", CHAT, json=body, headers=knobs)
        )
        leader_chunks = await leader_stack.enter_async_context(aclosing(leader.aiter_raw()))
        await anext(leader_chunks)
        async with (
            http.stream("POST", CHAT, json=body, headers=knobs) as follower,
            aclosing(follower.aiter_raw()) as follower_chunks,
        ):
            assert follower.headers["cache-status"] == "tproxy; fwd=miss; collapsed"
            await leader_stack.aclose()  # the first client leaves mid-stream
            answer = b"".join([chunk async for chunk in follower_chunks])
    assert b"word19" in answer
    assert answer.endswith(b"data: [DONE]\n\n")
    await proxy.flush()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
        again = await http.post(CHAT, json=body)
    assert again.headers["cache-status"].startswith("tproxy; hit")
    assert upstream.calls[CHAT] == 1


async def test_a_stalled_reader_does_not_slow_the_upstream_or_the_others(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    paced = PacedAnswer(lead=16384)
    scripted = await paced_upstream(nursery, paced)
    proxy = await start_proxy("[cache]\nmax_entry_bytes = 1048576\n", upstream_url=scripted.url)
    body = chat(words(20000))  # ~3 MB of events: far more than one client may fall behind
    whole = sse_body(body)
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    payload = httpx2.Request("POST", "http://x" + CHAT, json=body).read()
    with trio.socket.socket() as stalled, trio.fail_after(30):
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stalled.connect((host, int(port)))
        await stalled.send(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Fault: 1\r\nContent-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(payload), payload)
        )
        await scripted.received.wait_value(1)
        # That client never reads. Another asks the same while the upstream holds the rest back:
        # it joins mid-stream and has the first part before the upstream sends any more...
        async with (
            httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
            http.stream("POST", CHAT, json=body, headers=FAULT) as fast,
            aclosing(fast.aiter_raw()) as chunks,
        ):
            assert fast.headers["cache-status"] == "tproxy; fwd=miss; collapsed"
            first = await read_at_least(chunks, paced.lead)
            # ...then the upstream sends ~3 MB, which the flight reads to the end for it while
            # the first client still reads nothing.
            paced.go.set()
            rest = b"".join([chunk async for chunk in chunks])
    assert first + rest == whole
    assert scripted.calls(CHAT) == 1


@pytest.mark.parametrize("policy", ["cancel", "finish"])
async def test_when_the_last_client_leaves_the_policy_decides(
    start_proxy: StartProxy, upstream: FakeUpstream, policy: str
) -> None:
    proxy = await start_proxy(f'[cache]\non_disconnect = "{policy}"\n')
    body = chat(words(30))
    knobs = {"x-fake-delay": "0.01"}
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        http.stream("POST", CHAT, json=body, headers=knobs) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        await anext(chunks)
    if policy == "cancel":
        with trio.fail_after(5):
            await upstream.disconnected.wait()
        await proxy.flush()
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
            again = await http.post(CHAT, json=body, headers=knobs)
        assert again.headers["cache-status"] == "tproxy; fwd=miss"
        assert upstream.calls[CHAT] == 2
    else:
        with trio.fail_after(10):
            await proxy.flush()  # the flight finishes in the background and is stored
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
            again = await http.post(CHAT, json=body, headers={"cache-control": "only-if-cached"})
        assert again.status_code == 200
        assert upstream.calls[CHAT] == 1
        assert upstream.disconnects == 0


async def test_an_upstream_failure_truncates_every_client_and_stores_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat(words(20))
    knobs = {"x-fake-delay": "0.02", "x-fake-break-after": "10"}
    failures: list[type[BaseException]] = []

    async def ask(http: httpx2.AsyncClient) -> None:
        try:
            await http.post(CHAT, json=body, headers=knobs)
        except httpx2.RemoteProtocolError as error:
            failures.append(type(error))

    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(5):
            nursery.start_soon(ask, http)
    await proxy.flush()
    assert len(failures) == 5
    assert upstream.calls[CHAT] == 1
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
        retry = await http.post(CHAT, json=body)
    assert retry.headers["cache-status"] == "tproxy; fwd=miss"


async def test_requests_that_bypass_the_cache_never_coalesce(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    async def ask(http: httpx2.AsyncClient) -> None:
        await http.post(
            CHAT, json=chat(words(5)), headers={"x-fake-delay": "0.02", "cache-control": "no-cache"}
        )

    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(3):
            nursery.start_soon(ask, http)
    assert upstream.calls[CHAT] == 3


async def test_different_credentials_never_share_a_flight(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    async def ask(http: httpx2.AsyncClient, key: str) -> None:
        await http.post(
            CHAT,
            json=chat(words(5)),
            headers={"x-fake-delay": "0.02", "authorization": f"Bearer {key}"},
        )

    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        trio.open_nursery() as nursery,
    ):
        for key in ("alice", "bob"):
            nursery.start_soon(ask, http, key)
    assert upstream.calls[CHAT] == 2


async def test_followers_are_counted_in_the_access_line_inflight_and_metrics(
    start_proxy: StartProxy, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    paced = PacedAnswer(lead=200)
    scripted = await paced_upstream(nursery, paced)
    proxy = await start_proxy(upstream_url=scripted.url)
    body = chat(words(40))
    followers = 3
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        AsyncExitStack() as stack,
    ):
        responses: list[httpx2.Response] = []
        for _ in range(1 + followers):
            response = await stack.enter_async_context(
                http.stream("POST", CHAT, json=body, headers=FAULT)
            )
            responses.append(response)
        statuses = [response.headers["cache-status"] for response in responses]
        inflight = (await http.get(proxy.admin_url + "/inflight")).json()
        live = (await http.get(proxy.admin_url + "/metrics")).text
        paced.go.set()
        answers = [await response.aread() for response in responses]
        await proxy.flush()
        after = (await http.get(proxy.admin_url + "/metrics")).text
    assert statuses == ["tproxy; fwd=miss"] + ["tproxy; fwd=miss; collapsed"] * followers
    assert answers == [sse_body(body)] * (1 + followers)
    assert scripted.calls(CHAT) == 1
    counted = sorted(exchange["followers"] for exchange in inflight["exchanges"])
    assert counted == [0] * followers + [followers]  # the exchange that opened the flight
    assert metric(live, "tproxy_inflight_followers") == followers
    assert metric(after, "tproxy_inflight_followers") == 0
    assert metric(after, "tproxy_coalesced_followers_total") == followers
    lines = access_lines(caplog)
    assert (
        sorted((line["collapsed"], line["followers"]) for line in lines)
        == [(False, followers)] + [(True, 0)] * followers
    )
    assert {line["state"] for line in lines} == {"completed"}


class HeldCommits:
    """Holds the store's commits in their worker thread until released (bounded), so a test can
    ask while an answer is on its way into the store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        put_many = LmdbStore.put_many

        def held(
            store: LmdbStore, items: Sequence[tuple[str, StoredEntry]], now: float
        ) -> PutResult:
            self.holding.set()
            self.release.wait(timeout=20)
            return put_many(store, items, now)

        monkeypatch.setattr(LmdbStore, "put_many", held)


async def test_a_request_after_the_flight_completed_before_the_commit_is_a_hit(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    commits = HeldCommits(monkeypatch)
    proxy = await start_proxy()
    body = chat(words(8))
    try:
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
            first = await http.post(CHAT, json=body)
            with trio.fail_after(10):
                await trio.to_thread.run_sync(commits.holding.wait)
            # The flight has completed and its answer waits for the store's commit.
            again = await http.post(CHAT, json=body)
            inflight_metrics = (await http.get(proxy.admin_url + "/metrics")).text
    finally:
        commits.release.set()
    await proxy.flush()
    assert first.headers["cache-status"] == "tproxy; fwd=miss"
    assert again.headers["cache-status"].startswith("tproxy; hit")
    assert "age" in again.headers
    assert again.content == first.content
    assert upstream.calls[CHAT] == 1
    assert metric(inflight_metrics, "tproxy_requests_total", state="completed", cache="hit") == 1
    # Both access lines wait for the commit's outcome, at most SETTLE_TIMEOUT, and the commit is
    # held past it: the two lines come in either order.
    [second] = [
        line for line in access_lines(caplog) if line["request_id"] == again.headers["x-request-id"]
    ]
    assert second["cache_status"] == again.headers["cache-status"]
    assert (second["collapsed"], second["upstream"]) == (False, None)
