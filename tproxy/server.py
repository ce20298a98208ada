"""Serving: the only module that touches Hypercorn's configuration and the process's signals.

:func:`serve_tproxy` opens everything a server needs (store, the shared tier when configured,
upstream clients, the store writer),
serves the proxy and the admin listener with Hypercorn on Trio, and on shutdown closes them in
reverse order: stop accepting, let in-flight exchanges finish for ``server.graceful_timeout``,
cancel what remains (those exchanges end as ``shut_down``), write the queued cache entries, close
the store. The shared tier is opened after the store and closed before it, its queue given
``shared_store.write_timeout`` to drain; a shared tier that is down never stops tproxy from
starting. The admin listener stays up until the proxy's drain is over, so ``/readyz`` and the
metrics can be read while streams finish.

:func:`run_until_signalled` is the process around it: SIGTERM or SIGINT starts the drain, a
second one cancels it at once (LMDB commits are atomic, so the store stays consistent either
way), SIGHUP reloads TLS certificates and says that nothing else is reloaded (see
docs/operations.md), and the service manager hears
READY, STOPPING, STATUS and watchdog pings through :mod:`tproxy.notify`.
"""

from __future__ import annotations

import gc
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol, cast

import trio
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

from tproxy.admin import AdminApp, read_admin_token
from tproxy.app import ProxyApp
from tproxy.config import ListenerTLS, Settings
from tproxy.core.clientauth import ClientKeys
from tproxy.core.errors import StoreError, TproxyError
from tproxy.inflight import Inflight
from tproxy.notify import Notifier, open_notifier
from tproxy.pipeline import Exchanger, open_exchanger
from tproxy.serving import SocketOptions, serve_asgi
from tproxy.store import CacheStore, LmdbStore, SharedTier, open_shared_tier
from tproxy.storewriter import StoreWriter
from tproxy.telemetry import open_telemetry
from tproxy.tls import TLSFileError, read_certificate, reload_cert_chain
from tproxy.upstream import open_upstream_pool

log = logging.getLogger("tproxy")

# Seconds between two STATUS= lines sent to the service manager.
STATUS_INTERVAL = 5.0

# Seconds a client gets to complete its TLS handshake (Hypercorn's default is a minute).
TLS_HANDSHAKE_TIMEOUT = 10.0

RELOAD_REFUSAL = (
    "SIGHUP: reload is not supported; restart the service to apply new settings "
    "(in-flight streams drain for server.graceful_timeout = %gs)"
)


@dataclass(slots=True)
class ServerStatus:
    """What a server knows about its own work: the one line ``systemctl status`` shows.

    ``draining`` is set the moment the server stops accepting (it is the server's ``stop``): the
    hook for anything that should behave differently during a drain.
    """

    proxy: list[str]
    inflight: Inflight
    store: CacheStore | None
    draining: trio.Event
    app: ProxyApp | None = None

    @property
    def handled(self) -> int:
        """HTTP requests the proxy has finished."""
        return 0 if self.app is None else self.app.handled

    def summary(self) -> str:
        """E.g. ``http://127.0.0.1:8080: 2 in flight, 130 handled, cache hits 41% of 90``."""
        parts = [f"{len(self.inflight)} in flight", f"{self.handled} handled"]
        if self.store is not None:
            try:
                stats = self.store.stats()
            except StoreError:
                parts.append("cache unreadable")
            else:
                lookups = stats.hits + stats.misses
                if lookups:
                    parts.append(f"cache hits {100 * stats.hits // lookups}% of {lookups}")
        where = " ".join(self.proxy)
        state = "draining " if self.draining.is_set() else ""
        return f"{state}{where}: {', '.join(parts)}"


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a started server listens, as Hypercorn reports it (``http://host:port``)."""

    proxy: list[str]
    admin: list[str]
    store_writer: StoreWriter | None
    inflight: Inflight
    status: ServerStatus
    exchanger: Exchanger
    certificates: tuple[Certificate, ...] = ()

    def reload_certificates(self) -> None:
        """Load the listeners' renewed certificates (SIGHUP); see :func:`reload_certificates`."""
        reload_certificates(self.certificates, self.exchanger.telemetry)


def _hypercorn_config(settings: Settings, bind: str, tls: ListenerTLS | None) -> Config:
    config = Config()
    config.bind = [bind]
    config.graceful_timeout = settings.server.graceful_timeout
    config.keep_alive_timeout = settings.server.keep_alive_timeout
    config.h11_max_incomplete_size = settings.server.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("tproxy.hypercorn")
    if tls is not None:
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
        if tls.client_ca is not None:
            config.ca_certs = str(tls.client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    return config


@dataclass(frozen=True, slots=True)
class Certificate:
    """A listener's live TLS context and the files it was loaded from, for a reload."""

    listener: str  # "proxy" or "admin": the label of its expiry metric
    context: ssl.SSLContext
    files: ListenerTLS

    def reload(self) -> None:
        """Load the files again into the live context; raises TLSFileError and keeps the old
        certificate when they cannot be used."""
        reload_cert_chain(self.context, self.files.cert, self.files.key)

    def expires_at(self) -> float:
        """When the certificate in the files expires, Unix time; raises TLSFileError."""
        return read_certificate(self.files.cert).not_after.timestamp()


class ExpiryWatcher(Protocol):
    """Whoever reports when a listener's certificate expires: a process's telemetry, or the
    supervisor's admin listener for its own certificate."""

    def note_certificate(self, listener: str, expires_at: float) -> None: ...


def note_expiry(certificate: Certificate, telemetry: ExpiryWatcher) -> None:
    """Tell the metrics when the certificate a listener presents expires."""
    try:
        telemetry.note_certificate(certificate.listener, certificate.expires_at())
    except TLSFileError as error:
        log.warning("cannot read the expiry of %s: %s", certificate.files.cert, error)


def _socket_options(
    listener: str,
    config: Config,
    stall_timeout: float,
    reuse_port: bool,
    tls: ListenerTLS | None,
) -> tuple[SocketOptions, list[Certificate]]:
    """A listener's socket options with Hypercorn's TLS context, and that context to reload."""
    context = config.create_ssl_context()
    options = SocketOptions(stall_timeout, reuse_port, context)
    if context is None or tls is None:
        return options, []
    return options, [Certificate(listener, context, tls)]


def reload_certificates(certificates: Sequence[Certificate], telemetry: ExpiryWatcher) -> None:
    """SIGHUP with TLS: every listener presents its renewed certificate to new handshakes. Only
    the certificates: other settings need a restart. ``telemetry`` hears the new expiry."""
    for certificate in certificates:
        try:
            certificate.reload()
        except TLSFileError as error:
            log.error("SIGHUP: %s; still serving the certificate loaded before", error)
        else:
            log.info("SIGHUP: loaded %s for new connections", certificate.files.cert)
            note_expiry(certificate, telemetry)


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[CacheStore | None]:
    """The cache store when caching is on, closed on exit."""
    if not settings.cache.enabled:
        yield None
        return
    try:
        store = LmdbStore(
            settings.cache.dir,
            max_total_bytes=settings.cache.max_total_bytes,
            max_entry_bytes=settings.cache.max_entry_bytes,
        )
    except OSError as error:
        raise StoreError(f"cannot open the cache store at {settings.cache.dir}: {error}") from error
    try:
        yield store
    finally:
        store.close()


@asynccontextmanager
async def open_shared(
    settings: Settings, store: CacheStore | None
) -> AsyncIterator[SharedTier | None]:
    """The shared tier when ``[shared_store]`` is configured and the cache is on."""
    if store is None or settings.shared_store is None:
        yield None
        return
    async with open_shared_tier(settings.shared_store) as shared:
        yield shared


async def serve_tproxy(
    settings: Settings,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set, then drain and close; reports where it listens once ready."""
    async with (
        open_store(settings) as store,
        open_shared(settings, store) as shared,
        open_upstream_pool(settings) as pool,
    ):
        writer = StoreWriter(store, shared=shared) if store is not None else None
        admin_token = read_admin_token(settings)
        client_keys = ClientKeys(settings.auth.client_keys) if settings.auth.enabled else None
        if client_keys is not None:
            log.info("client authentication on: %d accepted key(s)", len(client_keys))
        async with trio.open_nursery() as nursery:
            if writer is not None:
                await nursery.start(writer.serve)
            inflight = Inflight()
            proxy_stopped = trio.Event()
            async with (
                open_telemetry(
                    settings, inflight=inflight, store=store, store_writer=writer
                ) as telemetry,
                open_exchanger(settings, pool, writer, telemetry) as exchanger,
                trio.open_nursery() as servers,
            ):
                admin_app = AdminApp(
                    store, inflight=inflight, telemetry=telemetry, token=admin_token, stopping=stop
                )
                proxy_app = ProxyApp(
                    settings, exchanger, store, inflight, telemetry, client_keys, shared
                )
                status = ServerStatus([], inflight, store, stop, proxy_app)
                server = settings.server
                proxy_config = _hypercorn_config(settings, server.listen, server.tls)
                proxy_options, certificates = _socket_options(
                    "proxy",
                    proxy_config,
                    server.client_stall_timeout,
                    server.reuse_port,
                    server.tls,
                )
                status.proxy = await _start_listener(
                    servers,
                    partial(_serve_until, proxy_app, stop=stop, stopped=proxy_stopped),
                    proxy_config,
                    proxy_options,
                )
                admin_binds, admin_certificates = await start_admin_listener(
                    servers, settings, admin_app, proxy_stopped.wait
                )
                every_certificate = (*certificates, *admin_certificates)
                for certificate in every_certificate:
                    note_expiry(certificate, telemetry)
                log.info("tproxy listening on %s (admin %s)", status.proxy, admin_binds)
                task_status.started(
                    Listening(
                        status.proxy,
                        admin_binds,
                        writer,
                        inflight,
                        status,
                        exchanger,
                        tuple(every_certificate),
                    )
                )
            if writer is not None:
                writer.close()
        if writer is not None:
            written = writer.statistics()
            log.info(
                "store writer drained: %d entries written, %d dropped, %d failed",
                written.written,
                written.dropped,
                written.failed,
            )


async def start_admin_listener(
    servers: trio.Nursery,
    settings: Settings,
    app: AdminApp,
    shutdown_trigger: Callable[[], Awaitable[None]],
) -> tuple[list[str], list[Certificate]]:
    """Serve ``app`` on ``server.admin_listen`` (with ``admin.tls_*``) in ``servers`` until
    ``shutdown_trigger`` returns; its binds and TLS certificates, or ListenError."""
    admin_tls = settings.admin.tls
    config = _hypercorn_config(settings, settings.server.admin_listen, admin_tls)
    options, certificates = _socket_options(
        "admin", config, settings.server.client_stall_timeout, False, admin_tls
    )
    binds = await _start_listener(
        servers,
        partial(serve_asgi, _asgi(app), shutdown_trigger=shutdown_trigger),
        config,
        options,
    )
    return binds, certificates


class ListenError(TproxyError):
    """An address to listen on could not be bound (in use, not ours, not permitted)."""


async def _start_listener(
    servers: trio.Nursery,
    serve_app: Callable[..., Awaitable[None]],
    config: Config,
    options: SocketOptions,
) -> list[str]:
    """Start ``serve_app(config, options)`` in ``servers``; its binds, or ListenError naming the
    address."""
    try:
        binds: list[str] = await servers.start(serve_app, config, options)
    except* OSError as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise ListenError(f"cannot listen on {' '.join(config.bind)}: {first}") from first
    return binds


async def _serve_until(
    app: ProxyApp,
    config: Config,
    options: SocketOptions,
    *,
    stop: trio.Event,
    stopped: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``stop`` and its drain are over; then set ``stopped``."""
    try:
        await serve_asgi(
            _asgi(app), config, options, shutdown_trigger=stop.wait, task_status=task_status
        )
    finally:
        stopped.set()


def _asgi(app: ProxyApp | AdminApp) -> ASGIFramework:
    """Our apps are plain ASGI 3 callables; Hypercorn types them with its own message types."""
    return cast(ASGIFramework, app)


async def run_until_signalled(
    settings: Settings, *, on_listening: Callable[[Listening], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, telling the service manager (if any) how it goes.

    The first signal drains (``server.graceful_timeout``), a second one cancels the drain at
    once. SIGHUP loads renewed TLS certificates; other settings are not reloaded, which is
    logged, rather than left to SIGHUP's default, which would kill the process without a drain.
    ``on_listening`` is told where the server listens once it does (a worker tells its
    supervisor, :mod:`tproxy.workers`).
    """
    stop = trio.Event()
    graceful = settings.server.graceful_timeout
    served: list[Listening] = []  # the server, once it listens
    async with open_notifier() as notifier:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP and served and served[0].certificates:
                            served[0].reload_certificates()
                        elif signum == signal.SIGHUP:
                            log.warning(RELOAD_REFUSAL, graceful)
                        elif not stop.is_set():
                            log.info(
                                "%s: stopped accepting; draining for up to %gs", name, graceful
                            )
                            stop.set()
                        else:
                            log.warning("%s again: cancelling the drain, stopping now", name)
                            nursery.cancel_scope.cancel()
                            return

                async def run_server(*, task_status: trio.TaskStatus[Listening]) -> None:
                    await serve_tproxy(settings, stop, task_status=task_status)
                    log.info("tproxy stopped")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                listening: Listening = await nursery.start(run_server)
                served.append(listening)
                # What start-up built (modules, settings, pools, the app) lives as long as the
                # process: out of the collector's generations, the collections that requests
                # set off no longer walk it.
                gc.freeze()
                if on_listening is not None:
                    on_listening(listening)
                await notifier.ready(listening.status.summary())
                nursery.start_soon(notifier.serve_watchdog)
                nursery.start_soon(_report_status, notifier, listening.status, stop)


async def _report_status(notifier: Notifier, status: ServerStatus, stop: trio.Event) -> None:
    """STATUS= every few seconds while serving, STOPPING=1 once the drain starts."""
    if not notifier.enabled:
        await stop.wait()
    else:
        while not stop.is_set():
            with trio.move_on_after(STATUS_INTERVAL):
                await stop.wait()
            if not stop.is_set():
                await notifier.status(status.summary())
    log.info("draining: %d exchanges in flight", len(status.inflight))
    await notifier.stopping(status.summary())
    while notifier.enabled:
        await trio.sleep(STATUS_INTERVAL)
        await notifier.status(status.summary())
