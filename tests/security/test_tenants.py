"""Tenants: a client's credential is a wall. Another credential's cached answer, a place in another
credential's flight, another tenant's credential in ``/inflight``: none of them, ever.

The upstream here answers each request with a tag derived from the credential it received, so an
answer that crossed the wall would carry the wrong tag.
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack, aclosing

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import SeenRequest
from tests.faults.conftest import CHAT, StartScripted, chat
from tests.faults.scripted import LAST_CHUNK, ScriptedUpstream, chunked, response_head

FINISH = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
ALICE = {"authorization": "Bearer sk-alice-0123456789"}
BOB = {"authorization": "Bearer sk-bob-0123456789"}


def tag_of(headers: dict[str, str]) -> bytes:
    """What the upstream says to the holder of these headers' credential (or to nobody)."""
    credential = headers.get("authorization", "") + "|" + headers.get("api-key", "")
    return hashlib.sha256(credential.encode()).hexdigest()[:16].encode()


def first_event(tag: bytes) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % tag


class TaggingUpstream:
    """Answers with the caller's tag; holds each answer after its first event until released."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def script(self, stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head() + chunked(first_event(tag_of(request.headers))))
        await self.release.wait()
        await stream.send_all(chunked(FINISH) + LAST_CHUNK)


async def tagging_proxy(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> tuple[RunningProxy, ScriptedUpstream, TaggingUpstream]:
    tagging = TaggingUpstream()
    scripted = await start_scripted(tagging.script)
    return await start_proxy(upstream_url=scripted.url), scripted, tagging


async def test_identical_requests_with_different_credentials_never_share_a_flight(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    proxy, scripted, tagging = await tagging_proxy(start_proxy, start_scripted)
    body = chat("the same question")
    clients = {"alice": ALICE, "bob": BOB, "alice-again": ALICE, "anonymous": {}}
    statuses: dict[str, str] = {}
    bodies: dict[str, bytes] = {}
    with trio.fail_after(10):
        async with (
            httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
            AsyncExitStack() as stack,
        ):
            streams = {}
            for name, headers in clients.items():  # each in flight before the next is sent
                response = await stack.enter_async_context(
                    http.stream("POST", CHAT, json=body, headers={**headers, "x-fault": "1"})
                )
                statuses[name] = response.headers["cache-status"]
                streams[name] = await stack.enter_async_context(aclosing(response.aiter_raw()))
            tagging.release.set()
            for name, chunks in streams.items():
                bodies[name] = b"".join([data async for data in chunks])
    assert statuses == {
        "alice": "tproxy; fwd=miss",
        "bob": "tproxy; fwd=miss",
        "alice-again": "tproxy; fwd=miss; collapsed",
        "anonymous": "tproxy; fwd=miss",
    }
    for name, headers in clients.items():
        assert bodies[name] == first_event(tag_of(headers)) + FINISH
    assert len(scripted.requests) == 3
    seen = sorted(request.headers.get("authorization", "") for request in scripted.requests)
    assert seen == sorted(["", ALICE["authorization"], BOB["authorization"]])


async def test_a_cached_answer_is_served_only_to_its_own_credential(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    proxy, scripted, tagging = await tagging_proxy(start_proxy, start_scripted)
    tagging.release.set()
    body = chat("remember this")
    others = [
        BOB,
        {},
        {"authorization": "bearer sk-alice-0123456789"},  # case matters in a credential
        {"authorization": "Bearer sk-alice-01234567890"},  # so does any other byte
        {"api-key": "Bearer sk-alice-0123456789"},  # and the header it comes in
    ]
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:

        async def ask(headers: dict[str, str]) -> httpx2.Response:
            response = await http.post(CHAT, json=body, headers={**headers, "x-fault": "1"})
            await proxy.flush()
            return response

        stored = await ask(ALICE)
        answers = [await ask(headers) for headers in others]
        hit = await ask(ALICE)
    assert stored.content == first_event(tag_of(ALICE)) + FINISH
    for headers, answer in zip(others, answers, strict=True):
        assert answer.headers["cache-status"] == "tproxy; fwd=miss"
        assert answer.content == first_event(tag_of(headers)) + FINISH
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    assert hit.content == stored.content
    assert len(scripted.requests) == 1 + len(others)


async def test_inflight_never_shows_a_credential(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    proxy, _, tagging = await tagging_proxy(start_proxy, start_scripted)
    secret = ALICE["authorization"].split()[-1]
    async with httpx2.AsyncClient(base_url=proxy.admin_url, timeout=10) as admin:
        if (await admin.get("/inflight")).status_code == 404:
            pytest.skip("the admin listener does not serve /inflight in this build")
        async with (
            httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
            http.stream("POST", CHAT, json=chat("held"), headers={**ALICE, "x-fault": "1"}),
        ):
            plain = await admin.get("/inflight")
            with_tenants = await admin.get("/inflight", params={"tenants": "1"})
            tagging.release.set()
    assert plain.status_code == with_tenants.status_code == 200
    assert len(plain.json()["exchanges"]) == 1
    assert "tenant" not in plain.json()["exchanges"][0]
    for document in (plain.content, with_tenants.content):
        assert secret.encode() not in document
        assert b"authorization" not in document.lower()
