"""Talking to upstreams: the only module that uses httpcore2.

One httpcore2 connection pool per configured upstream, called directly (httpx2's client on top
of it cost ~0.3 ms of CPU per request and added nothing tproxy uses: docs/benchmarks.md),
HTTP/1.1 unless the operator opted into HTTP/2 (closing an HTTP/2 stream early does not stop
generation upstream). Of the three deadlines, the time to the response headers is a Trio cancel
scope here; the gap between two body chunks and the whole exchange are the reader's
(:mod:`tproxy.pipeline.reader`: one scope over the body for each, none per chunk), so httpcore2's
read timeout stays unset. httpcore2's exceptions are translated here, at the edge, into
:mod:`tproxy.core.errors`, and the upstream's header names are lower-cased here (httpcore2 keeps
them as written, and llama.cpp, Ollama and nginx write ``Content-Type``).

The request goes upstream with the caller's headers and body as given, plus ``Host`` and
``Content-Length``; nothing else is added (no client defaults, no cookie jar), and the target is
forwarded as the client wrote it, after the upstream's base path.

The libraries' own loggers are held at ``log.libraries`` (WARNING by default) while the pool is
open: httpcore2 logs each step of a request at DEBUG, and hpack logs header values at DEBUG.

The connection pool is httpcore2's with one guard added (:class:`_LeftoverGuardPool`): a
connection whose last response was followed by more bytes is closed instead of recycled.

A plain ``http://`` upstream (HTTP/1.1 without TLS) goes through :mod:`tproxy.h11upstream`
instead: h11 on a Trio socket, the same deadlines and errors, less CPU per chunk
(docs/benchmarks.md).
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
from urllib.parse import urlsplit

import httpcore2
import trio

from tproxy.config import Settings, UpstreamSettings
from tproxy.core.errors import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from tproxy.core.headers import Header, lowered_names
from tproxy.h11upstream import KEEPALIVE_EXPIRY, PlainPool, PlainResponse
from tproxy.tls import TLSFileError, upstream_context

# Every error httpcore2 raises for a failed exchange (its whole hierarchy but the pool's
# internal ConnectionNotAvailable, which it retries itself).
_TRANSPORT_ERRORS = (
    httpcore2.NetworkError,
    httpcore2.TimeoutException,
    httpcore2.ProtocolError,
    httpcore2.UnsupportedProtocol,
    httpcore2.ProxyError,
)

# Methods that announce an empty body with ``Content-Length: 0`` rather than with nothing.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(slots=True)
class UpstreamResponse:
    """An upstream response whose headers have arrived and whose body is still to be read."""

    status: int
    headers: list[Header]  # names lower-cased, as everything after this edge expects
    _response: httpcore2.Response

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the body as the socket delivers it, one read at a time, never re-buffered.

        Raises :class:`UpstreamBroken`. The deadlines are the caller's cancel scopes.
        """
        async with aclosing(self._response.aiter_stream()) as stream:
            while True:
                chunk = await _next_chunk(stream)
                if chunk is None:
                    return
                yield chunk


async def _next_chunk(stream: AsyncIterator[bytes]) -> bytes | None:
    """The next chunk of a body, None at its end; httpcore2's errors translated."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except _TRANSPORT_ERRORS as error:
        raise UpstreamBroken(f"upstream body broke: {_describe(error)}") from error


def _describe(error: Exception) -> str:
    """An httpcore2 error in words, for the access log's reason: its message, or its kind when
    it has none (``ReadError()`` often has none)."""
    return str(error) or type(error).__name__


@dataclass(frozen=True, slots=True)
class _Address:
    """Where an upstream's requests go, parsed once from its URL: the connection's origin, the
    ``Host`` header and the base path every target is appended to."""

    scheme: bytes
    host: bytes  # without brackets: what the connection dials
    port: int | None
    host_header: bytes  # with brackets and a non-default port, as a client writes it
    base_path: bytes

    @classmethod
    def of(cls, url: str) -> _Address:
        parts = urlsplit(url)  # config.py has normalised it: scheme://host[:port][/base]
        host = parts.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        port = parts.port
        default = {"http": 80, "https": 443}[parts.scheme]
        if port is not None and port != default:
            shown += f":{port}"
        return cls(
            scheme=parts.scheme.encode("ascii"),
            host=host.encode("ascii"),
            port=port,
            host_header=shown.encode("ascii"),
            base_path=parts.path.encode("latin-1"),
        )


@dataclass(frozen=True, slots=True)
class _Upstream:
    settings: UpstreamSettings
    address: _Address
    pool: httpcore2.AsyncConnectionPool
    authorization: bytes | None
    extra_headers: tuple[Header, ...]
    server_name: str | None  # the TLS server name (httpcore2's ``sni_hostname`` extension)
    plain: PlainPool | None  # the h11 client, for a plain-HTTP/1.1 upstream

    def head(self, method: str, headers: Sequence[Header], body: bytes) -> list[Header]:
        """``Host`` and ``Content-Length`` (as RFC 9110 asks: none for an empty GET), then the
        caller's headers."""
        head: list[Header] = [(b"host", self.address.host_header)]
        if body or method in _BODY_METHODS:
            head.append((b"content-length", b"%d" % len(body)))
        head.extend(headers)
        return head

    def request(
        self, method: str, target: str, headers: Sequence[Header], body: bytes
    ) -> httpcore2.Request:
        """The request to send: :meth:`head`; the connect timeout, no read timeout (the reader
        times the body), and the TLS server name."""
        address = self.address
        head = self.head(method, headers, body)
        extensions: dict[str, object] = {
            "timeout": {"connect": self.settings.connect_timeout, "read": None}
        }
        if self.server_name is not None:
            extensions["sni_hostname"] = self.server_name
        url = httpcore2.URL(
            scheme=address.scheme,
            host=address.host,
            port=address.port,
            target=address.base_path + target.encode("latin-1"),
        )
        return httpcore2.Request(method, url, headers=head, content=body, extensions=extensions)


class UpstreamPool:
    """The connection pools of every configured upstream, opened and closed together."""

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
    ) -> AsyncIterator[UpstreamResponse | PlainResponse]:
        """Send one request and wait for the response headers; close the response on exit.

        Raises :class:`UpstreamConnectError` (no connection, retry-safe),
        :class:`UpstreamTimeout` (``connect`` or ``first_byte``) or :class:`UpstreamBroken`.
        Leaving the block early, cancelled or not, closes the upstream connection, which is how
        generation is stopped on vLLM and llama.cpp.
        """
        upstream = self._upstreams[name]
        settings = upstream.settings
        first_byte_deadline = min(deadline, trio.current_time() + settings.first_byte_timeout)
        if upstream.plain is not None:
            async with _plain_response(
                upstream, upstream.plain, method, target, headers, body, first_byte_deadline
            ) as plain:
                if plain is None:
                    raise UpstreamTimeout(
                        "total" if deadline <= first_byte_deadline else "first_byte"
                    )
                yield plain
            return
        request = upstream.request(method, target, headers, body)
        response: httpcore2.Response | None = None
        with trio.CancelScope(deadline=first_byte_deadline) as scope:
            try:
                response = await upstream.pool.handle_async_request(request)
            except httpcore2.ConnectTimeout as error:
                raise UpstreamTimeout("connect") from error
            except (httpcore2.ConnectError, httpcore2.UnsupportedProtocol) as error:
                raise UpstreamConnectError(
                    f"cannot connect to {name}: {_describe(error)}"
                ) from error
            except _TRANSPORT_ERRORS as error:
                raise UpstreamBroken(
                    f"{name} failed before its response: {_describe(error)}"
                ) from error
        if response is None:
            assert scope.cancelled_caught
            raise UpstreamTimeout("total" if deadline <= first_byte_deadline else "first_byte")
        try:
            yield UpstreamResponse(
                status=response.status,
                headers=lowered_names(response.headers),
                _response=response,
            )
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                await response.aclose()


@asynccontextmanager
async def _plain_response(
    upstream: _Upstream,
    plain: PlainPool,
    method: str,
    target: str,
    headers: Sequence[Header],
    body: bytes,
    first_byte_deadline: float,
) -> AsyncIterator[PlainResponse | None]:
    """The h11 client's answer, None when ``first_byte_deadline`` passed first; its connection
    is given back (or closed) on exit."""
    settings = upstream.settings
    response: PlainResponse | None = None
    with trio.CancelScope(deadline=first_byte_deadline):
        response = await plain.send(
            settings.name,
            (
                method.encode("ascii"),
                upstream.address.base_path + target.encode("latin-1"),
                upstream.head(method, headers, body),
            ),
            body,
            connect_timeout=settings.connect_timeout,
        )
    if response is None:
        yield None
        return
    try:
        yield response
    finally:
        plain.release(response)


def _has_leftover_bytes(connection: httpcore2.AsyncConnectionInterface) -> bool:
    """Whether an HTTP/1.1 connection holds bytes its server sent past the last response.

    httpcore2 keeps them in h11's buffer and recycles the connection, so the next request on it,
    from any client, would read them as its answer. They are reached through private attributes
    (httpcore2 has no public way); ``tests/test_h11upstream.py`` fails if a new httpcore2
    renames them (over https: an ``http://`` upstream is :mod:`tproxy.h11upstream`'s).
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


def system_roots() -> ssl.SSLContext:
    """A new context trusting the system's CAs, as httpcore2 makes it (ignoring SSL_CERT_FILE).

    Loading the CAs takes ~20 ms on the event loop: make one per use, once, at start."""
    return httpcore2.default_ssl_context(_trust_env=False)


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """The upstream's TLS context, loaded once for both pools; :class:`UpstreamError` when its
    files cannot be used."""
    try:
        return upstream_context(
            system_roots,
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


# The loggers of httpcore2 and of the libraries under it (h2 and hpack also serve Hypercorn's
# HTTP/2).
LIBRARY_LOGGERS = ("httpcore2", "h2", "hpack")


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
    """Open one connection pool per upstream; close them all on exit. Meanwhile the libraries'
    loggers are held at ``settings.log.libraries``.

    Raises :class:`UpstreamError` when an upstream's API key variable is missing or its TLS
    files cannot be loaded, so a misconfigured service fails at start, not on the first request.
    """
    env = os.environ if environ is None else environ
    async with AsyncExitStack() as stack:
        stack.enter_context(_library_log_level(settings.log.libraries))
        upstreams: dict[str, _Upstream] = {}
        for upstream in settings.upstreams:
            address = _Address.of(upstream.url)
            plain: PlainPool | None = None
            if address.scheme == b"http" and not upstream.http2:
                plain = PlainPool(
                    address.host.decode("ascii"), address.port or 80, upstream.max_connections
                )
                stack.callback(plain.close)
            pool = _LeftoverGuardPool(
                ssl_context=_ssl_context(upstream),
                max_connections=upstream.max_connections,
                max_keepalive_connections=upstream.max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY,
                http1=True,
                http2=upstream.http2,
            )
            await stack.enter_async_context(pool)
            upstreams[upstream.name] = _Upstream(
                settings=upstream,
                address=address,
                pool=pool,
                authorization=_authorization(upstream, env),
                extra_headers=tuple(
                    lowered_names(
                        (n.encode("latin-1"), v.encode("latin-1")) for n, v in upstream.headers
                    )
                ),
                server_name=upstream.tls_server_name,
                plain=plain,
            )
        yield UpstreamPool(upstreams)


async def post_once(
    url: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    ssl_context: ssl.SSLContext | None,
) -> int:
    """POST ``body`` to ``url`` on a connection of its own, closed after; the response's status.

    For side channels such as the payload log's HTTP sink, which post now and then: no pool is
    kept, nothing is retried here, the response's body is not read, and the caller's cancel scope
    is the deadline. ``headers`` are sent as given (``Host`` included); ``ssl_context`` is the
    caller's, made once (:func:`system_roots`), for an ``https://`` URL. Raises
    :class:`UpstreamError` when no response came.
    """
    async with httpcore2.AsyncConnectionPool(ssl_context=ssl_context, retries=0) as pool:
        try:
            async with pool.stream("POST", url, headers=list(headers), content=body) as response:
                return response.status
        except _TRANSPORT_ERRORS as error:
            raise UpstreamError(_describe(error)) from error
