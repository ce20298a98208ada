"""The ``Cache-Status`` values docs/telemetry.md shows are values tproxy sends.

The page showed ``tproxy; fwd=miss; stored``, which tproxy never sends: a reader grepping logs for
it found nothing. Each example is checked against the headers of real answers.
"""

from __future__ import annotations

import re
from contextlib import aclosing
from pathlib import Path

import httpx2
import trio

from tests.conftest import RunningProxy

TELEMETRY = Path(__file__).resolve().parent.parent / "docs" / "telemetry.md"
CHAT = "/v1/chat/completions"


def documented_examples() -> set[str]:
    """The ``Cache-Status`` examples of the page's ``cache_status`` rows."""
    rows = [line for line in TELEMETRY.read_text().splitlines() if line.startswith("| `cache_st")]
    return {normalised(example) for row in rows for example in re.findall(r"`(tproxy;[^`]*)`", row)}


def normalised(value: str) -> str:
    return re.sub(r"ttl=\d+", "ttl=N", value)


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def sent_values(proxy: RunningProxy) -> set[str]:
    """The Cache-Status of a miss, a hit, a follower, a bypass and a body that is not JSON."""
    seen: list[str] = []
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        seen.append((await http.post(CHAT, json=chat("first"))).headers["cache-status"])
        await proxy.flush()
        seen.append((await http.post(CHAT, json=chat("first"))).headers["cache-status"])
        seen.append((await http.post("/v1/models", json={})).headers["cache-status"])
        not_json = await http.post(CHAT, content=b"{not json", headers={"content-type": "x"})
        seen.append(not_json.headers["cache-status"])

        slow = chat("a slow stream of words", stream=True)
        delay = {"x-fake-delay": "0.05"}
        async with (
            http.stream("POST", CHAT, json=slow, headers=delay) as leader,
            aclosing(leader.aiter_raw()) as chunks,
        ):
            await anext(chunks)  # the flight is running: the next identical request joins it
            follower = await http.post(CHAT, json=slow, headers=delay)
            seen.append(follower.headers["cache-status"])
    with trio.fail_after(5):
        await proxy.flush()
    return {normalised(value) for value in seen}


async def test_every_documented_cache_status_is_one_tproxy_sends(proxy: RunningProxy) -> None:
    sent = await sent_values(proxy)
    assert "tproxy; fwd=miss; collapsed" in sent
    assert documented_examples() <= sent
