"""The exchanges in flight: the one structure every request of a server shares on purpose.

It lets the admin listener show live exchanges, lets a drain know when the server is idle, and
lets tests wait for "every request has finished" without sleeping.
"""

from __future__ import annotations

from trio_util import AsyncValue

from tproxy.core.exchange import Exchange


class Inflight:
    """A registry of live exchanges with an awaitable count."""

    def __init__(self) -> None:
        self._exchanges: dict[int, Exchange] = {}
        self._count = AsyncValue(0)

    def track(self, exchange: Exchange) -> _Tracked:
        """Hold ``exchange`` in the registry for the duration of the block."""
        return _Tracked(self, exchange)

    def _add(self, exchange: Exchange) -> None:
        self._exchanges[id(exchange)] = exchange
        self._count.value = len(self._exchanges)

    def _remove(self, exchange: Exchange) -> None:
        del self._exchanges[id(exchange)]
        self._count.value = len(self._exchanges)

    def __len__(self) -> int:
        return len(self._exchanges)

    def snapshot(self) -> list[Exchange]:
        return list(self._exchanges.values())

    async def wait_idle(self) -> None:
        """Return once no exchange is in flight."""
        await self._count.wait_value(0)


class _Tracked:
    """:meth:`Inflight.track`'s block: a plain context manager, since one is held for every
    request's whole life (a generator's is a frame and a wrapper, ~0.4 KB)."""

    __slots__ = ("_exchange", "_inflight")

    def __init__(self, inflight: Inflight, exchange: Exchange) -> None:
        self._inflight = inflight
        self._exchange = exchange

    def __enter__(self) -> None:
        self._inflight._add(self._exchange)

    def __exit__(self, *exc_info: object) -> None:
        self._inflight._remove(self._exchange)
