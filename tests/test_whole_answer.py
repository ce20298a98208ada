"""A client that leaves once it has its whole answer has not left early.

The openai SDK stops reading at ``data: [DONE]`` (it drains the body for 0.1 s, then closes); curl
closes once it has every byte a ``Content-Length`` announced. Either may close before tproxy has
read the upstream's own end of body, or before tproxy's last, empty body message. Such an
exchange is ``completed``, and the answer, whole, is stored.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import httpx2
import openai
import pytest
import trio

from tests.conftest import StartProxy, access_lines, tolerate_sdk_generators
from tests.fakeupstream import SeenRequest
from tests.faults.scripted import (
    LAST_CHUNK,
    ScriptedUpstream,
    answer,
    chunked,
    response_head,
    sse_body,
)
from tests.security.rawhttp import address

CHAT = "/v1/chat/completions"
FAULT = {"x-fault": "1"}
# Longer than the SDK's drain after [DONE] (0.1 s), shorter than tproxy's wait for the end.
TAIL_DELAY = 0.3
THINKING = 0.2
CLIENTS = Path(__file__).parent / "closing_clients.py"


def chat(content: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


async def tail_delayed(stream: trio.SocketStream, request: SeenRequest) -> None:
    """The whole answer at once, its end of body (the last chunk) ``TAIL_DELAY`` later."""
    await stream.send_all(response_head() + chunked(sse_body(json.loads(request.body))))
    await trio.sleep(TAIL_DELAY)  # the upstream's own pace, not the test's synchronisation
    await stream.send_all(LAST_CHUNK)


@tolerate_sdk_generators
@pytest.mark.parametrize(
    "headers", [FAULT, {**FAULT, "cache-control": "no-cache"}], ids=["shared", "private"]
)
async def test_an_sdk_stream_closed_after_done_is_completed_and_stored(
    start_proxy: StartProxy,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    scripted = ScriptedUpstream(tail_delayed)
    await nursery.start(scripted.serve)
    proxy = await start_proxy(upstream_url=scripted.url)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    rounds = 6
    for round_ in range(rounds):
        content = f"round {round_} of the test"
        stream = await client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": content}],
            stream=True,
            extra_headers=headers,
        )
        words = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        assert "".join(word or "" for word in words).split() == content.split()
    with trio.fail_after(10):
        await proxy.flush()
    lines = access_lines(caplog)
    assert [(line["state"], line["cache"]) for line in lines] == [("completed", "stored")] * rounds
    sdk_key = {"authorization": "Bearer sk-test"}  # the cache is per credential
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10, headers=sdk_key) as http:
        for round_ in range(rounds):
            again = await http.post(CHAT, json=chat(f"round {round_} of the test"))
            assert again.headers["cache-status"].startswith("tproxy; hit")
    assert scripted.calls(CHAT) == rounds
    await client.close()


async def thinking_first(stream: trio.SocketStream, request: SeenRequest) -> None:
    """A JSON answer (with its Content-Length) after ``THINKING`` seconds."""
    await trio.sleep(THINKING)  # the upstream's own pace: meanwhile identical requests join
    await answer(stream, request)


@pytest.mark.parametrize("extra", ["", "cache-control: no-cache\r\n"], ids=["shared", "private"])
async def test_clients_that_close_right_after_the_last_byte_completed(
    start_proxy: StartProxy, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, extra: str
) -> None:
    """Rounds of identical JSON requests at once (sharing one flight, or, with ``no-cache``, each
    with its own), from clients that close the moment they have the last byte."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    scripted = ScriptedUpstream(thinking_first)
    await nursery.start(scripted.serve)
    proxy = await start_proxy(upstream_url=scripted.url)
    rounds, clients = 8, 10
    host, port = address(proxy.url)
    arguments = [sys.executable, str(CLIENTS), host, str(port), str(rounds), str(clients), extra]
    with trio.fail_after(30):
        done = await trio.run_process(arguments, capture_stdout=True)
        await proxy.flush()
    bodies = json.loads(done.stdout)
    assert len(bodies) == rounds * clients
    assert all(json.loads(body)["choices"] for body in bodies)
    states = [line["state"] for line in access_lines(caplog)]
    assert states == ["completed"] * rounds * clients
    assert scripted.calls(CHAT) == rounds * (clients if "no-cache" in extra else 1)
