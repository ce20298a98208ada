"""Talking to upstreams: the only module that uses httpx2.

One ``httpx2.AsyncClient`` per configured upstream, HTTP/1.1 unless the operator opted into
HTTP/2 (closing an HTTP/2 stream early does not stop generation upstream). Three deadlines: the
time to the response headers is a Trio cancel scope here; the gap between two body chunks is
httpx2's read timeout, which is exactly that gap (httpcore2 puts a deadline around every read
whether one is set or not, so it costs nothing more), set once the headers are in (on HTTP/2,
where a read timeout fails the whole connection, a cancel scope per chunk); the whole exchange is
the caller's cancel scope. httpx2's exceptions are translated here, at the edge, into
:mod:`tproxy.core.errors`, and the upstream's header names are lower-cased here (httpx2 keeps
them as written, and llama.cpp, Ollama and nginx write ``Content-Type``).

The libraries' own loggers are held at ``log.libraries`` (WARNING by default) while the pool is
open: httpx2 logs every request at INFO with its whole URL, query string (where clients put keys)
included, and the access line already says it; hpack logs header values at DEBUG.

The connection pool is httpcore2's with one guard added (:class:`_LeftoverGuardPool`): a
connection whose last response was followed by more bytes is closed instead of recycled.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass

import httpcore2
import httpx2
import trio

from tproxy.config import Settings, UpstreamSettings
from tproxy.core.errors import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from tproxy.core.headers import Header, lowered_names
from tproxy.tls import TLSFileError, upstream_context


@dataclass(slots=True)
class UpstreamResponse:
    """An upstream response whose headers have arrived and whose body is still to be read."""

    status: int
    headers: list[Header]  # names lower-cased, as everything after this edge expects
    _response: httpx2.Response
    _idle_scope: float | None  # HTTP/2: the idle deadline as a scope per chunk (see open_response)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the body as the socket delivers it, one read at a time, never re-buffered.

        Raises :class:`UpstreamTimeout` (``idle``: no byte for the upstream's ``idle_timeout``)
        or :class:`UpstreamBroken`. The total deadline is the caller's to enforce.
        """
        async with aclosing(self._response.aiter_raw()) as stream:
            while True:
                if self._idle_scope is None:
                    chunk = await _next_chunk(stream)
                else:
                    with trio.move_on_after(self._idle_scope) as idle:
                        chunk = await _next_chunk(stream)
                    if idle.cancelled_caught:
                        raise UpstreamTimeout("idle")
                if chunk is None:
                    return
                yield chunk


async def _next_chunk(stream: AsyncIterator[bytes]) -> bytes | None:
    """The next chunk of a body, None at its end; httpx2's errors translated."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except httpx2.ReadTimeout as error:
        raise UpstreamTimeout("idle") from error
    except (httpx2.TransportError, httpx2.StreamError) as error:
        raise UpstreamBroken(f"upstream body broke: {_describe(error)}") from error


def _describe(error: Exception) -> str:
    """An httpx2 error in words, for the access log's reason: its message, or its kind when it
    has none (``ReadError()`` often has none)."""
    return str(error) or type(error).__name__


@dataclass(frozen=True, slots=True)
class _Upstream:
    settings: UpstreamSettings
    client: httpx2.AsyncClient
    authorization: bytes | None
    extra_headers: tuple[Header, ...]
    extensions: dict[str, object]  # httpcore2's per-request extensions: the TLS server name


class UpstreamPool:
    """The HTTP clients for every configured upstream, opened and closed together."""

    def __init__(self, upstreams: Mapping[str, _Upstream]) -> None:
        self._upstreams = upstreams

    def settings(self, name: str) -> UpstreamSettings:
        return self._upstreams[name].settings

    def authorization(self, name: str) -> bytes | None:
        """The ``Authorization`` value the proxy injects for this upstream, if it has a key."""
        return self._upstreams[name].authorization

    def extra_headers(self, name: str) -> tuple[Header, ...]:
        return self._upstreams[name].extra_headers

    @asynccontextmanager
    async def open_response(
        self,
        name: str,
        *,
        method: str,
        target: str,
        headers: Sequence[Header],
        body: bytes,
        deadline: float,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send one request and wait for the response headers; close the response on exit.

        Raises :class:`UpstreamConnectError` (no connection, retry-safe),
        :class:`UpstreamTimeout` (``connect`` or ``first_byte``) or :class:`UpstreamBroken`.
        Leaving the block early, cancelled or not, closes the upstream connection, which is how
        generation is stopped on vLLM and llama.cpp.
        """
        upstream = self._upstreams[name]
        settings = upstream.settings
        request = upstream.client.build_request(
            method,
            settings.url + target,
            headers=list(headers),
            content=body,
            extensions=upstream.extensions,
        )
        first_byte_deadline = min(deadline, trio.current_time() + settings.first_byte_timeout)
        response: httpx2.Response | None = None
        with trio.CancelScope(deadline=first_byte_deadline) as scope:
            try:
                response = await upstream.client.send(request, stream=True)
            except httpx2.ConnectTimeout as error:
                raise UpstreamTimeout("connect") from error
            except (httpx2.ConnectError, httpx2.UnsupportedProtocol) as error:
                raise UpstreamConnectError(
                    f"cannot connect to {name}: {_describe(error)}"
                ) from error
            except httpx2.TransportError as error:
                raise UpstreamBroken(
                    f"{name} failed before its response: {_describe(error)}"
                ) from error
        if response is None:
            assert scope.cancelled_caught
            raise UpstreamTimeout("total" if deadline <= first_byte_deadline else "first_byte")
        # On HTTP/1.1 httpcore2 reads the read timeout when the body's first read starts: from
        # here on it bounds the gap between two chunks. On HTTP/2 a read timeout would fail every
        # stream of the shared connection, so there the idle deadline stays a scope of ours.
        idle_scope: float | None = settings.idle_timeout
        if response.http_version == "HTTP/1.1":
            request.extensions["timeout"]["read"] = settings.idle_timeout
            idle_scope = None
        try:
            yield UpstreamResponse(
                status=response.status_code,
                headers=lowered_names(response.headers.raw),
                _response=response,
                _idle_scope=idle_scope,
            )
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                await response.aclose()


def _has_leftover_bytes(connection: httpcore2.AsyncConnectionInterface) -> bool:
    """Whether an HTTP/1.1 connection holds bytes its server sent past the last response.

    httpcore2 keeps them in h11's buffer and recycles the connection, so the next request on it,
    from any client, would read them as its answer. They are reached through private attributes
    (httpcore2 has no public way); ``tests/faults`` fails if a new httpcore2 renames them.
    """
    http11 = getattr(connection, "_connection", None)
    h11_state = getattr(http11, "_h11_state", None)
    if h11_state is None:
        return False
    leftover, _ = h11_state.trailing_data
    return bool(leftover)


class _LeftoverGuardStream:
    """A response body that, once closed, closes its connection if bytes were left over."""

    def __init__(
        self, stream: AsyncIterable[bytes], connection: httpcore2.AsyncConnectionInterface
    ) -> None:
        self._stream = stream
        self._connection = connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        try:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                await close()
        finally:
            if _has_leftover_bytes(self._connection):
                await self._connection.aclose()


class _LeftoverGuardConnection(httpcore2.AsyncConnectionInterface):
    """httpcore2's connection; each response body it gives is a :class:`_LeftoverGuardStream`."""

    def __init__(self, connection: httpcore2.AsyncConnectionInterface) -> None:
        self._connection = connection

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        response = await self._connection.handle_async_request(request)
        assert isinstance(response.stream, AsyncIterable)
        response.stream = _LeftoverGuardStream(response.stream, self._connection)
        return response

    async def aclose(self) -> None:
        await self._connection.aclose()

    def info(self) -> str:
        return self._connection.info()

    def can_handle_request(self, origin: httpcore2.Origin) -> bool:
        return self._connection.can_handle_request(origin)

    def is_available(self) -> bool:
        return self._connection.is_available()

    def has_expired(self) -> bool:
        return self._connection.has_expired()

    def is_idle(self) -> bool:
        return self._connection.is_idle()

    def is_closed(self) -> bool:
        return self._connection.is_closed()


class _LeftoverGuardPool(httpcore2.AsyncConnectionPool):
    def create_connection(self, origin: httpcore2.Origin) -> httpcore2.AsyncConnectionInterface:
        return _LeftoverGuardConnection(super().create_connection(origin))


class _GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport over a :class:`_LeftoverGuardPool` with the same settings."""

    def __init__(self, *, http2: bool, limits: httpx2.Limits, ssl_context: ssl.SSLContext) -> None:
        super().__init__(
            http1=True, http2=http2, limits=limits, trust_env=False, verify=ssl_context
        )
        self._pool = _LeftoverGuardPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=http2,
        )


def _system_roots() -> ssl.SSLContext:
    """A new context trusting the system's CAs, as httpx2 makes it (ignoring SSL_CERT_FILE)."""
    return httpx2.create_ssl_context(trust_env=False)


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """The upstream's TLS context, loaded once for both pools; :class:`UpstreamError` when its
    files cannot be used."""
    try:
        return upstream_context(
            _system_roots,
            ca_file=settings.ca_file,
            client_cert=settings.client_cert,
            client_key=settings.client_key,
            verify=settings.verify,
        )
    except TLSFileError as error:
        raise UpstreamError(f"upstream {settings.name}: {error}") from None


def _authorization(settings: UpstreamSettings, environ: Mapping[str, str]) -> bytes | None:
    if settings.api_key_env is None:
        return None
    key = environ.get(settings.api_key_env)
    if not key:
        raise UpstreamError(
            f"upstream {settings.name}: environment variable {settings.api_key_env} is not set"
        )
    return b"Bearer " + key.encode("latin-1")


# The loggers of httpx2 and of the libraries under it (h2 and hpack also serve Hypercorn's HTTP/2).
LIBRARY_LOGGERS = ("httpx2", "httpcore2", "h2", "hpack")


@contextmanager
def _library_log_level(level: str) -> Iterator[None]:
    """Hold the libraries' loggers at ``level``; give them back their own levels on exit."""
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level.upper())
    try:
        yield
    finally:
        for logger, own in zip(loggers, before, strict=True):
            logger.setLevel(own)


@asynccontextmanager
async def open_upstream_pool(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> AsyncIterator[UpstreamPool]:
    """Open one client per upstream; close them all on exit. Meanwhile the libraries' loggers
    are held at ``settings.log.libraries``.

    Raises :class:`UpstreamError` when an upstream's API key variable is missing or its TLS
    files cannot be loaded, so a misconfigured service fails at start, not on the first request.
    """
    env = os.environ if environ is None else environ
    async with AsyncExitStack() as stack:
        stack.enter_context(_library_log_level(settings.log.libraries))
        upstreams: dict[str, _Upstream] = {}
        for upstream in settings.upstreams:
            limits = httpx2.Limits(
                max_connections=upstream.max_connections,
                max_keepalive_connections=upstream.max_connections,
                keepalive_expiry=30.0,
            )
            client = httpx2.AsyncClient(
                transport=_GuardedTransport(
                    http2=upstream.http2, limits=limits, ssl_context=_ssl_context(upstream)
                ),
                timeout=httpx2.Timeout(
                    connect=upstream.connect_timeout, read=None, write=None, pool=None
                ),
                trust_env=False,
                follow_redirects=False,
            )
            await stack.enter_async_context(client)
            upstreams[upstream.name] = _Upstream(
                settings=upstream,
                client=client,
                authorization=_authorization(upstream, env),
                extra_headers=tuple(
                    lowered_names(
                        (n.encode("latin-1"), v.encode("latin-1")) for n, v in upstream.headers
                    )
                ),
                extensions=(
                    {}
                    if upstream.tls_server_name is None
                    else {"sni_hostname": upstream.tls_server_name}
                ),
            )
        yield UpstreamPool(upstreams)
