"""The cache writer: one flight's answer, collected for the store while it streams.

The reader feeds it with ``send_nowait`` on a channel bounded in bytes, not items: the reader
stops feeding it (and the answer is not stored) once the answer passes ``max_entry_bytes``, so a
cache writer that lags holds at most that much, and never slows a client. Its items are
:class:`CacheStart`, :class:`CacheChunk` (the bytes with the frames the reader already decoded),
:class:`CacheAbandoned`, and the core fact :class:`~tproxy.core.events.UpstreamEnded`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import trio

from tproxy.core.assemble import normalise_usage
from tproxy.core.cachekey import response_store_refusal
from tproxy.core.completion import StreamOutcome
from tproxy.core.dialects import Dialect
from tproxy.core.dialects.base import Completion
from tproxy.core.entry import StoredEntry
from tproxy.core.events import UpstreamEnded
from tproxy.core.headers import Header
from tproxy.core.sse import Frame
from tproxy.pipeline.request import CachePlan, CacheReport
from tproxy.store import PutOutcome
from tproxy.storewriter import StoreWriter

# Response headers kept with a cached answer and replayed with it.
REPLAYED_HEADERS = frozenset({b"content-type", b"content-language"})

# Seconds a client of a shared flight, its answer complete, waits for the flight's cache outcome:
# longer than the reader's END_TIMEOUT, so the access line of a client that left after the end
# says "stored".
SETTLE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class CacheStart:
    headers: list[Header]
    completion: Completion | None  # the reader's, for a stream in the family's framing
    dialect: Dialect  # judges a whole JSON answer


@dataclass(frozen=True, slots=True)
class CacheAbandoned:
    reason: str


@dataclass(frozen=True, slots=True)
class CacheChunk:
    frames: list[Frame] | None  # None for a body that is not an event stream
    data: bytes
    offset: float


CacheItem = CacheStart | CacheChunk | CacheAbandoned | UpstreamEnded


def offer(
    channel: trio.MemorySendChannel[CacheItem], item: CacheItem
) -> trio.MemorySendChannel[CacheItem] | None:
    """Hand an item to the cache writer without waiting.

    Returns the channel, or None once caching is abandoned: the cache writer fell behind or
    left, and the client must not wait for it.
    """
    try:
        channel.send_nowait(item)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        channel.close()
        return None
    return channel


def abandon(channel: trio.MemorySendChannel[CacheItem], reason: str) -> None:
    """Tell the cache writer why this answer will not be stored, and stop feeding it."""
    offer(channel, CacheAbandoned(reason))
    channel.close()


async def write_cache(
    store_writer: StoreWriter | None,
    plan: CachePlan,
    items: trio.MemoryReceiveChannel[CacheItem],
    report: CacheReport,
) -> None:
    """Collect the answer, hand it to the store writer, and wait (a little) for its commit."""
    async with items:
        outcome = await _collect(plan, items, report)
    if isinstance(outcome, str):
        report.reason = outcome
        return
    if store_writer is None:
        report.reason = "no store"
        return
    pending = store_writer.submit(plan.key, outcome)
    if pending is None:
        report.reason = "store writer busy"
        return
    # Until the commit lands, a request for this answer is served it from memory as a hit.
    report.entry = outcome
    # The flight stays joinable, and its clients' access lines wait, until the commit says
    # what it did: "stored" is the commit's word, not the hand-over's. A disk slower than
    # SETTLE_TIMEOUT leaves the line saying so; the entry is still written.
    report.reason = "commit pending"
    with trio.move_on_after(SETTLE_TIMEOUT):
        written = await pending.wait()
        report.stored = written is PutOutcome.WRITTEN
        report.reason = "stored" if report.stored else f"not stored: {written.value}"


async def _collect(
    plan: CachePlan, items: trio.MemoryReceiveChannel[CacheItem], report: CacheReport
) -> StoredEntry | str:
    """Accumulate one answer for the cache; return the entry, or why it cannot be stored."""
    start: CacheStart | None = None
    chunks: list[bytes] = []
    offsets: list[float] = []
    size = 0
    async for item in items:
        if isinstance(item, CacheStart):
            refusal = response_store_refusal(item.headers)
            if refusal is not None and not plan.ignore_upstream_no_store:
                return refusal
            start = item
        elif isinstance(item, CacheAbandoned):
            return item.reason
        elif isinstance(item, CacheChunk):
            size += len(item.data)
            if size > plan.max_entry_bytes:
                return f"larger than max_entry_bytes ({plan.max_entry_bytes})"
            if item.frames is None:
                chunks.append(item.data)
                offsets.append(item.offset)
                continue
            for frame in item.frames:
                chunks.append(frame.raw)
                offsets.append(item.offset)
        elif start is not None:
            return _entry_if_complete(plan, start, chunks, offsets, report)
    return "the answer did not end cleanly"


def _entry_if_complete(
    plan: CachePlan,
    start: CacheStart,
    chunks: list[bytes],
    offsets: list[float],
    report: CacheReport,
) -> StoredEntry | str:
    """The entry to store, or why not. The reader has shown every event to ``start.completion``
    by the time the clean end reaches the cache writer."""
    completion = start.completion
    if completion is not None:
        outcome, reason = completion.verdict(clean_end=True)
        report.usage = completion.usage
    else:
        body = b"".join(chunks)
        outcome, reason, report.usage = start.dialect.judge_json(200, body)
        chunks, offsets = [body], [offsets[-1] if offsets else 0.0]
    if outcome is not StreamOutcome.COMPLETE:
        return reason
    now = time.time()
    return StoredEntry(
        status=200,
        headers=tuple((n, v) for n, v in start.headers if n in REPLAYED_HEADERS),
        chunks=tuple(chunks),
        offsets=tuple(offsets),
        streamed=completion is not None,
        created_at=now,
        expires_at=now + plan.ttl if math.isfinite(plan.ttl) else math.inf,
        model=plan.model,
        usage=normalise_usage(report.usage),
    )
