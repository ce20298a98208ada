"""The tier protocols: a lookup across tiers, and the LMDB store as an async tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_store import NOW, body_entry, open_store, stream_entry
from tproxy.core.entry import StoredEntry
from tproxy.store import CacheTier, Found, LmdbStore, LocalTier, look_up

FRESH_FOR = 60.0


class DictTier:
    """A tier holding entries in a dict: the oracle's tier, counting how often it was asked."""

    def __init__(self, name: str, entries: dict[str, StoredEntry]) -> None:
        self.name = name
        self.entries = entries
        self.asked = 0

    async def get(self, key: str, now: float) -> StoredEntry | None:
        self.asked += 1
        entry = self.entries.get(key)
        return entry if entry is not None and entry.expires_at > now else None


def fresh(entry: StoredEntry) -> bool:
    return NOW - entry.created_at <= FRESH_FOR


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    opened = open_store(tmp_path / "cache")
    yield opened
    opened.close()


# Per tier: nothing, a fresh entry, or one too old for the request.
HOLDINGS = st.lists(st.sampled_from(["none", "fresh", "old"]), max_size=4)


@given(HOLDINGS)
async def test_the_first_usable_entry_wins_and_older_ones_are_remembered(
    holdings: list[str],
) -> None:
    tiers = [
        DictTier(
            f"tier{index}",
            {}
            if held == "none"
            else {"k": body_entry(f"{index}", now=NOW if held == "fresh" else NOW - 2 * FRESH_FOR)},
        )
        for index, held in enumerate(holdings)
    ]
    found = await look_up(tiers, "k", NOW, fresh)
    first = holdings.index("fresh") if "fresh" in holdings else -1
    asked_before = holdings if first < 0 else holdings[:first]
    assert found.tier == first
    assert found.entry is (tiers[first].entries["k"] if first >= 0 else None)
    assert found.stale == ("old" in asked_before)
    # A tier after the one that answered is never asked.
    assert [tier.asked for tier in tiers] == [
        1 if first < 0 or index <= first else 0 for index in range(len(tiers))
    ]


async def test_no_tiers_is_a_miss() -> None:
    assert await look_up([], "k", NOW, fresh) == Found(None, -1, False)


async def test_the_lmdb_store_answers_as_tier_one_before_the_next_tier(store: LmdbStore) -> None:
    store.put_many([("k", body_entry("local"))], NOW)
    shared = DictTier("shared", {"k": body_entry("shared")})
    tiers: list[CacheTier] = [LocalTier(store), shared]
    found = await look_up(tiers, "k", NOW, fresh)
    assert found == Found(store.get("k", NOW), 0, False)
    assert shared.asked == 0
    assert (await look_up(tiers, "other", NOW, fresh)).tier == -1
    assert shared.asked == 1


async def test_tier_one_answers_from_an_answer_not_yet_committed(store: LmdbStore) -> None:
    landed = {"k": body_entry("landed")}
    asked: list[str] = []

    async def landed_answer(key: str) -> StoredEntry | None:
        asked.append(key)
        return landed.get(key)

    tier = LocalTier(store, landed=landed_answer)
    assert await tier.get("k", NOW) is landed["k"]
    store.put_many([("stored", body_entry("stored"))], NOW)
    assert await tier.get("stored", NOW) == body_entry("stored")
    assert asked == ["k"]  # a stored entry needs no look at the flights


async def test_the_lmdb_store_as_an_admin_tier(store: LmdbStore) -> None:
    store.put_many(
        [("body", body_entry("b")), ("stream", stream_entry(3, now=NOW - 10))],
        NOW,
    )
    store.put_many([("old", body_entry("o", now=NOW - 7200, ttl=3600))], NOW)
    tier = LocalTier(store)
    assert tier.where == str(store.path)
    assert tier.keeps_last_use
    stats = await tier.stats(NOW)
    assert (stats.entries, stats.streamed, stats.expired) == (3, 1, 1)
    assert stats.bytes == store.stats().bytes
    assert stats.oldest_created_at == NOW - 7200
    assert stats.max_bytes == store.stats().max_bytes
    assert stats.foreign == 0
    assert sorted(info.key for info in await tier.scan()) == ["body", "old", "stream"]
    assert await tier.peek("old") == body_entry("o", now=NOW - 7200, ttl=3600)
    assert await tier.peek("missing") is None
    assert await tier.purge(older_than=3600, now=NOW) == 1
    assert await tier.purge(older_than=None, now=NOW) == 2
    assert (await tier.stats(NOW)).entries == 0
