"""The memo of decoded entries: it saves work on hot keys and can never answer with a value the
store no longer holds."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_entry import entries, sample_stream
from tproxy.core.entry import StoredEntry, decode_entry, encode_entry
from tproxy.core.errors import CorruptEntry
from tproxy.store import LmdbStore
from tproxy.store.decoded import LARGEST_SHARE, DecodedEntries

NOW = 1_700_000_000.0


def encoded(model: str, body_size: int = 10) -> bytes:
    return encode_entry(
        StoredEntry(
            status=200,
            headers=(),
            chunks=(b"x" * body_size,),
            offsets=(0.0,),
            streamed=False,
            created_at=NOW,
            expires_at=NOW + 60,
            model=model,
        )
    )


def test_a_value_read_again_is_answered_by_the_entry_already_decoded() -> None:
    memo = DecodedEntries()
    raw = encode_entry(sample_stream())
    first = memo.decode(raw)
    again = memo.decode(bytes(bytearray(raw)))  # equal bytes, as a store's next read gives them
    assert first == sample_stream()
    assert again is first


def test_what_many_requests_share_cannot_be_changed_by_one() -> None:
    memo = DecodedEntries()
    entry = memo.decode(encode_entry(dataclasses.replace(sample_stream(), usage={"total": 3})))
    assert entry.usage == {"total": 3}
    with pytest.raises(TypeError):
        entry.usage["total"] = 0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.model = "other"  # type: ignore[misc]
    assert isinstance(entry.chunks, tuple)


def test_a_changed_value_is_decoded_afresh() -> None:
    memo = DecodedEntries()
    assert memo.decode(encoded("old")).model == "old"
    assert memo.decode(encoded("new")).model == "new"
    assert memo.decode(encoded("old")).model == "old"


def test_a_torn_value_raises_as_decoding_does_and_is_not_kept() -> None:
    memo = DecodedEntries()
    raw = encoded("m")
    torn = raw[:-1] + bytes([raw[-1] ^ 1])
    memo.decode(raw)
    for _ in range(2):
        with pytest.raises(CorruptEntry):
            memo.decode(torn)
    assert len(memo) == 1


def test_the_least_recently_used_values_leave_first_once_the_bound_is_passed() -> None:
    values = [encoded(f"model-{n}") for n in range(LARGEST_SHARE + 1)]
    memo = DecodedEntries(max_bytes=LARGEST_SHARE * len(values[0]))  # room for all but one
    first, second, *_ = (memo.decode(raw) for raw in values[:-1])
    assert memo.decode(values[0]) is first  # now the most recently used; the second the least
    memo.decode(values[-1])  # over the bound: the second leaves
    assert len(memo) == LARGEST_SHARE
    assert memo.decode(values[0]) is first
    assert memo.decode(values[1]) is not second  # decoded afresh
    assert memo.decode(values[1]) == second


def test_a_value_too_large_for_its_share_of_the_bound_is_decoded_each_time() -> None:
    raw = encoded("big", body_size=1000)
    memo = DecodedEntries(max_bytes=len(raw) * LARGEST_SHARE - 1)
    assert memo.decode(raw) == decode_entry(raw)
    assert len(memo) == 0


@given(
    st.lists(st.sampled_from(range(6)), max_size=40), st.lists(entries(), min_size=6, max_size=6)
)
def test_any_sequence_of_reads_gives_what_decoding_gives(
    order: list[int], pool: list[StoredEntry]
) -> None:
    values = [encode_entry(entry) for entry in pool]
    memo = DecodedEntries(max_bytes=2 * max(map(len, values)) * LARGEST_SHARE)
    for index in order:
        assert memo.decode(values[index]) == pool[index]


def test_threads_reading_at_once_each_get_the_right_entry() -> None:
    values = [encoded(f"model-{n}") for n in range(2 * LARGEST_SHARE)]
    memo = DecodedEntries(max_bytes=LARGEST_SHARE * len(values[0]))  # keeping and evicting race
    wrong: list[str] = []

    def read(offset: int) -> None:
        for turn in range(500):
            index = (turn + offset) % len(values)
            model = memo.decode(values[index]).model
            if model != f"model-{index}":
                wrong.append(f"{index}: {model}")

    threads = [threading.Thread(target=read, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert wrong == []
    assert len(memo) <= LARGEST_SHARE


def test_the_store_answers_a_replaced_key_with_its_new_value(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "cache", max_total_bytes=1 << 20, max_entry_bytes=1 << 16)
    try:
        old, new = decode_entry(encoded("old")), decode_entry(encoded("new"))
        store.put_many([("k", old)], NOW)
        assert store.get("k", NOW) == old
        assert store.get("k", NOW) == old  # the memo answers; the store still counts the hit
        store.put_many([("k", new)], NOW)
        assert store.get("k", NOW) == new
        assert store.stats().hits == 3
    finally:
        store.close()
