"""``tproxy demo``: the demo model, the demo client, and the whole run as a user sees it."""

from __future__ import annotations

import io
import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import TypedDict

import httpx2
import pytest
import trio

from tproxy.cli import EXIT_OK, main
from tproxy.core.sse import SSEDecoder
from tproxy.demo import REPLY, DemoFailed, DemoModel, demo, reply_tokens, run_demo, stream_chat


class Pacing(TypedDict):
    token_delay: float
    first_token_delay: float


FAST: Pacing = {"token_delay": 0.001, "first_token_delay": 0.01}


@pytest.fixture
async def model(nursery: trio.Nursery) -> DemoModel:
    demo_model = DemoModel(**FAST)
    await nursery.start(demo_model.serve)
    return demo_model


def test_the_demo_shows_a_miss_then_a_hit_with_timings_and_where_the_store_lives() -> None:
    out = io.StringIO()
    assert demo(out, None, **FAST)
    shown = out.getvalue()
    miss, hit = shown.split("Request 2 of 2")
    assert "Cache-Status: tproxy; fwd=miss" in miss
    assert "Cache-Status: tproxy; hit; ttl=" in hit
    for part in (miss, hit):
        assert "first token after " in part
        assert "whole answer after " in part
        assert f"({len(reply_tokens())} tokens)" in part
    assert "cache store  " in shown
    assert "temporary: removed when the demo ends" in shown
    assert "The model was asked once for two answers" in shown
    assert "with the same text" in shown


async def test_a_kept_store_answers_both_requests_on_the_next_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first, second = io.StringIO(), io.StringIO()
    assert await run_demo(first, store, temporary=False, **FAST)
    assert await run_demo(second, store, temporary=False, **FAST)
    assert f"kept: tproxy cache ls --cache-dir {store}" in first.getvalue()
    assert "fwd=miss" not in second.getvalue()
    assert f"Both answers came from the store in {store}" in second.getvalue()


def test_tproxy_demo_runs_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # the command configures the process's logging; give the next test its own back
        code = main(["demo", "--token-delay", "0.001", "--cache-dir", str(tmp_path / "store")])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "fwd=miss" in out
    assert "; hit" in out


async def test_the_demo_model_streams_one_token_per_event_then_done(model: DemoModel) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx2.AsyncClient(base_url=model.url) as client:
        response = await client.post("/v1/chat/completions", json=request)
    assert response.headers["content-type"] == "text/event-stream"
    events = [f.event.data for f in SSEDecoder().feed(response.content) if f.event is not None]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(reply_tokens())
    assert {chunk["model"] for chunk in chunks} == {"m"}


async def test_the_demo_model_is_deterministic(model: DemoModel) -> None:
    request = {"model": "m", "messages": [], "stream": True}
    async with httpx2.AsyncClient(base_url=model.url) as client:
        first = await client.post("/v1/chat/completions", json=request)
        second = await client.post("/v1/chat/completions", json=request)
    assert first.content == second.content
    assert model.requests == 2


async def test_the_demo_model_answers_json_models_and_refusals(model: DemoModel) -> None:
    async with httpx2.AsyncClient(base_url=model.url) as client:
        answer = await client.post("/v1/chat/completions", json={"messages": []})
        models = await client.get("/v1/models")
        unknown = await client.get("/v1/embeddings")
        not_json = await client.post("/v1/chat/completions", content=b"[1")
    assert answer.json()["choices"][0]["message"]["content"] == REPLY
    assert [item["id"] for item in models.json()["data"]] == ["tproxy-demo"]
    assert unknown.status_code == 404
    assert not_json.status_code == 400


async def test_the_demo_client_reports_tokens_as_they_arrive(model: DemoModel) -> None:
    seen: list[str] = []
    answer = await stream_chat(model.port, seen.append)
    assert "".join(seen) == REPLY == answer.text
    assert answer.tokens == len(reply_tokens())
    assert answer.cache_status == "(none)"  # the model itself sends no Cache-Status
    assert 0 < answer.first_token <= answer.total


async def serve_raw(reply: bytes, nursery: trio.Nursery) -> int:
    """A peer that answers any request with ``reply`` and closes; returns its port."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(reply)

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
CHUNK = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n", "tproxy answered 503"),
        (SSE_HEAD + CHUNK, "ended before data: [DONE]"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nda", "broke off"),
    ],
    ids=["error-status", "no-done", "truncated"],
)
async def test_the_demo_client_refuses_anything_but_a_whole_stream(
    nursery: trio.Nursery, reply: bytes, reason: str
) -> None:
    port = await serve_raw(reply, nursery)
    pieces: list[str] = []
    with pytest.raises(DemoFailed, match=re.escape(reason)):
        await stream_chat(port, pieces.append)
