"""Talking to Valkey/Redis for tier 2 of the cache; the only module that imports coredis.

This is the connection, not the tier (the tier's policy, which commands to send when and what to
count, is :mod:`tproxy.store.shared`): a coredis client for a ``redis://``, ``rediss://`` or
``unix://`` URL, for a Redis Cluster's nodes, or for the primary a set of Redis Sentinels
watches (each new connection asks them where it is), the few commands the tier sends, and what
their failures mean, translated at this edge:

- :class:`SharedConnection` is the proxy's: one client held open for the tier's life and
  reopened when it cannot start (:meth:`SharedConnection.hold`). A command never raises; it
  returns an :class:`~tproxy.core.breaker.Outcome` for the tier's circuit breaker, and the error
  stays in :attr:`SharedConnection.last_error` for the logs.
- :class:`AdminConnection` is a cache command's (:func:`open_admin_connection`): each round trip
  within ``write_timeout``, or :class:`SharedStoreUnavailable`.

The TLS context (a ``rediss://`` URL, or ``tls = true`` for a cluster or sentinels) is built by
:func:`tproxy.tls.upstream_context`, as an upstream's is: the system's trusted roots, or the CAs
of ``shared_store.ca_file``. It is built once per connection, not per reopening (loading CAs
costs ~20 ms on the event loop). coredis's own retries are off: our deadlines are short, and a
retry would only hide a failure from the breaker. coredis runs on Trio through anyio; what was
checked of it is in docs/operations.md.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any, NamedTuple, NoReturn, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import PrimaryNotFoundError, RedisError, StalePrimaryError
from coredis.retry import NoRetryPolicy

from tproxy.config import SharedStoreSettings, parse_host_port
from tproxy.core.breaker import Outcome
from tproxy.core.errors import ConfigError, TproxyError
from tproxy.tls import TLSFileError, upstream_context

# Keys read per SCAN round trip by the cache commands.
SCAN_COUNT = 500

_T = TypeVar("_T")

Client: TypeAlias = "coredis.Redis[bytes] | coredis.RedisCluster[bytes]"


class SharedStoreUnavailable(TproxyError):
    """The shared tier did not answer a command within its deadline, or refused it."""


class Passwords(NamedTuple):
    """The data servers' password and the sentinels' (None: they ask for none)."""

    servers: str | None = None
    sentinels: str | None = None


NO_PASSWORDS = Passwords()


def describe(settings: SharedStoreSettings) -> str:
    """Where the tier is, for log lines (never a credential)."""
    over_tls = " over TLS" if settings.tls else ""
    if settings.cluster_nodes:
        return f"cluster{over_tls} " + ", ".join(settings.cluster_nodes)
    if settings.sentinels:
        where = ", ".join(settings.sentinels)
        return f"primary {settings.sentinel_primary!r} of sentinels{over_tls} {where}"
    assert settings.url is not None
    parts = urlsplit(settings.url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def read_passwords(settings: SharedStoreSettings, environ: Mapping[str, str]) -> Passwords:
    """The passwords ``password_env`` and ``sentinel_password_env`` name; ConfigError when a
    variable named is unset or empty."""
    return Passwords(
        _read_password("password_env", settings.password_env, environ),
        _read_password("sentinel_password_env", settings.sentinel_password_env, environ),
    )


def _read_password(key: str, variable: str | None, environ: Mapping[str, str]) -> str | None:
    if variable is None:
        return None
    password = environ.get(variable, "")
    if not password:
        raise ConfigError(
            [f"shared_store.{key}: the environment variable {variable} is not set or empty"]
        )
    return password


def _tls_context(settings: SharedStoreSettings) -> ssl.SSLContext | None:
    """The client context of a ``rediss://`` URL, or of a cluster's or sentinels' nodes with
    ``tls``, checking each server's certificate and name; ConfigError when ``ca_file`` cannot
    be used."""
    if not settings.over_tls:
        return None
    try:
        return upstream_context(
            ssl.create_default_context,
            ca_file=settings.ca_file,
            client_cert=None,
            client_key=None,
            verify=True,
        )
    except TLSFileError as error:
        raise ConfigError([f"shared_store.ca_file: {error}"]) from None


@asynccontextmanager
async def _opened_client(
    settings: SharedStoreSettings, passwords: Passwords, context: ssl.SSLContext | None
) -> AsyncIterator[Client]:
    """A client, open for the block: a plain server's opens without connecting; a cluster's
    fetches the slot map; a sentinel-watched primary's opens the sentinels' clients, and each
    new connection asks them where the primary is now."""
    options: dict[str, Any] = {
        "password": passwords.servers,
        "connect_timeout": settings.connect_timeout,
        "stream_timeout": settings.write_timeout,
        "retry_policy": NoRetryPolicy(),
    }
    if settings.sentinels:
        assert settings.sentinel_primary is not None
        sentinels = coredis.Sentinel(
            [TCPLocation(*parse_host_port(node)) for node in settings.sentinels],
            sentinel_kwargs={
                "password": passwords.sentinels,
                "ssl_context": context,
                "connect_timeout": settings.connect_timeout,
                "stream_timeout": settings.write_timeout,
            },
            ssl_context=context,
            **options,
        )
        async with sentinels, sentinels.primary_for(settings.sentinel_primary) as primary:
            yield primary
        return
    client: Client
    if settings.cluster_nodes:
        nodes = [parse_host_port(node) for node in settings.cluster_nodes]
        client = coredis.RedisCluster(
            startup_nodes=[{"host": host, "port": port} for host, port in nodes],
            ssl_context=context,
            **options,
        )
    else:
        assert settings.url is not None
        client = coredis.Redis.from_url(settings.url, ssl_context=context, **options)
    async with client:
        yield client


# What coredis raises when no connection to the tier could be made: the server's address does not
# answer, or, with sentinels, none of them names a primary (all down, or none watches it) or the
# one named is no longer a primary (a failover not yet seen by them): no server took the command.
_NO_CONNECTION = (RedisConnectionError, PrimaryNotFoundError, StalePrimaryError)


class SharedConnection:
    """The proxy's client of the shared tier, and the commands its lookups and writes send.

    Raises ConfigError when ``ca_file`` cannot be used. Each command returns what it did for
    the breaker: ``UNREACHABLE`` when no connection could be made (or the client is not open),
    ``FAILED`` when the server refused it or the connection broke. Deadlines are the caller's.
    """

    def __init__(self, settings: SharedStoreSettings, passwords: Passwords) -> None:
        self._settings = settings
        self._passwords = passwords
        self._context = _tls_context(settings)
        self._client: Client | None = None  # None until opened, and while it cannot be
        self.last_error: BaseException | None = None  # the last failure, for log lines

    async def hold(
        self, opened: Callable[[], Awaitable[None]], lost: Callable[[], None]
    ) -> NoReturn:
        """Hold a client open; ``opened()`` runs each time one is, ``lost()`` each time one
        could not be opened within ``connect_timeout`` or broke; the next is tried
        ``breaker_reset`` seconds later.

        A plain server's client opens without connecting; a Redis Cluster's fetches the slot
        map first, and fails when no node answers.
        """
        while True:
            opening_deadline = trio.current_time() + self._settings.connect_timeout
            with trio.CancelScope(deadline=opening_deadline) as opening:
                try:
                    async with _opened_client(
                        self._settings, self._passwords, self._context
                    ) as client:
                        opening.deadline = math.inf
                        self._client = client
                        await opened()
                        await trio.sleep_forever()
                except* (RedisError, OSError) as group:
                    self.last_error = group.exceptions[0]
                finally:
                    self._client = None
            if opening.cancelled_caught:
                self.last_error = TimeoutError("opening took longer than connect_timeout")
            lost()
            await trio.sleep(self._settings.breaker_reset)

    async def ping(self) -> Outcome:
        outcome, _ = await self._call(lambda client: client.ping())
        return outcome

    async def get(self, key: bytes) -> tuple[Outcome, bytes | None]:
        return await self._call(lambda client: client.get(key))

    async def set(self, key: bytes, value: bytes, *, px: int | None) -> Outcome:
        """``SET key value PX px`` (no expiry when ``px`` is None)."""
        outcome, _ = await self._call(lambda client: client.set(key, value, px=px))
        return outcome

    async def _call(self, command: Callable[[Client], Awaitable[_T]]) -> tuple[Outcome, _T | None]:
        """Run one command; what it did (for the breaker) and its reply."""
        client = self._client
        if client is None:
            return Outcome.UNREACHABLE, None  # not open: :meth:`hold` says why
        try:
            return Outcome.SUCCEEDED, await command(client)
        except _NO_CONNECTION as error:
            self.last_error = error
            return Outcome.UNREACHABLE, None
        except (RedisError, OSError) as error:
            self.last_error = error
            return Outcome.FAILED, None


class AdminConnection:
    """A cache command's client: each round trip gets ``write_timeout``; raises
    :class:`SharedStoreUnavailable` when one fails or is late."""

    def __init__(self, client: Client, settings: SharedStoreSettings) -> None:
        self._client = client
        self._settings = settings

    async def keys(self, prefix: bytes) -> list[bytes]:
        """Every key that starts with ``prefix``, by ``SCAN`` (never ``KEYS``, which blocks a
        server)."""
        keys: list[bytes] = []
        # coredis declares an AsyncIterator; it is an async generator, to be closed early.
        scan = cast(
            AsyncGenerator[bytes, None],
            self._client.scan_iter(match=_glob_escape(prefix) + b"*", count=SCAN_COUNT),
        )
        async with aclosing(scan):
            while True:
                try:
                    keys.append(await self._within(anext(scan)))
                except StopAsyncIteration:
                    break
        return keys

    async def get(self, key: bytes) -> bytes | None:
        return await self._within(self._client.get(key))

    async def delete(self, key: bytes) -> int:
        """``DEL key``: how many keys it removed (0 or 1)."""
        return await self._within(self._client.delete([key]))

    async def _within(self, call: Awaitable[_T]) -> _T:
        where = f"shared store {describe(self._settings)}"
        with trio.move_on_after(self._settings.write_timeout):
            try:
                return await call
            except (RedisError, OSError) as error:
                raise SharedStoreUnavailable(f"{where}: {error}") from error
        limit = self._settings.write_timeout
        raise SharedStoreUnavailable(f"{where}: no answer within write_timeout ({limit:g}s)")


def _glob_escape(text: bytes) -> bytes:
    """``text`` matched literally by a SCAN pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)


@asynccontextmanager
async def open_admin_connection(
    settings: SharedStoreSettings, passwords: Passwords
) -> AsyncIterator[AdminConnection]:
    """A client for one cache command; raises ConfigError when ``ca_file`` cannot be used."""
    try:
        async with _opened_client(settings, passwords, _tls_context(settings)) as client:
            yield AdminConnection(client, settings)
    except BaseExceptionGroup as group:
        # coredis's pool runs a task group: our own error, leaving the block, comes out wrapped.
        unavailable, rest = group.split(SharedStoreUnavailable)
        if unavailable is None or rest is not None:
            raise
        first: BaseException = unavailable
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
