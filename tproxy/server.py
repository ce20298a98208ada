"""Serving: the only module that touches Hypercorn's configuration and the process's signals.

:func:`serve_tproxy` opens everything a server needs (store, upstream clients, the store writer),
serves the proxy and the admin listener with Hypercorn on Trio, and on shutdown closes them in
reverse order: stop accepting, let in-flight exchanges finish for ``server.graceful_timeout``,
cancel what remains (those exchanges end as ``shut_down``), write the queued cache entries, close
the store.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from tproxy.admin import AdminApp
from tproxy.app import ProxyApp
from tproxy.config import Settings
from tproxy.inflight import Inflight
from tproxy.pipeline import open_exchanger
from tproxy.store import CacheStore, LmdbStore
from tproxy.storewriter import StoreWriter
from tproxy.upstream import open_upstream_pool

log = logging.getLogger("tproxy")


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a started server listens, as Hypercorn reports it (``http://host:port``)."""

    proxy: list[str]
    admin: list[str]
    store_writer: StoreWriter | None
    inflight: Inflight


def _hypercorn_config(settings: Settings, bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.graceful_timeout = settings.server.graceful_timeout
    config.keep_alive_timeout = settings.server.keep_alive_timeout
    config.h11_max_incomplete_size = settings.server.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("tproxy.hypercorn")
    return config


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[CacheStore | None]:
    """The cache store when caching is on, closed on exit."""
    if not settings.cache.enabled:
        yield None
        return
    store = LmdbStore(
        settings.cache.dir,
        max_total_bytes=settings.cache.max_total_bytes,
        max_entry_bytes=settings.cache.max_entry_bytes,
    )
    try:
        yield store
    finally:
        store.close()


async def serve_tproxy(
    settings: Settings,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set, then drain and close; reports where it listens once ready."""
    async with open_store(settings) as store, open_upstream_pool(settings) as pool:
        writer = StoreWriter(store) if store is not None else None
        async with trio.open_nursery() as nursery:
            if writer is not None:
                await nursery.start(writer.serve)
            inflight = Inflight()
            admin_app = AdminApp(store)
            async with (
                open_exchanger(settings, pool, writer) as exchanger,
                trio.open_nursery() as servers,
            ):
                proxy_app = ProxyApp(settings, exchanger, store, inflight)
                proxy_binds = await servers.start(
                    partial(
                        serve,
                        _asgi(proxy_app),
                        _hypercorn_config(settings, settings.server.listen),
                        shutdown_trigger=stop.wait,
                    )
                )
                admin_binds = await servers.start(
                    partial(
                        serve,
                        _asgi(admin_app),
                        _hypercorn_config(settings, settings.server.admin_listen),
                        shutdown_trigger=stop.wait,
                    )
                )
                log.info("tproxy listening on %s (admin %s)", proxy_binds, admin_binds)
                task_status.started(Listening(proxy_binds, admin_binds, writer, inflight))
            if writer is not None:
                writer.close()


def _asgi(app: ProxyApp | AdminApp) -> ASGIFramework:
    """Our apps are plain ASGI 3 callables; Hypercorn types them with its own message types."""
    return cast(ASGIFramework, app)


async def run_until_signalled(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM; a second signal cancels the drain at once."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    if stop.is_set():
                        log.warning("second signal: stopping at once")
                        nursery.cancel_scope.cancel()
                        return
                    log.info("%s: draining", signal.Signals(signum).name)
                    stop.set()

            nursery.start_soon(watch_signals)
            await serve_tproxy(settings, stop)
            nursery.cancel_scope.cancel()
