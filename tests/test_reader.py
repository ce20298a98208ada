"""The upstream reader: what the chunks it hands a flight's clients carry.

The reader decodes a stream once per flight. With ``frames_to_clients`` (the payload log is on)
each chunk carries the frames decoded from it, for the clients' payload capture; without, the
chunks carry bytes only, so that a shared flight's history does not hold decoded frames for
nobody. The upstream is the fake OpenAI upstream on a real socket, read through the real pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.fakeupstream import FakeUpstream
from tproxy.config import Overrides, load_settings
from tproxy.core.fanout import Chunk
from tproxy.core.flight import FlightRegistry
from tproxy.pipeline import ProxyRequest
from tproxy.pipeline.live import LiveFlight
from tproxy.pipeline.reader import Reader
from tproxy.upstream import open_upstream_pool


async def read_chunks(
    upstream: FakeUpstream, tmp_path: Path, body: dict[str, object], *, frames_to_clients: bool
) -> list[Chunk]:
    """The chunks one private flight's client receives for ``body``."""
    settings = load_settings(None, Overrides(upstream=upstream.url, cache_dir=tmp_path))
    request = ProxyRequest(
        request_id=b"r1",
        method="POST",
        target="/v1/chat/completions",
        headers=[(b"content-type", b"application/json")],
        body=json.dumps(body).encode(),
        client_host=None,
        scheme="http",
        upstreams=("default",),
        retries=0,
        total_timeout=10.0,
    )
    registry = FlightRegistry(max_background=0)
    flight = LiveFlight(request, None, None, registry, buffer_chunks=1000, finish_timeout=1.0)
    feed = flight.subscribe()
    async with open_upstream_pool(settings, environ={}) as pool:
        reader = Reader(pool, None, registry, 1 << 20, False, frames_to_clients=frames_to_clients)
        with trio.fail_after(10):
            await reader.read(flight)
    items = []
    async with feed.receive_channel as channel:
        async for item in channel:
            items.append(item)
    return [item for item in items if isinstance(item, Chunk)]


@pytest.mark.parametrize("frames_to_clients", [True, False])
async def test_a_streams_chunks_carry_its_frames_only_when_the_clients_want_them(
    upstream: FakeUpstream, tmp_path: Path, frames_to_clients: bool
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    chunks = await read_chunks(upstream, tmp_path, body, frames_to_clients=frames_to_clients)
    assert sum(chunk.events for chunk in chunks) > 3
    if not frames_to_clients:
        assert all(chunk.frames is None for chunk in chunks)
        return
    frames = [frame for chunk in chunks for frame in chunk.frames or ()]
    assert b"".join(frame.raw for frame in frames) == b"".join(chunk.data for chunk in chunks)
    assert [frame.event.data for frame in frames if frame.event is not None][-1] == "[DONE]"
    assert all(
        chunk.events == sum(frame.event is not None for frame in chunk.frames or ())
        for chunk in chunks
    )


async def test_a_json_answers_chunks_carry_bytes_only(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "stream": False}
    chunks = await read_chunks(upstream, tmp_path, body, frames_to_clients=True)
    assert chunks
    assert all(chunk.frames is None and chunk.events == 0 for chunk in chunks)
    assert json.loads(b"".join(chunk.data for chunk in chunks))["choices"]
