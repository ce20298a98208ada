"""The client writer (joining queued chunks; what its exchange hears when its channel ends
early), and what a shared flight holds for its clients and does to them (the fan-out's rules are
in test_fanout; the pipeline end to end in test_proxy, test_cache and test_coalescing)."""

from __future__ import annotations

import pytest
import trio

from tproxy.asgi import Message
from tproxy.core.events import HeadersReceived, UpstreamEnded, UpstreamRequested
from tproxy.core.exchange import Exchange, State
from tproxy.core.fanout import Chunk, Fanout, FlightFailed, Item
from tproxy.core.flight import FlightRegistry, Policy
from tproxy.pipeline import CachePlan, ProxyRequest
from tproxy.pipeline.clientwriter import JOIN_BYTES, _take_queued_chunks, write_client
from tproxy.pipeline.live import SHARED_CHANNEL_ITEMS, ClientFeed, LiveFlight


def queued(*items: Item) -> ClientFeed:
    feed = ClientFeed(Fanout(shared=False), 64)
    for item in items:
        feed.send_channel.send_nowait(item)
    return feed


async def test_chunks_queued_behind_the_first_are_joined_up_to_the_end() -> None:
    items = queued(Chunk(b"b", 1), Chunk(b"c", 0), UpstreamEnded())
    parts, stop = _take_queued_chunks(Chunk(b"a", 1), items)
    assert [part.data for part in parts] == [b"a", b"b", b"c"]
    assert isinstance(stop, UpstreamEnded)


async def test_an_empty_queue_gives_the_first_chunk_alone() -> None:
    items = queued()
    parts, stop = _take_queued_chunks(Chunk(b"a", 0), items)
    assert (parts, stop) == ([Chunk(b"a", 0)], None)


async def test_a_run_stops_at_join_bytes_and_leaves_the_rest_queued() -> None:
    big = Chunk(b"x" * (JOIN_BYTES // 2), 0)
    items = queued(big, big, HeadersReceived(200))
    parts, stop = _take_queued_chunks(big, items)
    assert (len(parts), stop) == (2, None)
    assert items.receive_channel.receive_nowait() == big


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


def shared_flight() -> LiveFlight:
    plan = CachePlan(key="k", ttl=60.0, max_entry_bytes=MAX_ENTRY, model=None, shared=True)
    registry = FlightRegistry(max_background=0)
    book, _ = registry.join("k", Policy.CANCEL)
    return LiveFlight(REQUEST, plan, book, registry, buffer_chunks=8, finish_timeout=1.0)


def drain(feed: ClientFeed) -> list[Item]:
    """Take what is queued for ``feed``, as its writer does (without sending it)."""
    taken: list[Item] = []
    while True:
        try:
            taken.append(feed.receive_channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            feed.taken(len(taken))
            return taken


async def test_a_joiner_gets_the_chunks_the_flight_published_not_a_copy_of_its_own() -> None:
    flight = shared_flight()
    await flight.publish(HeadersReceived(200))
    reads = [Chunk(bytes([65 + n % 26]) * 40_000, 1) for n in range(20)]  # 800 kB in 40 kB reads
    for read in reads:
        await flight.publish(read)
    for joiner in (flight.subscribe(), flight.subscribe()):
        chunks = [item for item in drain(joiner) if isinstance(item, Chunk)]
        assert all(got is published for got, published in zip(chunks, reads, strict=True))
        assert flight.fanout.held_bytes(joiner) == 800_000


async def test_a_joiner_of_a_history_of_many_small_reads_is_not_cut_off() -> None:
    flight = shared_flight()
    for _ in range(3 * SHARED_CHANNEL_ITEMS):  # more reads than a client's channel takes live
        await flight.publish(Chunk(b"data: x\n\n", 1))
    joiner = flight.subscribe()
    assert not joiner.fell_behind
    assert len(drain(joiner)) == 3 * SHARED_CHANNEL_ITEMS


async def test_a_client_holds_what_its_writer_has_not_yet_sent() -> None:
    flight = shared_flight()
    subscriber = flight.subscribe()
    piece = Chunk(b"x" * (MAX_ENTRY // 2), 0)
    await flight.publish(piece)
    assert drain(subscriber) == [piece]  # taken; its send() has not returned
    await flight.publish(piece)
    assert flight.fanout.held_bytes(subscriber) == MAX_ENTRY
    assert not subscriber.fell_behind
    # One more byte than max_entry_bytes, though the channel itself holds only half of it.
    await flight.publish(Chunk(b"y", 0))
    assert subscriber.fell_behind
    assert subscriber.left  # it left the flight's book at once
    assert flight.fanout.clients == []


async def test_the_history_never_passes_max_entry_bytes() -> None:
    flight = shared_flight()
    assert flight.book is not None
    for _ in range(5):
        await flight.publish(Chunk(b"z" * (MAX_ENTRY // 4), 0))
        assert flight.fanout.history_bytes <= MAX_ENTRY
    assert not flight.book.joinable


async def test_an_interrupted_flight_tells_its_clients_and_closes_their_channels() -> None:
    flight = shared_flight()
    subscriber = flight.subscribe()
    await flight.publish(HeadersReceived(200))
    flight.end(interrupted=True)
    items = drain(subscriber)
    assert items[0] == HeadersReceived(200)
    assert isinstance(items[1], FlightFailed)
    with pytest.raises(trio.EndOfChannel):
        await subscriber.receive_channel.receive()
    late = flight.subscribe()  # a completed flight's book may still hand it out
    assert drain(late) == items
    assert not late.fell_behind


async def test_a_client_whose_writer_is_gone_leaves_the_flight_at_the_next_item() -> None:
    flight = shared_flight()
    subscriber = flight.subscribe()
    subscriber.receive_channel.close()  # its writer returned
    await flight.publish(Chunk(b"data: 1\n\n", 1))
    assert subscriber.left
    assert flight.fanout.clients == []


async def test_a_client_past_its_bound_at_the_interruption_is_cut_off() -> None:
    flight = shared_flight()
    subscriber = flight.subscribe()
    for _ in range(SHARED_CHANNEL_ITEMS):
        await flight.publish(Chunk(b""))
    flight.end(interrupted=True)  # no room left for the failure
    assert subscriber.fell_behind
    assert len(drain(subscriber)) == SHARED_CHANNEL_ITEMS


# --- the client writer, told by its channel ----------------------------------------------------


async def write(feed: ClientFeed) -> tuple[Exchange, list[Message]]:
    """Run a client writer over what ``feed`` holds; return its exchange and what it sent."""
    exchange = Exchange("r1", started_at=trio.current_time())
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    def stop_watching() -> None:
        pass

    await write_client(REQUEST, exchange, feed, send, None, stop_watching, None)
    return exchange, sent


async def test_a_client_cut_off_mid_answer_gets_a_truncated_body_and_fell_behind() -> None:
    flight = shared_flight()
    feed = flight.subscribe()
    for item in (UpstreamRequested("u", 1), HeadersReceived(200), Chunk(b"data: 1\n\n", 1)):
        await flight.publish(item)
    feed.cut_off()
    exchange, sent = await write(feed)
    assert exchange.state is State.FELL_BEHIND
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1]["more_body"]  # never a clean short answer


async def test_a_flight_that_ends_without_its_end_fails_its_client() -> None:
    flight = shared_flight()
    feed = flight.subscribe()
    await flight.publish(UpstreamRequested("u", 1))
    feed.send_channel.close()
    exchange, sent = await write(feed)
    assert exchange.state is State.UPSTREAM_FAILED
    assert exchange.reason == "the flight ended without an answer"
    assert sent == []
