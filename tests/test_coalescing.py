"""Single flight: identical requests in flight at the same time share one upstream call."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack, aclosing

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import FakeUpstream

CHAT = "/v1/chat/completions"


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
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy("[cache]\nmax_entry_bytes = 65536\n")
    body = chat(words(3000))  # ~450 KB of events: far more than one client may fall behind
    knobs = {"x-fake-delay": "0.0005"}
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    payload = httpx2.Request("POST", "http://x" + CHAT, json=body).read()
    with trio.socket.socket() as stalled, trio.fail_after(30):
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stalled.connect((host, int(port)))
        await stalled.send(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Fake-Delay: 0.0005\r\nContent-Length: %d\r\n\r\n%s"
            % (CHAT.encode(), len(payload), payload)
        )
        # That client never reads. Its flight still reads the upstream to the end...
        await upstream.streams_completed.wait_value(1)
        # ...and another client asking the same is served in full meanwhile.
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
            fast = await http.post(CHAT, json=body, headers=knobs)
    assert fast.status_code == 200
    assert fast.content.endswith(b"data: [DONE]\n\n")
    assert b"word2999" in fast.content


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
