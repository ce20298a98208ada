"""The upstream reader: what the chunks it hands a flight's clients carry, and the body's idle
deadline.

The reader decodes a stream once per flight. With ``frames_to_clients`` (the payload log is on)
each chunk carries the frames decoded from it, for the clients' payload capture; without, the
chunks carry bytes only, so that a shared flight's history does not hold decoded frames for
nobody. The upstream is the fake OpenAI upstream on a real socket, read through the real pool.

The idle deadline (no chunk for ``idle_timeout``) is one cancel scope over the body, lifted while
a client's full channel holds the reader: a slow client is not an idle upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.fakeupstream import FakeUpstream
from tproxy.config import Overrides, load_settings
from tproxy.core.errors import UpstreamTimeout
from tproxy.core.events import UpstreamEnded
from tproxy.core.fanout import Chunk, FlightFailed, Item
from tproxy.core.flight import FlightRegistry
from tproxy.core.headers import Header
from tproxy.pipeline import ProxyRequest
from tproxy.pipeline.live import LiveFlight
from tproxy.pipeline.reader import MAX_IDLE_SLACK, Reader
from tproxy.upstream import UpstreamPool, open_upstream_pool


def chat_request(body: dict[str, object], knobs: tuple[Header, ...] = ()) -> ProxyRequest:
    return ProxyRequest(
        request_id=b"r1",
        method="POST",
        target="/v1/chat/completions",
        headers=[(b"content-type", b"application/json"), *knobs],
        body=json.dumps(body).encode(),
        client_host=None,
        scheme="http",
        upstreams=("default",),
        retries=0,
        total_timeout=10.0,
    )


async def read_items(
    upstream: FakeUpstream,
    tmp_path: Path,
    body: dict[str, object],
    *,
    frames_to_clients: bool = True,
    knobs: tuple[Header, ...] = (),
    toml: str = "",
    buffer_chunks: int = 1000,
    client_pause: tuple[int, float] = (0, 0.0),
) -> list[Item]:
    """The items one private flight's client receives for ``body``, the fake upstream steered by
    ``knobs``; ``client_pause``: after taking that many items, the client takes nothing for that
    many seconds."""
    config = tmp_path / "tproxy.toml"
    config.write_text(toml)
    settings = load_settings(config, Overrides(upstream=upstream.url, cache_dir=tmp_path))
    request = chat_request(body, knobs)
    registry = FlightRegistry(max_background=0)
    flight = LiveFlight(
        request, None, None, registry, buffer_chunks=buffer_chunks, finish_timeout=1.0
    )
    feed = flight.subscribe()
    items: list[Item] = []
    async with open_upstream_pool(settings, environ={}) as pool:
        reader = Reader(pool, None, registry, 1 << 20, False, frames_to_clients=frames_to_clients)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.read, flight)
                taken, pause = client_pause
                async with feed.receive_channel as channel:
                    async for item in channel:
                        items.append(item)
                        if len(items) == taken:
                            await trio.sleep(pause)  # not a synchronisation: a deadline passes
    return items


async def read_chunks(
    upstream: FakeUpstream, tmp_path: Path, body: dict[str, object], *, frames_to_clients: bool
) -> list[Chunk]:
    """The chunks one private flight's client receives for ``body``."""
    items = await read_items(upstream, tmp_path, body, frames_to_clients=frames_to_clients)
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


STREAM = {"model": "m", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
SHORT_IDLE = "[upstreams.default]\nidle_timeout = 0.2\n"


async def test_an_upstream_silent_for_its_idle_timeout_fails_the_flight_as_idle(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    items = await read_items(
        upstream, tmp_path, STREAM, knobs=((b"x-fake-stall-after", b"2"),), toml=SHORT_IDLE
    )
    chunks = [item for item in items if isinstance(item, Chunk)]
    end = items[-1]
    assert isinstance(end, FlightFailed)
    assert isinstance(end.error, UpstreamTimeout)
    assert end.error.phase == "idle"
    assert b"".join(chunk.data for chunk in chunks).count(b"data: ") == 2


async def test_a_paced_stream_with_gaps_under_the_idle_timeout_is_read_whole(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Each gap is under the timeout though the body takes longer than it."""
    items = await read_items(
        upstream, tmp_path, STREAM, knobs=((b"x-fake-delay", b"0.05"),), toml=SHORT_IDLE
    )
    assert isinstance(items[-1], UpstreamEnded)


async def test_a_client_that_takes_nothing_for_longer_than_the_idle_timeout_is_not_an_idle_upstream(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Its channel (one item) is full mid-body: the reader waits for the client with no idle
    deadline, then reads the rest, which the upstream sent meanwhile."""
    items = await read_items(
        upstream,
        tmp_path,
        STREAM,
        knobs=((b"x-fake-delay", b"0.01"),),
        toml=SHORT_IDLE,
        buffer_chunks=1,
        client_pause=(3, 0.6),  # the attempt, the headers and a first chunk taken
    )
    chunks = [item for item in items if isinstance(item, Chunk)]
    assert isinstance(items[-1], UpstreamEnded)
    assert b"".join(chunk.data for chunk in chunks).endswith(b"data: [DONE]\n\n")


# --- the idle deadline's bounds, on Trio's virtual clock ----------------------------------------


async def silence_before_the_cut(gaps: list[float], idle_timeout: float) -> float | None:
    """How long a body whose chunks come after ``gaps`` (seconds), then none, was silent when
    its idle deadline cut it; None if it was never cut."""
    received: list[float] = []

    async def body() -> AsyncIterator[bytes]:
        for gap in gaps:
            await trio.sleep(gap)
            received.append(trio.current_time())
            yield b"{}"
        await trio.sleep_forever()

    registry = FlightRegistry(max_background=0)
    request = chat_request({"model": "m", "messages": []})
    flight = LiveFlight(request, None, None, registry, buffer_chunks=1000, finish_timeout=1.0)
    flight.subscribe()
    reader = Reader(UpstreamPool({}), None, registry, 1 << 20, False)
    headers = [(b"content-type", b"application/json")]
    with trio.move_on_after(sum(gaps) + 100 * idle_timeout):  # read whole: never cut
        with pytest.raises(UpstreamTimeout) as raised:
            await reader._relay(flight, 200, headers, body(), None, idle_timeout)
        assert raised.value.phase == "idle"
        return trio.current_time() - received[-1]
    return None


@pytest.mark.parametrize("idle_timeout", [0.05, 2.0, 120.0])
@pytest.mark.parametrize(
    "shape", ["silent at once", "paced", "trickling just under the timeout", "one late chunk"]
)
async def test_a_body_is_cut_no_sooner_than_its_idle_timeout_and_at_most_an_eighth_later(
    autojump_clock: trio.testing.MockClock, idle_timeout: float, shape: str
) -> None:
    """The deadline is moved only once less than ``idle_timeout`` is left to it, then
    ``min(1 s, idle_timeout / 8)`` further: a body is cut ``idle_timeout`` to that much more
    after its last chunk, never sooner, whatever the gaps before (a tiny timeout included)."""
    just_under = idle_timeout * 0.99
    gaps = {
        "silent at once": [0.0],
        "paced": [idle_timeout / 10] * 50,
        "trickling just under the timeout": [just_under] * 20,
        "one late chunk": [idle_timeout / 10] * 5 + [just_under] + [idle_timeout / 100] * 3,
    }[shape]
    silence = await silence_before_the_cut(gaps, idle_timeout)
    assert silence is not None
    slack = min(MAX_IDLE_SLACK, idle_timeout / 8)
    rounding = 1e-9  # the virtual clock's times are sums of floats
    assert idle_timeout - rounding <= silence <= idle_timeout + slack + rounding
