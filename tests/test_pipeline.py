"""The client writer's joining of queued chunks (the rest of the pipeline is tested end to end in
test_proxy, test_cache and test_coalescing)."""

from __future__ import annotations

import trio

from tproxy.pipeline import (
    JOIN_BYTES,
    _Chunk,
    _CleanEnd,
    _ClientItem,
    _Start,
    _Subscriber,
    _take_queued_chunks,
)


def queued(*items: _ClientItem) -> trio.MemoryReceiveChannel[_ClientItem]:
    subscriber = _Subscriber(64, float("inf"))
    for item in items:
        subscriber.offer(item)
    return subscriber.receive_channel


async def test_chunks_queued_behind_the_first_are_joined_up_to_the_end() -> None:
    items = queued(_Chunk(b"b", 1), _Chunk(b"c", 0), _CleanEnd())
    parts, stop = _take_queued_chunks(_Chunk(b"a", 1), items)
    assert [part.data for part in parts] == [b"a", b"b", b"c"]
    assert isinstance(stop, _CleanEnd)


async def test_an_empty_queue_gives_the_first_chunk_alone() -> None:
    items = queued()
    parts, stop = _take_queued_chunks(_Chunk(b"a", 0), items)
    assert (parts, stop) == ([_Chunk(b"a", 0)], None)


async def test_a_run_stops_at_join_bytes_and_leaves_the_rest_queued() -> None:
    big = _Chunk(b"x" * (JOIN_BYTES // 2), 0)
    items = queued(big, big, _Start(200, []))
    parts, stop = _take_queued_chunks(big, items)
    assert (len(parts), stop) == (2, None)
    assert items.receive_nowait() == big
