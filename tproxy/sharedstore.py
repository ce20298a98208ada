"""The names ``tproxy.sharedstore`` had, now in :mod:`tproxy.store.redis`.

Kept while the store writer, telemetry and their tests are reshaped on other branches; delete it
once nothing imports ``tproxy.sharedstore``.
"""

from tproxy.store.redis import LATENCY_BUCKETS, SharedStatistics, SharedTier, open_shared_tier

__all__ = ["LATENCY_BUCKETS", "SharedStatistics", "SharedTier", "open_shared_tier"]
