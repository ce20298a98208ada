"""Caching through the whole proxy: a repeated request costs no upstream call, and a cached
answer is never a wrong or a partial one."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, access_lines, tolerate_sdk_generators
from tests.fakeupstream import FakeUpstream, completion_answer
from tests.test_store import small_disk_at

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def chat(content: str, *, stream: bool = False, **extra: object) -> dict[str, object]:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


async def post(
    proxy: RunningProxy, path: str, *, headers: dict[str, str] | None = None, **kwargs: object
) -> httpx2.Response:
    """One request, then wait until whatever it decided to store is stored."""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.post(path, headers=headers, **kwargs)  # type: ignore[arg-type]
    await proxy.flush()
    return response


@pytest.mark.parametrize(
    "knobs",
    [
        {"x-fake-framing": "lf"},
        {"x-fake-framing": "crlf"},
        {"x-fake-framing": "cr"},
        {"x-fake-framing": "crlf", "x-fake-byte-chunks": "1"},
        {"x-fake-framing": "lf", "x-fake-no-done": "1"},
    ],
    ids=["lf", "crlf", "cr", "crlf-byte-by-byte", "finish-reason-without-done"],
)
async def test_a_completed_stream_is_stored_and_replayed_byte_for_byte(
    proxy: RunningProxy, upstream: FakeUpstream, knobs: dict[str, str]
) -> None:
    body = chat("the same question", stream=True)
    first = await post(proxy, CHAT, json=body, headers=knobs)
    second = await post(proxy, CHAT, json=body, headers=knobs)
    assert upstream.calls[CHAT] == 1
    assert first.headers["cache-status"] == "tproxy; fwd=miss"
    assert second.headers["cache-status"].startswith("tproxy; hit; ttl=")
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.content == first.content
    assert int(second.headers["age"]) >= 0


@contextmanager
def upstream_on_its_own_loop() -> Iterator[FakeUpstream]:
    """The fake upstream on a Trio loop of its own, in a thread: its writes then reach the
    proxy in big reads, as a model server's do, instead of interleaving with the proxy's tasks."""
    fake = FakeUpstream()
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()

    async def serve() -> None:
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            started.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield fake
    finally:
        token[0].run_sync_soon(stop.set)
        thread.join(10)


@pytest.mark.parametrize("attempt", range(3))
async def test_a_long_stream_from_a_fast_upstream_is_stored_and_its_line_says_so(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, attempt: int
) -> None:
    """An upstream on a loop of its own delivers a 200-event stream in big reads, and the client
    writer takes them in one go while the cache writer works through them one by one. Each of
    three ways this lost the answer is pinned here: the cache writer's channel overflowed (it
    was bounded in items, now in bytes); the client, done first, left a flight still storing
    and its leaving cancelled it; the access line was written before the outcome was known."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    with upstream_on_its_own_loop() as upstream:
        proxy = await start_proxy(upstream_url=upstream.url)
        body = chat(" ".join(f"word{index}" for index in range(200)), stream=True)
        first = await post(proxy, CHAT, json=body)
        second = await post(proxy, CHAT, json=body)
        assert first.headers["cache-status"] == "tproxy; fwd=miss"
        assert second.headers["cache-status"].startswith("tproxy; hit; ttl=")
        assert second.content == first.content
        assert upstream.calls[CHAT] == 1
    assert [line["cache"] for line in access_lines(caplog)] == ["stored", None]


async def test_the_access_line_and_metrics_say_what_the_commit_did(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer within max_entry_bytes whose stored form is over max_total_bytes is refused by
    the commit, not by the hand-over to the store writer: the line and the metrics said
    "stored" and "written" all the same, and the next request missed."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    body = chat(" ".join(f"w{index}" for index in range(300)))
    answer_bytes = len(json.dumps(completion_answer(body)).encode())
    proxy = await start_proxy(
        f"[cache]\nmax_entry_bytes = {answer_bytes}\nmax_total_bytes = {answer_bytes}\n"
    )
    await post(proxy, CHAT, json=body)
    again = await post(proxy, CHAT, json=body)
    await post(proxy, CHAT, json=chat("small"))
    assert again.headers["cache-status"] == "tproxy; fwd=miss"
    assert [line["cache"] for line in access_lines(caplog)] == [
        "not stored: too_large",
        "not stored: too_large",
        "stored",
    ]
    async with httpx2.AsyncClient(base_url=proxy.admin_url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'tproxy_store_writer_entries_total{outcome="written"} 1.0' in metrics
    assert 'tproxy_store_writer_entries_total{outcome="too_large"} 2.0' in metrics


async def test_a_15_mb_body_does_not_hold_up_cache_hits_and_is_cached_by_its_bytes(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """Issue 13, item 6: canonicalizing a big JSON body of many small objects took seconds of
    CPU on the event loop (3.2 s for this one), and every cache hit meanwhile waited. Hits are
    asked for one after another from the moment the big body is sent until the upstream has it,
    the window in which the proxy keys it; none may wait for that canonicalization. (A hit still
    running when the upstream gets the body is not counted: the fake upstream's own json.loads
    runs on this loop too.)"""
    await post(proxy, CHAT, json=chat("hello"))
    padding: list[dict[str, object]] = [{}] * 5_000_000
    big = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "pad": padding}
    big_body = json.dumps(big, separators=(",", ":")).encode()
    assert len(big_body) <= 16 * 1024 * 1024  # under the default server.max_body_bytes
    waits: list[float] = []
    answers: list[httpx2.Response] = []

    async def ask_big(http: httpx2.AsyncClient) -> None:
        answers.append(await http.post(CHAT, content=big_body, headers=JSON))

    async with httpx2.AsyncClient(base_url=proxy.url, timeout=30) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_big, http)
            while upstream.calls[CHAT] < 2:
                started = trio.current_time()
                hit = await http.post(CHAT, json=chat("hello"))
                assert hit.headers["cache-status"].startswith("tproxy; hit")
                if upstream.calls[CHAT] < 2:
                    waits.append(trio.current_time() - started)
        await proxy.flush()
        again = await http.post(CHAT, content=big_body, headers=JSON)
    assert waits
    assert max(waits) < 1.0, sorted(waits)[-3:]
    assert answers[0].json()["choices"][0]["message"]["content"] == "x"
    assert again.headers["cache-status"].startswith("tproxy; hit")
    assert again.content == answers[0].content
    assert upstream.calls[CHAT] == 2


@pytest.mark.parametrize(
    ("directive", "stream"),
    [("no-store", False), ("no-store", True), ("private", False), ('private="Set-Cookie"', True)],
)
async def test_an_answer_the_upstream_says_not_to_store_is_not_stored(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    directive: str,
    stream: bool,
) -> None:
    """RFC 9111: a shared cache must not store a response marked no-store or private (it was
    stored and replayed to every later client)."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    proxy = await start_proxy()
    knobs = {"x-fake-cache-control": f"max-age=0, {directive}"}
    first = await post(proxy, CHAT, json=chat("x", stream=stream), headers=knobs)
    second = await post(proxy, CHAT, json=chat("x", stream=stream), headers=knobs)
    assert first.headers["cache-control"] == f"max-age=0, {directive}"
    assert second.headers["cache-status"] == "tproxy; fwd=miss"
    assert upstream.calls[CHAT] == 2
    refusal = f"upstream Cache-Control: {directive.partition('=')[0]}"
    assert [line["cache"] for line in access_lines(caplog)] == [refusal, refusal]


async def test_a_route_may_store_what_its_upstream_says_not_to(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(
        '[upstreams.local]\nurl = "{upstream}"\n'
        '[[routes]]\nupstreams = ["local"]\nignore_upstream_no_store = true\n',
        upstream_flag=False,
    )
    knobs = {"x-fake-cache-control": "no-store"}
    await post(proxy, CHAT, json=chat("x"), headers=knobs)
    hit = await post(proxy, CHAT, json=chat("x"), headers=knobs)
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    assert upstream.calls[CHAT] == 1


async def test_on_a_full_disk_the_access_line_says_the_answer_was_not_stored(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The store on a 2 MiB file system (a tmpfs: root only; tests/test_store.py covers the
    same refusal without root, with RLIMIT_FSIZE): an answer larger than the disk is refused
    by the commit, and the line and the metrics say so, not "stored"."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    with small_disk_at(tmp_path / "store"):  # where start_proxy keeps its store
        proxy = await start_proxy()
        await post(proxy, CHAT, json=chat("w " * 1_200_000))  # a 2.4 MB answer
        await post(proxy, CHAT, json=chat("small"))
        async with httpx2.AsyncClient(base_url=proxy.admin_url) as http:
            metrics = (await http.get("/metrics")).text
        proxy.stop.set()
        await proxy.stopped.wait()
    assert [line["cache"] for line in access_lines(caplog)] == ["not stored: disk_full", "stored"]
    assert 'tproxy_store_writer_entries_total{outcome="disk_full"} 1.0' in metrics
    assert 'tproxy_store_writer_entries_total{outcome="written"} 1.0' in metrics


async def test_a_json_answer_is_stored_and_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    first = await post(proxy, CHAT, json=chat("hello"))
    second = await post(proxy, CHAT, json=chat("hello"))
    assert upstream.calls[CHAT] == 1
    assert second.content == first.content
    assert second.headers["content-length"] == str(len(first.content))


async def test_the_same_request_written_differently_is_one_entry(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    compact = b'{"model":"fake","messages":[{"role":"user","content":"hi"}]}'
    spaced = b'{ "messages": [ {"content": "hi", "role": "user"} ],\n  "model": "fake" }'
    await post(proxy, CHAT, content=compact, headers={"content-type": "application/json"})
    hit = await post(proxy, CHAT, content=spaced, headers={"content-type": "application/json"})
    assert upstream.calls[CHAT] == 1
    assert hit.headers["cache-status"].startswith("tproxy; hit")


@pytest.mark.parametrize(
    "change",
    [{"temperature": 0.5}, {"seed": 7}, {"max_tokens": 3}, {"model": "other"}, {"stream": True}],
)
async def test_anything_that_changes_the_answer_changes_the_key(
    proxy: RunningProxy, upstream: FakeUpstream, change: dict[str, object]
) -> None:
    await post(proxy, CHAT, json=chat("same words"))
    await post(proxy, CHAT, json={**chat("same words"), **change})
    assert upstream.calls[CHAT] == 2


async def test_one_credential_never_receives_another_credentials_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    await post(proxy, CHAT, json=chat("secret"), headers={"authorization": "Bearer alice"})
    bob = await post(proxy, CHAT, json=chat("secret"), headers={"authorization": "Bearer bob"})
    alice = await post(proxy, CHAT, json=chat("secret"), headers={"authorization": "Bearer alice"})
    assert upstream.calls[CHAT] == 2
    assert bob.headers["cache-status"] == "tproxy; fwd=miss"
    assert alice.headers["cache-status"].startswith("tproxy; hit")


async def test_a_shared_cache_serves_every_credential(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy("[cache]\nshared = true\n")
    await post(proxy, CHAT, json=chat("common"), headers={"authorization": "Bearer alice"})
    bob = await post(proxy, CHAT, json=chat("common"), headers={"authorization": "Bearer bob"})
    assert upstream.calls[CHAT] == 1
    assert bob.headers["cache-status"].startswith("tproxy; hit")


@pytest.mark.parametrize(
    "knobs",
    [
        {"x-fake-break-after": "2"},
        {"x-fake-error-event": "1"},
        {"x-fake-status": "500"},
        {"x-fake-stall-after": "1"},
    ],
    ids=["broken", "error-event", "status-500", "timeout"],
)
async def test_an_answer_that_did_not_complete_is_never_stored(
    start_proxy: StartProxy, upstream: FakeUpstream, knobs: dict[str, str]
) -> None:
    proxy = await start_proxy("[upstreams.default]\nidle_timeout = 0.3\n")
    body = chat("fragile answer", stream=True)
    for _ in range(2):
        try:
            await post(proxy, CHAT, json=body, headers=knobs)
        except httpx2.RemoteProtocolError:
            await proxy.flush()
    assert upstream.calls[CHAT] == 2


async def test_no_store_neither_reads_nor_writes(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    first = await post(proxy, CHAT, json=chat("x"), headers={"cache-control": "no-store"})
    await post(proxy, CHAT, json=chat("x"), headers={"cache-control": "no-store"})
    miss = await post(proxy, CHAT, json=chat("x"))
    assert upstream.calls[CHAT] == 3
    assert first.headers["cache-status"] == "tproxy; fwd=request"
    assert miss.headers["cache-status"] == "tproxy; fwd=miss"


async def test_no_cache_goes_upstream_and_stores_the_fresh_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    await post(proxy, CHAT, json=chat("x"))
    fresh = await post(proxy, CHAT, json=chat("x"), headers={"cache-control": "no-cache"})
    hit = await post(proxy, CHAT, json=chat("x"))
    assert upstream.calls[CHAT] == 2
    assert fresh.headers["cache-status"] == "tproxy; fwd=request"
    assert hit.headers["cache-status"].startswith("tproxy; hit")


async def test_only_if_cached_is_a_504_on_a_miss_and_a_hit_otherwise(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    only = {"cache-control": "only-if-cached"}
    refused = await post(proxy, CHAT, json=chat("x"), headers=only)
    await post(proxy, CHAT, json=chat("x"))
    served = await post(proxy, CHAT, json=chat("x"), headers=only)
    assert refused.status_code == 504
    assert refused.json()["error"]["code"] == "not_cached"
    assert served.status_code == 200
    assert upstream.calls[CHAT] == 1


async def test_max_age_refuses_an_entry_older_than_asked(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    await post(proxy, CHAT, json=chat("x"))
    young = await post(proxy, CHAT, json=chat("x"), headers={"cache-control": "max-age=3600"})
    assert young.headers["cache-status"].startswith("tproxy; hit")
    stale = await post(proxy, CHAT, json=chat("x"), headers={"cache-control": "max-age=0"})
    assert stale.headers["cache-status"] == "tproxy; fwd=stale"
    assert upstream.calls[CHAT] == 2


async def test_a_body_that_is_not_json_passes_through_uncached(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    for _ in range(2):
        response = await post(proxy, CHAT, content=b"not json at all")
    assert upstream.calls[CHAT] == 2
    assert response.headers["cache-status"] == "tproxy; fwd=miss; detail=not-json"
    assert upstream.requests[-1].body == b"not json at all"


async def test_paths_outside_the_cacheable_list_bypass_the_cache(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    for _ in range(2):
        response = await post(proxy, "/v1/other", json=chat("x"))
    assert upstream.calls["/v1/other"] == 2
    assert response.headers["cache-status"] == "tproxy; fwd=bypass"


async def test_entries_survive_a_restart(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    first_proxy = await start_proxy()
    first = await post(first_proxy, CHAT, json=chat("persist me", stream=True))
    first_proxy.stop.set()
    with trio.fail_after(10):
        await first_proxy.stopped.wait()
    second_proxy = await start_proxy()
    second = await post(second_proxy, CHAT, json=chat("persist me", stream=True))
    assert upstream.calls[CHAT] == 1
    assert second.content == first.content


@tolerate_sdk_generators
async def test_repeated_embedding_requests_are_served_from_the_cache(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        first = await client.embeddings.create(model="fake-embed", input=["a", "b"])
        await proxy.flush()
        second = await client.embeddings.create(model="fake-embed", input=["a", "b"])
    assert upstream.calls["/v1/embeddings"] == 1
    assert [d.embedding for d in second.data] == [d.embedding for d in first.data]


@tolerate_sdk_generators
async def test_the_openai_sdk_reads_a_replayed_stream_as_it_read_the_live_one(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)

    async def ask() -> list[dict[str, Any]]:
        stream = await client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "tell me again"}],
            stream=True,
            extra_headers={"x-fake-framing": "crlf"},
        )
        async with stream:
            chunks = [chunk.model_dump() async for chunk in stream]
        await proxy.flush()
        return chunks

    async with client:
        live = await ask()
        replayed = await ask()
    assert upstream.calls[CHAT] == 1
    assert replayed == live
