"""The client writer's joining of queued chunks, and what a shared flight holds for its clients
(the rest of the pipeline is tested end to end in test_proxy, test_cache and test_coalescing)."""

from __future__ import annotations

import trio

from tproxy.core.flight import FlightRegistry, Policy
from tproxy.pipeline import (
    JOIN_BYTES,
    SHARED_CHANNEL_ITEMS,
    CachePlan,
    ProxyRequest,
    _Chunk,
    _CleanEnd,
    _ClientItem,
    _LiveFlight,
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


# --- what a shared flight holds for its clients ------------------------------------------------

MAX_ENTRY = 1 << 20
REQUEST = ProxyRequest(
    request_id=b"r1",
    method="POST",
    target="/v1/chat/completions",
    headers=[],
    body=b"{}",
    client_host=None,
    scheme="http",
    upstreams=("u",),
    retries=0,
    total_timeout=60.0,
)


def shared_flight() -> _LiveFlight:
    plan = CachePlan(key="k", ttl=60.0, max_entry_bytes=MAX_ENTRY, model=None, shared=True)
    book, _ = FlightRegistry(max_background=0).join("k", Policy.CANCEL)
    return _LiveFlight(REQUEST, plan, book, buffer_chunks=8)


def drain(items: trio.MemoryReceiveChannel[_ClientItem]) -> list[_ClientItem]:
    taken: list[_ClientItem] = []
    while True:
        try:
            taken.append(items.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return taken


async def test_a_joiner_gets_the_chunks_the_flight_published_not_a_copy_of_its_own() -> None:
    flight = shared_flight()
    await flight.publish(_Start(200, []))
    reads = [_Chunk(bytes([65 + n % 26]) * 40_000, 1) for n in range(20)]  # 800 kB in 40 kB reads
    for read in reads:
        await flight.publish(read)
    for joiner in (flight.subscribe(), flight.subscribe()):
        chunks = [item for item in drain(joiner.receive_channel) if isinstance(item, _Chunk)]
        assert all(got is published for got, published in zip(chunks, reads, strict=True))
        assert joiner.held_bytes == 800_000


async def test_a_joiner_of_a_history_of_many_small_reads_is_not_cut_off() -> None:
    flight = shared_flight()
    for _ in range(3 * SHARED_CHANNEL_ITEMS):  # more reads than a client's channel takes live
        await flight.publish(_Chunk(b"data: x\n\n", 1))
    joiner = flight.subscribe()
    assert not joiner.fell_behind
    assert len(drain(joiner.receive_channel)) == 3 * SHARED_CHANNEL_ITEMS


async def test_a_client_holds_what_its_writer_has_not_yet_sent() -> None:
    flight = shared_flight()
    subscriber = flight.subscribe()
    piece = _Chunk(b"x" * (MAX_ENTRY // 2), 0)
    assert await flight.publish(piece) == []
    assert drain(subscriber.receive_channel) == [piece]  # taken; its send() has not returned
    assert await flight.publish(piece) == []
    assert subscriber.held_bytes == MAX_ENTRY
    # One more byte than max_entry_bytes, though the channel itself holds only half of it.
    assert await flight.publish(_Chunk(b"y", 0)) == [subscriber]
    assert subscriber.fell_behind
    assert flight.subscribers == []


async def test_the_history_never_passes_max_entry_bytes() -> None:
    flight = shared_flight()
    assert flight.book is not None
    for _ in range(5):
        await flight.publish(_Chunk(b"z" * (MAX_ENTRY // 4), 0))
        assert flight.history.size <= MAX_ENTRY
    assert not flight.book.joinable
