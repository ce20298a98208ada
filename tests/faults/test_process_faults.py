"""Process faults: a real ``python -m tproxy serve`` killed with SIGKILL under load, restarted.

The fake upstream answers each request with bytes derived from the request alone
(tests/fakeupstream.py), so every answer can be checked against what its own request asked for:
before the kill, after the restart, hit or miss. What a kill may cost is entries, never a wrong
one: the store must reopen, ``tproxy cache verify`` must find it clean, and every answer served
from it must be the whole answer to that request.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx2
import pytest
import trio
from trio_util import AsyncValue

from tests.fakeupstream import FakeUpstream, completion_answer, stream_events
from tests.test_shutdown import REPO, running_tproxy

CHAT = "/v1/chat/completions"
CLIENTS = 32
REQUESTS_PER_CLIENT = 400  # a bound; the kill comes long before
KILL_AFTER_ANSWERS = 600  # about two seconds of load on a 2-core machine
# Streams take a few tens of milliseconds, so many are mid-answer (or mid-store) at the kill.
PACED = {"x-fake-delay": "0.005"}

Body = dict[str, object]


def request_body(client: int, number: int) -> Body:
    """A distinct cacheable request: half of them streamed, of 1 to 7 words."""
    words = " ".join(f"c{client}n{number}w{k}" for k in range(1 + (client + number) % 7))
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": words}],
        "stream": (client + number) % 2 == 0,
    }


def expected_answer(body: Body) -> bytes:
    """The whole answer the fake upstream gives ``body``, byte for byte."""
    if body["stream"]:
        return b"".join(event + b"\n\n" for event in stream_events(body))
    return json.dumps(completion_answer(body)).encode()


async def cache_verify(store: Path) -> dict[str, object]:
    """``tproxy cache verify --json`` on ``store``; fails the test unless it exits 0."""
    command = [sys.executable, "-m", "tproxy", "cache", "verify", "--json", "--cache-dir"]
    with trio.fail_after(20):
        done = await trio.run_process(
            [*command, str(store)], capture_stdout=True, capture_stderr=True, check=False, cwd=REPO
        )
    report: dict[str, object] = json.loads(done.stdout)
    assert done.returncode == 0, (report, done.stderr.decode())
    return report


async def load_until_killed(
    url: str, sent: list[Body], wrong: list[Body], answered: AsyncValue[int]
) -> None:
    """CLIENTS clients, each sending its own requests one after another until the proxy is gone.

    Every request is recorded in ``sent`` before it goes out; a whole answer that differs from
    the expected one is recorded in ``wrong``.
    """

    async def client(http: httpx2.AsyncClient, index: int) -> None:
        for number in range(REQUESTS_PER_CLIENT):
            body = request_body(index, number)
            sent.append(body)
            try:
                response = await http.post(CHAT, json=body, headers=PACED)
            except httpx2.TransportError:
                return  # the proxy died under this request, or before it
            if response.status_code != 200 or response.content != expected_answer(body):
                wrong.append(body)
            answered.value += 1

    limits = httpx2.Limits(max_connections=CLIENTS)
    async with (
        httpx2.AsyncClient(base_url=url, timeout=10, limits=limits) as http,
        trio.open_nursery() as nursery,
    ):
        for index in range(CLIENTS):
            nursery.start_soon(client, http, index)


async def ask_again(url: str, bodies: Sequence[Body]) -> tuple[int, list[Body]]:
    """Send every body again with CLIENTS at a time; how many were hits, and which were wrong."""
    hits = 0
    wrong: list[Body] = []
    queue = iter(bodies)

    async def client(http: httpx2.AsyncClient) -> None:
        nonlocal hits
        for body in queue:  # shared: each body is taken by one client
            response = await http.post(CHAT, json=body)
            if response.status_code != 200 or response.content != expected_answer(body):
                wrong.append(body)
            elif response.headers["cache-status"].startswith("tproxy; hit"):
                hits += 1

    limits = httpx2.Limits(max_connections=CLIENTS)
    async with (
        httpx2.AsyncClient(base_url=url, timeout=10, limits=limits) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(CLIENTS):
            nursery.start_soon(client, http)
    return hits, wrong


@pytest.mark.slow
async def test_sigkill_under_load_then_restart_serves_only_whole_answers_from_a_clean_store(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    sent: list[Body] = []
    wrong_before: list[Body] = []
    answered = AsyncValue(0)
    async with (
        running_tproxy(nursery, tmp_path, upstream, graceful_timeout=1.0) as first,
        trio.open_nursery() as load,
    ):
        load.start_soon(load_until_killed, first.url, sent, wrong_before, answered)
        with trio.fail_after(30):
            await answered.wait_value(lambda count: count >= KILL_AFTER_ANSWERS)
        first.process.send_signal(signal.SIGKILL)
        assert await first.exit_code(within=5.0) == -signal.SIGKILL
    assert wrong_before == []
    assert len(sent) > answered.value  # requests were in flight when the proxy died

    after_kill = await cache_verify(first.store)
    assert after_kill["ok"] is True
    stored = after_kill["entries"]
    assert isinstance(stored, int)
    assert stored > 0

    async with running_tproxy(nursery, tmp_path, upstream, graceful_timeout=1.0) as second:
        hits, wrong_after = await ask_again(second.url, sent)
        assert wrong_after == []
        # Each stored answer was served from the store; the others went upstream again.
        assert hits == stored
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code(within=10.0) == 0

    # The restarted proxy kept what it found and added what it fetched again, cleanly.
    after_restart = await cache_verify(first.store)
    assert after_restart["ok"] is True
    again = after_restart["entries"]
    assert isinstance(again, int)
    assert again == len(sent)  # the drain wrote every answer fetched again
