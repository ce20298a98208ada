"""The cache store: tier 1 in LMDB, tier 2 (optional) in Valkey/Redis, and what they share.

- :mod:`tproxy.store.tiers`: the async tier protocols (:class:`CacheTier` for a lookup,
  :class:`TierAdmin` for the cache commands), :class:`LocalTier` and :func:`look_up`.
- :mod:`tproxy.store.lmdb`: :class:`LmdbStore`, the only module that imports lmdb.
- :mod:`tproxy.store.shared`: :class:`SharedTier` and :class:`SharedAdmin`, tier 2 in
  Valkey/Redis, through :mod:`tproxy.store.redis`, its connection: the only module that imports
  coredis.
- :mod:`tproxy.store.verify`: the read-only checker behind ``tproxy cache verify`` (LMDB only).
- :mod:`tproxy.store.records`: the values the tiers hand out, and LMDB's metadata record.

docs/store.md describes the whole; the names below are what the rest of tproxy imports.
"""

from tproxy.store.lmdb import DEFAULT_MAP_HEADROOM, SCHEMA_VERSION, LmdbStore
from tproxy.store.records import (
    MAX_KEY_BYTES,
    EntryInfo,
    PutOutcome,
    PutResult,
    StoreStats,
    VerifyReport,
    info_of,
)
from tproxy.store.redis import SharedStoreUnavailable, describe
from tproxy.store.shared import (
    LATENCY_BUCKETS,
    SharedAdmin,
    SharedStatistics,
    SharedTier,
    open_shared_admin,
    open_shared_tier,
)
from tproxy.store.tiers import (
    CacheStore,
    CacheTier,
    Found,
    LocalTier,
    TierAdmin,
    TierStats,
    look_up,
)

__all__ = [
    "DEFAULT_MAP_HEADROOM",
    "LATENCY_BUCKETS",
    "MAX_KEY_BYTES",
    "SCHEMA_VERSION",
    "CacheStore",
    "CacheTier",
    "EntryInfo",
    "Found",
    "LmdbStore",
    "LocalTier",
    "PutOutcome",
    "PutResult",
    "SharedAdmin",
    "SharedStatistics",
    "SharedStoreUnavailable",
    "SharedTier",
    "StoreStats",
    "TierAdmin",
    "TierStats",
    "VerifyReport",
    "describe",
    "info_of",
    "look_up",
    "open_shared_admin",
    "open_shared_tier",
]
