"""The exchanges in flight: the one structure every request of a server shares on purpose.

It lets the admin listener show live exchanges, lets a drain know when the server is idle, and
lets tests wait for "every request has finished" without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from trio_util import AsyncValue

from tproxy.core.exchange import Exchange


class Inflight:
    """A registry of live exchanges with an awaitable count."""

    def __init__(self) -> None:
        self._exchanges: dict[int, Exchange] = {}
        self._count = AsyncValue(0)

    @contextmanager
    def track(self, exchange: Exchange) -> Iterator[None]:
        """Hold ``exchange`` in the registry for the duration of the block."""
        self._exchanges[id(exchange)] = exchange
        self._count.value = len(self._exchanges)
        try:
            yield
        finally:
            del self._exchanges[id(exchange)]
            self._count.value = len(self._exchanges)

    def __len__(self) -> int:
        return len(self._exchanges)

    def snapshot(self) -> list[Exchange]:
        return list(self._exchanges.values())

    async def wait_idle(self) -> None:
        """Return once no exchange is in flight."""
        await self._count.wait_value(0)
