"""Fixtures for the fault suite: a scripted upstream per test, and the checks every fault ends with.

After any fault the same three things must hold: the client got the right status or a visibly
broken body, nothing of the faulty answer was stored, and the proxy still serves. The last two
are one check (:func:`assert_recovered`): the same request again reaches the upstream and gets
its whole answer, and once more is a cache hit with the same bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy
from tests.faults.scripted import Script, ScriptedUpstream

CHAT = "/v1/chat/completions"

StartScripted = Callable[..., Awaitable[ScriptedUpstream]]


def chat(content: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


FAULT = {"x-fault": "1"}


@pytest.fixture
def start_scripted(nursery: trio.Nursery) -> StartScripted:
    """Start a :class:`ScriptedUpstream` running ``script``, silent for its first connections."""

    async def start(script: Script, *, silent: int = 0) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script, silent=silent)
        await nursery.start(upstream.serve)
        return upstream

    return start


async def assert_recovered(
    proxy: RunningProxy,
    body: dict[str, object],
    *,
    expected: bytes | None = None,
    path: str = CHAT,
) -> None:
    """Nothing of the fault was stored and the proxy serves: a miss with the whole answer, then
    a hit with the same bytes. ``expected`` is the whole answer's bytes when the test knows them.
    """
    with trio.fail_after(10):
        await proxy.flush()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        again = await http.post(path, json=body)
        await proxy.flush()
        third = await http.post(path, json=body)
    assert again.status_code == 200
    assert again.headers["cache-status"] == "tproxy; fwd=miss"
    if expected is not None:
        assert again.content == expected
    assert third.headers["cache-status"].startswith("tproxy; hit")
    assert third.content == again.content
