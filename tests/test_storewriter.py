"""The store writer: entries handed over without waiting, written in batches, none lost at close."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tproxy.config import SharedStoreSettings
from tproxy.core.entry import StoredEntry
from tproxy.store import LmdbStore, PutOutcome, SharedTier
from tproxy.storewriter import StoreWriter


def entry(text: str) -> StoredEntry:
    now = time.time()
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"application/json"),),
        chunks=(text.encode(),),
        offsets=(0.0,),
        streamed=False,
        created_at=now,
        expires_at=now + 3600,
    )


def open_store(tmp_path: Path) -> LmdbStore:
    return LmdbStore(tmp_path / "store", max_total_bytes=1 << 24, max_entry_bytes=1 << 20)


async def test_submitted_entries_are_written_in_batches(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    writer = StoreWriter(store, capacity=64, max_batch=8)
    try:
        async with trio.open_nursery() as nursery:
            for index in range(20):
                assert writer.submit(f"key{index}", entry(f"answer {index}")) is not None
            await nursery.start(writer.serve)
            await writer.flush()
            writer.close()
        stats = writer.statistics()
        assert (stats.submitted, stats.written, stats.dropped, stats.failed) == (20, 20, 0, 0)
        assert stats.batches == 3  # 8 + 8 + 4: what had queued up, one transaction each
        stored = store.get("key19", time.time())
        assert stored is not None
        assert stored.chunks == (b"answer 19",)
    finally:
        store.close()


async def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    writer = StoreWriter(store, capacity=2)
    try:
        accepted = [writer.submit(f"k{index}", entry("x")) for index in range(5)]
        assert [pending is not None for pending in accepted] == [True, True, False, False, False]
        assert writer.statistics().dropped == 3
    finally:
        store.close()


async def test_closing_writes_the_last_partial_batch(tmp_path: Path) -> None:
    """The queue is closed with entries still in it: every one of them is written."""
    store = open_store(tmp_path)
    writer = StoreWriter(store, capacity=64, max_batch=64)
    try:
        for index in range(5):
            writer.submit(f"late{index}", entry(f"late {index}"))
        writer.close()
        with trio.fail_after(10):
            await writer.serve()
        assert writer.statistics().written == 5
        assert all(store.get(f"late{index}", time.time()) is not None for index in range(5))
    finally:
        store.close()


async def test_each_entry_learns_what_the_commit_did_with_it(tmp_path: Path) -> None:
    """A map too small for one entry: the commit refuses it, and neither its outcome nor the
    statistics say "written" (they did when the hand-over was taken for the write)."""
    store = LmdbStore(
        tmp_path / "store",
        max_total_bytes=1 << 20,
        max_entry_bytes=1 << 20,
        map_headroom=-(2 << 20),
    )
    writer = StoreWriter(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.serve)
            huge = writer.submit("huge", entry("x" * 900_000))
            small = writer.submit("small", entry("small"))
            assert huge is not None
            assert small is not None
            assert await huge.wait() is PutOutcome.MAP_FULL
            assert await small.wait() is PutOutcome.MAP_FULL  # one batch, one transaction
            later = writer.submit("later", entry("later"))
            assert later is not None
            assert await later.wait() is PutOutcome.WRITTEN
            writer.close()
        stats = writer.statistics()
        assert (stats.submitted, stats.written, stats.map_full, stats.failed) == (3, 1, 2, 0)
    finally:
        store.close()


def test_entries_go_to_the_shared_tier_too_unless_they_came_from_it(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    shared = SharedTier(SharedStoreSettings(url="redis://127.0.0.1:1/0", queue_size=1))
    writer = StoreWriter(store, shared=shared)
    try:
        assert writer.submit("fetched", entry("from the upstream")) is not None
        assert shared.statistics().queued == 1
        assert writer.submit("copied", entry("from the shared tier"), share=False) is not None
        assert shared.statistics().queued == 1
        # The shared tier's queue is its own: when it is full, only the shared copy is dropped.
        assert writer.submit("another", entry("from the upstream")) is not None
        assert shared.statistics().writes["dropped"] == 1
        assert writer.statistics().submitted == 3
    finally:
        store.close()
