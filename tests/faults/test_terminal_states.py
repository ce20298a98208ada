"""Each fault ends its exchange in the terminal state that names it, as the access log records.

The access log line is written when the request's handler returns; ``proxy.flush()`` waits for
every handler, so after it the line of every request is there. Requests carry their own
``x-request-id`` to find their line.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing, suppress

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.faults.conftest import CHAT, StartScripted, chat
from tests.faults.scripted import chunked, reset, response_head, sse_body
from tests.h11peer import SeenRequest
from tproxy import app

TIMEOUTS = (
    "[upstreams.default]\nfirst_byte_timeout = 0.3\nidle_timeout = 0.3\n"
    "[server]\nmax_body_bytes = 100000\n"
)


@pytest.fixture
async def proxy_with_faults(
    start_proxy: StartProxy, start_scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> RunningProxy:
    """A proxy in front of an upstream whose ``x-fault`` header names the fault."""

    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        whole = sse_body(json.loads(request.body))
        fault = request.headers["x-fault"]
        if fault == "reset-before":
            reset(stream)
            return
        if fault == "silent":
            await scripted.wait_for_close(stream)
            return
        await stream.send_all(response_head() + chunked(whole[:50]))
        if fault == "reset-mid":
            reset(stream)
        else:  # "stall"
            await scripted.wait_for_close(stream)

    caplog.set_level(logging.INFO, logger="tproxy.access")
    scripted = await start_scripted(script)
    return await start_proxy(TIMEOUTS, upstream_url=scripted.url)


def final_state(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    for line in access_lines(caplog):
        if line["request_id"] == request_id:
            return str(line["state"])
    raise AssertionError(f"no access log line for {request_id}")


async def ask(proxy: RunningProxy, request_id: str, **headers: str) -> None:
    """One request, whatever becomes of it."""
    body = chat("how does it end")
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with suppress(httpx2.RemoteProtocolError):
            await http.post(CHAT, json=body, headers={"x-request-id": request_id, **headers})
    with trio.fail_after(5):
        await proxy.flush()


async def test_a_whole_answer_ends_completed(
    proxy_with_faults: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    await ask(proxy_with_faults, "whole")
    assert final_state(caplog, "whole") == "completed"


async def test_a_hit_ends_completed(
    proxy_with_faults: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    await ask(proxy_with_faults, "miss")
    await ask(proxy_with_faults, "hit")
    assert final_state(caplog, "hit") == "completed"


@pytest.mark.parametrize(
    ("fault", "state"),
    [
        ("reset-before", "upstream_failed"),
        ("reset-mid", "upstream_failed"),
        ("silent", "timed_out"),
        ("stall", "timed_out"),
    ],
)
async def test_an_upstream_fault_ends_in_its_own_state(
    proxy_with_faults: RunningProxy, caplog: pytest.LogCaptureFixture, fault: str, state: str
) -> None:
    await ask(proxy_with_faults, fault, **{"x-fault": fault})
    assert final_state(caplog, fault) == state


async def test_a_client_leaving_mid_stream_ends_client_gone(
    proxy_with_faults: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"x-request-id": "leaver", "x-fault": "stall"}
    async with (
        httpx2.AsyncClient(base_url=proxy_with_faults.url, timeout=10) as http,
        http.stream("POST", CHAT, json=chat("leaving"), headers=headers) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        await anext(chunks)
    with trio.fail_after(5):
        await proxy_with_faults.flush()
    assert final_state(caplog, "leaver") == "client_gone"


async def test_a_refused_request_ends_rejected(
    proxy_with_faults: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx2.AsyncClient(base_url=proxy_with_faults.url, timeout=10) as http:
        response = await http.post(CHAT, content=b"x" * 200000, headers={"x-request-id": "too-big"})
    assert response.status_code == 413
    await proxy_with_faults.flush()
    assert final_state(caplog, "too-big") == "rejected"


async def test_an_unexpected_exception_ends_internal_error_and_serving_goes_on(
    proxy_with_faults: RunningProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug (here one injected into the replay of hits) still ends its exchange once, in a
    state that says so, with the exception's type as the reason; the next request is served."""

    async def broken_replay(*args: object) -> None:
        raise RuntimeError("injected")

    await ask(proxy_with_faults, "warm")
    monkeypatch.setattr(app, "replay", broken_replay)
    await ask(proxy_with_faults, "bug")
    monkeypatch.undo()
    await ask(proxy_with_faults, "after")
    lines = {line["request_id"]: line for line in access_lines(caplog)}
    assert (lines["bug"]["state"], lines["bug"]["reason"]) == ("internal_error", "RuntimeError")
    assert lines["after"]["state"] == "completed"


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("[upstreams.default]\ntotal_timeout = 0.5\n", "timeout:total"),
        ("[upstreams.default]\nidle_timeout = 0.2\n", "timeout:idle"),
        # each gap under the idle timeout, each moving the idle deadline: the total still holds
        ("[upstreams.default]\ntotal_timeout = 0.5\nidle_timeout = 0.15\n", "timeout:total"),
    ],
    ids=["total", "idle", "total-while-trickling"],
)
async def test_a_stream_past_its_deadline_ends_timed_out_and_says_which(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, toml: str, reason: str
) -> None:
    """A stream that keeps flowing past ``total_timeout``, or pauses longer than
    ``idle_timeout`` between two events, is cut there; the line names the deadline."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    proxy = await start_proxy(toml)
    pause = "0.1" if reason == "timeout:total" else "0.4"
    headers = {"x-request-id": reason, "x-fake-delay": pause, "cache-control": "no-store"}
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with pytest.raises(httpx2.RemoteProtocolError):
            await http.post(CHAT, json=chat(" ".join(["slow"] * 20)), headers=headers)
    with trio.fail_after(5):
        await proxy.flush()
    line = next(line for line in access_lines(caplog) if line["request_id"] == reason)
    assert (line["state"], line["reason"]) == ("timed_out", reason)
