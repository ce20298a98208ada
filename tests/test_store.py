"""The LMDB cache store, on real files: what it keeps, what it drops, and what survives a kill."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import mmap
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tproxy.store.lmdb
from tproxy.core.entry import StoredEntry, encode_entry
from tproxy.core.errors import StoreError
from tproxy.store import SCHEMA_VERSION, LmdbStore

KIB = 1024
MIB = 1024 * KIB
NOW = 1_000_000.0
PROJECT = Path(__file__).resolve().parent.parent


def body_entry(
    text: str, size: int = 1000, *, now: float = NOW, ttl: float = 3600.0
) -> StoredEntry:
    """A whole-body entry whose bytes are derived from ``text``."""
    seed = hashlib.sha256(text.encode()).hexdigest().encode()
    body = (seed * (size // len(seed) + 1))[:size]
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"application/json"),),
        chunks=(body,),
        offsets=(0.0,),
        streamed=False,
        created_at=now,
        expires_at=now + ttl,
        model="test-model",
    )


def stream_entry(frames: int, *, now: float = NOW, ttl: float = math.inf) -> StoredEntry:
    events = [f'data: {{"n": {n}}}\n\n'.encode() for n in range(frames)]
    chunks = (*events, b"data: [DONE]\n\n")
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"text/event-stream"),),
        chunks=chunks,
        offsets=tuple(0.01 * n for n in range(len(chunks))),
        streamed=True,
        created_at=now,
        expires_at=now + ttl,
    )


def entry_for_key(key: str) -> StoredEntry:
    """What the crash-test writer stores under ``key``: anyone can recompute it from the key."""
    digest = hashlib.sha256(key.encode()).digest()
    size = 2_000 + int.from_bytes(digest[:2], "big") % 40_000
    body = (digest * (size // len(digest) + 1))[:size]
    return StoredEntry(200, (), (body,), (0.0,), False, 1.0, math.inf, model=key)


def open_store(path: Path, **limits: int) -> LmdbStore:
    limits.setdefault("max_total_bytes", 4 * MIB)
    limits.setdefault("max_entry_bytes", 512 * KIB)
    return LmdbStore(path, **limits)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    opened = open_store(tmp_path / "cache")
    yield opened
    opened.close()


def keys_of(store: LmdbStore) -> set[str]:
    return {info.key for info in store.entries()}


# -- keeping and finding ---------------------------------------------------------------


def test_a_stored_entry_comes_back_equal(store: LmdbStore) -> None:
    body, stream = body_entry("a"), stream_entry(50)
    result = store.put_many([("body", body), ("stream", stream)], NOW)
    assert (result.stored, result.skipped_too_large, result.evicted) == (2, 0, 0)
    assert store.get("body", NOW) == body
    assert store.get("stream", NOW) == stream


def test_hits_and_misses_are_counted(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k"))], NOW)
    store.get("k", NOW)
    store.get("absent", NOW)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes == len(encode_entry(body_entry("k")))
    assert stats.schema_version == SCHEMA_VERSION


def test_putting_a_key_again_replaces_it_and_its_bytes(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("old", 5000))], NOW)
    store.put_many([("k", body_entry("new", 100))], NOW + 1)
    assert store.get("k", NOW + 1) == body_entry("new", 100)
    assert store.stats().bytes == len(encode_entry(body_entry("new", 100)))


def test_an_expired_entry_is_a_miss_and_counted_as_expired(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k", ttl=60))], NOW)
    assert store.get("k", NOW + 59) is not None
    assert store.get("k", NOW + 60) is None
    stats = store.stats()
    assert (stats.expired, stats.misses, stats.entries) == (1, 1, 1)


def test_delete_reports_whether_there_was_an_entry(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k"))], NOW)
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.get("k", NOW) is None
    assert store.stats().bytes == 0


def test_purge_by_age_also_drops_expired_entries(store: LmdbStore) -> None:
    store.put_many([("old", body_entry("old", now=NOW))], NOW)
    store.put_many([("short", body_entry("short", now=NOW + 50, ttl=10))], NOW + 50)
    store.put_many([("young", body_entry("young", now=NOW + 90))], NOW + 90)
    assert store.purge(older_than=100, now=NOW + 100) == 2
    assert keys_of(store) == {"young"}
    assert store.stats().bytes == len(encode_entry(body_entry("young", now=NOW + 90)))


def test_purge_of_everything_empties_the_store(store: LmdbStore) -> None:
    store.put_many([(f"k{n}", body_entry(str(n))) for n in range(5)], NOW)
    assert store.purge(older_than=None, now=NOW) == 5
    assert store.stats().entries == 0
    assert store.stats().bytes == 0
    assert store.put_many([("after", body_entry("after"))], NOW).stored == 1


def test_entries_lists_metadata_without_the_bodies(store: LmdbStore) -> None:
    store.put_many([("s", stream_entry(3)), ("b", body_entry("b", 700))], NOW)
    infos = {info.key: info for info in store.entries()}
    assert infos["s"].streamed is True
    assert infos["s"].model is None
    assert infos["s"].expires_at == math.inf
    assert infos["b"].model == "test-model"
    assert infos["b"].size == len(encode_entry(body_entry("b", 700)))
    assert infos["b"].status == 200


def test_entries_shows_hits_not_yet_written(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k"))], NOW)
    store.get("k", NOW + 30)
    assert next(store.entries()).last_used_at == NOW + 30


def test_a_reopened_store_keeps_entries_and_hit_times(tmp_path: Path) -> None:
    first = open_store(tmp_path / "cache")
    first.put_many([("k", body_entry("k"))], NOW)
    first.get("k", NOW + 30)
    first.close()
    again = open_store(tmp_path / "cache")
    assert next(again.entries()).last_used_at == NOW + 30
    assert again.get("k", NOW + 31) == body_entry("k")
    again.close()


def test_flush_touches_writes_pending_hits(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache")
    store.put_many([("k", body_entry("k"))], NOW)
    store.get("k", NOW + 5)
    assert store.flush_touches() == 1
    assert store.flush_touches() == 0
    store.close()


def test_the_directory_is_private_to_its_owner(store: LmdbStore, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    assert directory.stat().st_mode & 0o777 == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600


def test_reopening_with_the_same_cap_writes_nothing(tmp_path: Path) -> None:
    """So a restart needs no room on a full disk."""
    open_store(tmp_path / "cache").close()
    before = (tmp_path / "cache" / "data.mdb").read_bytes()
    open_store(tmp_path / "cache").close()
    assert (tmp_path / "cache" / "data.mdb").read_bytes() == before
    open_store(tmp_path / "cache", max_total_bytes=8 * MIB).close()
    assert (tmp_path / "cache" / "data.mdb").read_bytes() != before
    reader = LmdbStore.open_existing(tmp_path / "cache")
    assert reader.stats().max_bytes == 8 * MIB
    reader.close()


def test_close_twice_is_harmless_and_a_closed_store_misses(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache")
    store.put_many([("k", body_entry("k"))], NOW)
    store.close()
    store.close()
    assert store.get("k", NOW) is None
    with pytest.raises(StoreError):
        store.stats()


# -- limits and eviction ---------------------------------------------------------------


def test_the_least_recently_used_entry_is_evicted_first(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", max_total_bytes=32_000)  # three 10 KB entries fit
    for n, key in enumerate(("a", "b", "c")):
        store.put_many([(key, body_entry(key, 10_000))], NOW + n)
    assert store.get("a", NOW + 10) is not None  # a is now the most recently used
    result = store.put_many([("d", body_entry("d", 10_000))], NOW + 11)
    assert result.evicted == 1
    assert keys_of(store) == {"a", "c", "d"}
    assert store.stats().evictions == 1
    store.close()


def test_a_batch_larger_than_the_cap_keeps_its_newest_entries(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", max_total_bytes=32_000)
    batch = [(f"k{n}", body_entry(str(n), 10_000)) for n in range(5)]
    result = store.put_many(batch, NOW)
    assert (result.stored, result.evicted) == (5, 2)
    assert keys_of(store) == {"k2", "k3", "k4"}
    assert store.stats().bytes <= 32_000
    store.close()


def test_entries_over_the_size_limits_are_skipped_and_counted(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", max_total_bytes=50_000, max_entry_bytes=20_000)
    result = store.put_many(
        [
            ("fits", body_entry("fits", 20_000)),
            ("body too big", body_entry("big", 20_001)),
            ("k" * 500, body_entry("long key")),
        ],
        NOW,
    )
    assert (result.stored, result.skipped_too_large) == (1, 2)
    assert keys_of(store) == {"fits"}
    store.close()


def test_an_entry_bigger_than_the_whole_cap_is_skipped(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", max_total_bytes=10_000, max_entry_bytes=MIB)
    assert store.put_many([("k", body_entry("k", 10_000))], NOW).skipped_too_large == 1
    store.close()


def test_a_full_map_grows_up_to_its_bound(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", max_total_bytes=512 * KIB, map_headroom=0)
    initial = store.stats().map_size
    for n in range(40):
        result = store.put_many([(f"k{n}", body_entry(str(n), 15_000))], NOW + n)
        assert result.stored == 1
    assert initial < store.stats().map_size <= 2 * 512 * KIB
    assert store.get("k39", NOW + 40) == body_entry("39", 15_000)
    store.close()


def test_a_full_map_at_its_bound_evicts_the_oldest_and_stores_the_batch(tmp_path: Path) -> None:
    # A negative headroom makes the map smaller than the byte cap, so the map fills first.
    store = open_store(tmp_path / "cache", max_total_bytes=MIB, map_headroom=-900 * KIB)
    evicted = 0
    for n in range(0, 100, 4):
        batch = [(f"k{n + i}", body_entry(str(n + i), 15_000)) for i in range(4)]
        result = store.put_many(batch, NOW + n)
        assert (result.stored, result.skipped_no_room) == (4, 0)
        evicted += result.evicted
    assert evicted > 0
    assert keys_of(store) >= {"k96", "k97", "k98", "k99"}
    assert "k0" not in keys_of(store)
    store.close()


def test_an_entry_that_cannot_fit_the_map_is_skipped_with_a_warning_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(
        tmp_path / "cache", max_total_bytes=MIB, max_entry_bytes=MIB, map_headroom=-2 * MIB
    )
    with caplog.at_level(logging.WARNING, logger="tproxy.store"):
        result = store.put_many([("huge", body_entry("huge", 900_000))], NOW)
    assert (result.stored, result.skipped_no_room, result.disk_full) == (0, 1, 0)
    assert "cache store map stayed full; 1 cache entries not stored" in caplog.messages
    assert store.put_many([("small", body_entry("small"))], NOW).stored == 1
    assert store.verify(NOW).ok
    store.close()


def test_a_tiny_map_with_entries_near_its_cap_keeps_storing_by_evicting(tmp_path: Path) -> None:
    # The map may grow to 512 KiB; each entry is half of that or more, so every put after the
    # first few must evict (and copy-on-write needs room for the old pages meanwhile).
    cap = 256 * KIB
    store = open_store(tmp_path / "cache", max_total_bytes=cap, max_entry_bytes=cap, map_headroom=0)
    evicted = 0
    for n in range(12):
        entry = body_entry(str(n), min(120_000 + 12_000 * n, 250_000))
        result = store.put_many([(f"k{n}", entry)], NOW + n)
        assert (result.stored, result.skipped_no_room) == (1, 0)
        evicted += result.evicted
        assert store.get(f"k{n}", NOW + n) == entry
        assert store.stats().bytes <= cap
    assert evicted >= 10
    assert store.stats().map_size <= 2 * cap
    assert store.verify(NOW).ok
    store.close()


def test_reads_on_one_thread_survive_map_growth_by_a_writer_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The map starts at 512 KiB and must grow several times while the main thread reads.
    store = open_store(tmp_path / "cache", max_total_bytes=8 * MIB, map_headroom=-7680 * KIB)
    store.put_many([("stable", body_entry("stable"))], NOW)
    initial = store.stats().map_size

    def write() -> None:
        for n in range(60):
            batch = [(f"k{n}-{i}", body_entry(f"{n}-{i}", 15_000)) for i in range(4)]
            assert store.put_many(batch, NOW + n).stored == 4

    writer = threading.Thread(target=write)
    reads = 0
    with caplog.at_level(logging.WARNING, logger="tproxy.store"):
        writer.start()
        while writer.is_alive() and reads < 1_000_000:
            assert store.get("stable", NOW) == body_entry("stable")
            reads += 1
        writer.join()
    assert caplog.text == ""
    assert reads > 0
    assert store.stats().map_size > initial
    assert store.stats().entries == 241
    store.close()


# -- a full disk -----------------------------------------------------------------------


@contextmanager
def small_disk_at(mount_point: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at ``mount_point``, so a store can fill its file system; skips the test
    where mounting is refused (it needs root)."""
    mount_point.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk_at(tmp_path / "disk") as mount_point:
        yield mount_point


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system has no byte left."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
            write_pages(descriptor, 10_000)  # 40 MiB: far more than the small disk holds
    finally:
        os.close(descriptor)
    return filler


def write_pages(descriptor: int, count: int) -> None:
    for _ in range(count):
        os.write(descriptor, b"x" * 4096)


def test_a_full_disk_evicts_the_oldest_entries_and_storing_goes_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(small_disk / "cache", max_total_bytes=8 * MIB, max_entry_bytes=MIB)
    try:
        results = []
        with caplog.at_level(logging.WARNING, logger="tproxy.store"):
            for n in range(40):  # 4 MB into a 2 MiB file system
                results.append(store.put_many([(f"k{n}", body_entry(str(n), 100_000))], NOW + n))
        assert all((result.stored, result.skipped_no_room) == (1, 0) for result in results)
        refused = [result for result in results if result.disk_full]
        assert refused
        assert all(result.evicted > 0 for result in refused)
        assert any("the file system refused a write" in message for message in caplog.messages)
        for n in range(35, 40):
            assert store.get(f"k{n}", NOW + 40) == body_entry(str(n), 100_000)
        assert "k0" not in keys_of(store)
        assert store.verify(NOW).ok
    finally:
        store.close()


# The data file may not grow past CAPPED_FILE_BYTES: a write beyond it fails with EFBIG, as a
# full file system refuses the pages a commit appends, while pages inside the file are reused.
# Unlike a tmpfs this needs no root, so it runs everywhere.
CAPPED_FILE_BYTES = 2 * MIB
CAPPED_FILE_WRITER = textwrap.dedent(
    """
    import json, math, resource, signal, sys, threading
    from pathlib import Path
    from tproxy.core.entry import StoredEntry
    from tproxy.store import LmdbStore

    path, limit, batches, batch_size = sys.argv[1], *map(int, sys.argv[2:])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def answer(key):
        # A streamed answer as the proxy stores it: fifty frames of about 200 bytes.
        events = [json.dumps({"key": key, "i": i, "pad": "x" * 160}) for i in range(50)]
        frames = tuple(f"data: {event}\\n\\n".encode() for event in events)
        return StoredEntry(200, ((b"content-type", b"text/event-stream"),), frames,
                           tuple(0.01 * i for i in range(50)), True, 1.0, math.inf)

    store = LmdbStore(Path(path), max_total_bytes=1 << 30, max_entry_bytes=1 << 20)
    writing = True

    def look_up():
        # The proxy's lookups read while the writer commits: readers hold snapshots.
        while writing:
            store.get("absent", 1e6)

    reader = threading.Thread(target=look_up)
    reader.start()
    for b in range(batches):
        keys = [f"k{b}-{i}" for i in range(batch_size)]
        result = store.put_many([(key, answer(key)) for key in keys], 1e6 + b)
        print(json.dumps({"outcomes": [o.value for o in result.outcomes],
                          "disk_full": result.disk_full, "evicted": result.evicted,
                          "found": [store.get(key, 1e6 + b) == answer(key) for key in keys]}),
              flush=True)
    writing = False
    reader.join()
    print(json.dumps({"verify": list(store.verify(1e6).problems),
                      "size": Path(path, "data.mdb").stat().st_size}), flush=True)
    store.close()
    """
)


def test_a_data_file_that_cannot_grow_evicts_the_oldest_and_storing_goes_on(
    tmp_path: Path,
) -> None:
    # Batches of eight 10 KB streamed answers while another thread looks keys up, as in the
    # proxy: 40 batches are ~3 MB, more than the file may hold. Evicting an eighth of the store
    # in one transaction needed more new pages than the full file had free, which froze it.
    finished = subprocess.run(
        [
            sys.executable,
            "-c",
            CAPPED_FILE_WRITER,
            str(tmp_path / "cache"),
            str(CAPPED_FILE_BYTES),
            "80",
            "8",
        ],
        cwd=PROJECT,
        capture_output=True,
        timeout=120,
        check=True,
    )
    *batches, final = [json.loads(line) for line in finished.stdout.splitlines()]
    assert any(batch["disk_full"] for batch in batches), "the file never filled"
    for batch in batches:
        assert batch["outcomes"] == ["written"] * 8
        assert all(batch["found"])
    assert final == {"verify": [], "size": final["size"]}
    assert final["size"] <= CAPPED_FILE_BYTES


def test_a_batch_a_full_disk_cannot_hold_is_skipped_and_serving_goes_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(small_disk / "cache", max_total_bytes=8 * MIB, max_entry_bytes=2 * MIB)
    try:
        store.put_many([(f"k{n}", body_entry(str(n), 100_000)) for n in range(3)], NOW)
        filler = fill(small_disk)
        with caplog.at_level(logging.WARNING, logger="tproxy.store"):
            result = store.put_many([("huge", body_entry("huge", 1_500_000))], NOW + 1)
        assert (result.stored, result.skipped_no_room) == (0, 1)
        assert result.disk_full > 0
        assert "the file system stayed full; 1 cache entries not stored" in caplog.messages
        assert store.get("huge", NOW + 1) is None  # reads go on, whatever eviction took
        assert store.verify(NOW).ok
        filler.unlink()
        assert store.put_many([("after", body_entry("after"))], NOW + 2).stored == 1
        assert store.get("after", NOW + 2) == body_entry("after")
    finally:
        store.close()


# -- verify ----------------------------------------------------------------------------


def test_verify_finds_a_sound_store_sound_and_counts_it(store: LmdbStore) -> None:
    store.put_many(
        [
            ("body", body_entry("body")),
            ("stream", stream_entry(5)),
            ("short", body_entry("short", ttl=10)),
        ],
        NOW,
    )
    store.get("body", NOW + 5)
    store.flush_touches()
    report = store.verify(NOW + 20)
    assert report.ok
    assert report.problems == ()
    assert (report.entries, report.streamed, report.expired) == (3, 1, 1)
    assert report.bytes == report.recorded_bytes == store.stats().bytes
    assert report.path == store.stats().path


def store_with_a_torn_value(path: Path) -> None:
    """A closed store at ``path`` holding ``victim``, whose value has one byte flipped on disk
    (its checksum no longer holds), and ``bystander``, intact."""
    store = open_store(path)
    victim = body_entry("victim", 20_000)
    store.put_many([("victim", victim), ("bystander", body_entry("bystander"))], NOW)
    store.close()
    data = bytearray((path / "data.mdb").read_bytes())
    body = victim.chunks[0]
    assert data.count(body) == 1
    data[data.index(body) + 1000] ^= 0xFF
    (path / "data.mdb").write_bytes(bytes(data))


def test_verify_reports_a_value_that_does_not_decode(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    store_with_a_torn_value(path)
    reader = LmdbStore.open_existing(path)
    [problem] = reader.verify(NOW).problems
    assert problem.startswith("entry victim: cannot be decoded (")
    reader.close()


def test_verify_reports_every_disagreement_between_the_records(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    store = open_store(path)
    store.put_many(
        [
            ("alpha", body_entry("alpha")),
            ("bravo", body_entry("bravo")),
            ("charlie", body_entry("charlie", 2000)),
            ("delta", body_entry("delta", 3000, now=NOW - 10)),
        ],
        NOW,
    )
    store.close()
    stamp = struct.pack(">d", NOW)
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        info, lru, meta = (env.open_db(name, txn=txn) for name in (b"entry_info", b"lru", b"meta"))
        assert txn.delete(stamp + b"alpha", db=lru)
        assert txn.delete(b"bravo", db=info)
        delta_info = txn.get(b"delta", db=info)
        recorded = txn.get(b"total_bytes", db=meta)
        assert delta_info is not None
        assert recorded is not None
        txn.put(b"charlie", delta_info, db=info)
        txn.put(b"delta", b"xx", db=info)
        total = int.from_bytes(recorded, "big")
        txn.put(b"total_bytes", (total + 1).to_bytes(8, "big"), db=meta)
    env.close()
    charlie_size = len(encode_entry(body_entry("charlie", 2000)))
    delta_size = len(encode_entry(body_entry("delta", 3000, now=NOW - 10)))

    reader = LmdbStore.open_existing(path)
    report = reader.verify(NOW)
    reader.close()
    assert report.problems == (
        "entry_info delta: malformed record",
        "entry bravo: no entry_info record",
        f"entry_info charlie: size {delta_size}, the entry is {charlie_size} bytes",
        "entry_info charlie: created_at, expires_at differ from the entry's",
        "lru record for bravo: no such entry",
        "entry alpha: missing from the LRU index",
        f"meta total_bytes is {total + 1}, the entries hold {total}",
    )
    assert not report.ok
    assert (report.entries, report.bytes) == (4, total)


def test_verify_reports_damaged_pages_without_walking_them(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    store = open_store(path)
    keys = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(200)]
    store.put_many([(key, body_entry(key, 300)) for key in keys], NOW)
    store.close()
    data = bytearray((path / "data.mdb").read_bytes())
    page = data.index(keys[100].encode()) // mmap.PAGESIZE  # a leaf page of one of our trees
    data[page * mmap.PAGESIZE : page * mmap.PAGESIZE + 16] = b"\xff" * 16
    (path / "data.mdb").write_bytes(bytes(data))

    reader = LmdbStore.open_existing(path)
    report = reader.verify(NOW)
    reader.close()
    assert report.problems
    assert all(problem.startswith("LMDB structure: ") for problem in report.problems)
    assert any(f"page {page} " in problem for problem in report.problems)
    assert report.entries == 0  # the entries were not read through a damaged tree


def test_verify_is_sound_while_another_thread_writes(store: LmdbStore) -> None:
    store.put_many([("first", body_entry("first"))], NOW)
    stop = threading.Event()

    def write() -> None:
        for n in range(1000):
            if stop.is_set():
                return
            store.put_many([(f"k{n % 50}", body_entry(str(n), 5_000))], NOW + n)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        reports = [store.verify(NOW) for _ in range(5)]
    finally:
        stop.set()
        writer.join()
    assert [report.problems for report in reports] == [()] * 5


# -- damage, versions, and opening ----------------------------------------------------


def test_a_corrupt_value_is_a_miss_and_removed_at_the_next_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache"
    store_with_a_torn_value(path)
    store = open_store(path)
    with caplog.at_level(logging.WARNING, logger="tproxy.store"):
        assert store.get("victim", NOW) is None
    assert "corrupt" in caplog.text
    assert store.get("bystander", NOW) == body_entry("bystander")
    assert "victim" in keys_of(store)
    store.put_many([("new", body_entry("new"))], NOW)
    assert keys_of(store) == {"bystander", "new"}
    assert store.stats().bytes == sum(info.size for info in store.entries())
    store.close()


def test_a_store_of_another_schema_is_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(tproxy.store.lmdb, "SCHEMA_VERSION", 0)
        old = open_store(path)
        old.put_many([("k", body_entry("k"))], NOW)
        old.close()
    with caplog.at_level(logging.WARNING, logger="tproxy.store"):
        store = open_store(path)
    assert store.stats().entries == 0
    assert store.get("k", NOW) is None
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("cache.incompatible-0-")]
    assert len(aside) == 1
    assert (tmp_path / aside[0] / "data.mdb").is_file()
    assert "moved it to" in caplog.text
    store.close()


def test_a_directory_of_garbage_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"not lmdb" * 2000)
    store = open_store(path)
    store.put_many([("k", body_entry("k"))], NOW)
    assert store.get("k", NOW) is not None
    assert any(p.name.startswith("cache.incompatible-unreadable-") for p in tmp_path.iterdir())
    store.close()


def test_a_second_open_in_one_process_fails_without_moving_anything(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k"))], NOW)
    path = Path(store.stats().path)
    with pytest.raises(StoreError, match="already open"):
        open_store(path)
    assert [p.name for p in path.parent.iterdir()] == ["cache"]
    assert store.get("k", NOW) is not None


def test_open_existing_never_creates_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no cache store"):
        LmdbStore.open_existing(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_open_existing_reads_and_refuses_writes(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("k"))], NOW)
    path = Path(store.stats().path)
    store.close()
    reader = LmdbStore.open_existing(path)
    assert reader.peek("k") == body_entry("k")
    assert reader.stats().max_bytes == 4 * MIB  # the cap the writer recorded
    with pytest.raises(StoreError, match="read-only"):
        reader.put_many([("k2", body_entry("k2"))], NOW)
    reader.close()


def test_open_existing_reports_another_schema_and_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(tproxy.store.lmdb, "SCHEMA_VERSION", 7)
        open_store(path).close()
    with pytest.raises(StoreError, match="schema version 7"):
        LmdbStore.open_existing(path)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


# -- against a model ------------------------------------------------------------------


class StoreAgainstADict(RuleBasedStateMachine):
    """The store, driven with a fake clock, must agree with a dict after every step."""

    def __init__(self) -> None:
        super().__init__()
        # One directory per example: hypothesis runs many examples inside one test call, so
        # the tmp_path fixture cannot provide them.
        self.directory = Path(tempfile.mkdtemp(prefix="tproxy-store-"))
        self.store = open_store(self.directory / "cache", max_total_bytes=64 * MIB)
        self.model: dict[str, StoredEntry] = {}
        self.now = NOW

    keys = st.sampled_from(["a", "b", "c", "d", "e"])

    def make(self, key: str, size: int, ttl: float, streamed: bool) -> StoredEntry:
        if streamed:
            return stream_entry(size // 100, now=self.now, ttl=ttl)
        return body_entry(f"{key}{size}", size, now=self.now, ttl=ttl)

    @rule(
        items=st.lists(
            st.tuples(
                keys,
                st.integers(min_value=0, max_value=3000),
                st.sampled_from([5.0, 60.0, math.inf]),
                st.booleans(),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def put(self, items: list[tuple[str, int, float, bool]]) -> None:
        batch = [(key, self.make(key, size, ttl, streamed)) for key, size, ttl, streamed in items]
        assert self.store.put_many(batch, self.now).stored == len(batch)
        self.model.update(batch)

    @rule(key=keys)
    def get(self, key: str) -> None:
        expected = self.model.get(key)
        if expected is not None and expected.expires_at <= self.now:
            expected = None
        assert self.store.get(key, self.now) == expected

    @rule(key=keys)
    def delete(self, key: str) -> None:
        assert self.store.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(seconds=st.sampled_from([1.0, 10.0, 100.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(older_than=st.one_of(st.none(), st.sampled_from([0.0, 5.0, 50.0])))
    def purge(self, older_than: float | None) -> None:
        doomed = {
            key
            for key, entry in self.model.items()
            if older_than is None
            or entry.expires_at <= self.now
            or self.now - entry.created_at >= older_than
        }
        assert self.store.purge(older_than=older_than, now=self.now) == len(doomed)
        for key in doomed:
            del self.model[key]

    @precondition(lambda self: bool(self.model))
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = open_store(self.directory / "cache", max_total_bytes=64 * MIB)

    @invariant()
    def same_keys_and_bytes(self) -> None:
        assert keys_of(self.store) == set(self.model)
        stats = self.store.stats()
        assert stats.entries == len(self.model)
        assert stats.bytes == sum(len(encode_entry(entry)) for entry in self.model.values())

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)


TestStoreAgainstADict = StoreAgainstADict.TestCase
TestStoreAgainstADict.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)


# -- several processes ----------------------------------------------------------------

CRASH_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.test_store import entry_for_key
    from tproxy.store import LmdbStore

    store = LmdbStore(Path(sys.argv[1]), max_total_bytes=3 << 20, max_entry_bytes=1 << 20)
    start = int(sys.argv[2])
    for batch in range(start, start + 100_000):
        keys = [f"{batch}-{n}" for n in range(8)]
        store.put_many([(key, entry_for_key(key)) for key in keys], float(batch))
        print(batch, flush=True)
    """
)

SHARING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.test_store import entry_for_key
    from tproxy.store import LmdbStore

    store = LmdbStore(Path(sys.argv[1]), max_total_bytes=8 << 20, max_entry_bytes=1 << 20)
    filler = [(f"filler-{n}", entry_for_key(f"filler-{n}")) for n in range(80)]
    store.put_many(filler + [("shared", entry_for_key("shared"))], 1.0)
    store.close()
    print("written", flush=True)
    """
)


def start_python(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_line(process: subprocess.Popen[bytes], wanted: int, timeout: float = 30.0) -> int:
    """Read the writer's batch numbers until one is at least ``wanted``; return it."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    pending = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        data = os.read(process.stdout.fileno(), 4096)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if int(line) >= wanted:
                return int(line)
    process.kill()
    _, errors = process.communicate()
    raise AssertionError(f"the writer did not reach batch {wanted}: {errors.decode()}")


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_only_whole_entries(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    start = 0
    for wanted in (5, 20, 40):
        writer = start_python(CRASH_WRITER, str(path), str(start))
        reached = wait_for_line(writer, start + wanted)
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        assert writer.returncode == -signal.SIGKILL
        start = reached + 1

        store = open_store(path, max_total_bytes=3 * MIB, max_entry_bytes=MIB)
        infos = list(store.entries())
        assert infos
        for info in infos:
            assert store.get(info.key, 2.0) == entry_for_key(info.key)
        # Every batch the writer reported is either whole or evicted, never partial.
        last = [f"{reached}-{n}" for n in range(8)]
        assert all(store.get(key, 2.0) is not None for key in last)
        assert store.stats().bytes == sum(info.size for info in infos)
        store.close()


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    # This process maps only 256 KiB; the other one writes more than that, so reading here
    # must adopt the size the other process gave the map.
    reader = open_store(path, max_total_bytes=256 * KIB, map_headroom=0)
    writer = start_python(SHARING_WRITER, str(path))
    output, errors = writer.communicate(timeout=60)
    assert writer.returncode == 0, errors.decode()
    assert output == b"written\n"
    assert reader.get("shared", 2.0) == entry_for_key("shared")
    assert reader.stats().map_size > 256 * KIB
    reader.close()
