"""Which headers cross the proxy, in each direction.

Theory of operation: headers are ASGI-style pairs of bytes with lower-case names. Header names are
case-insensitive (RFC 9110 §5.1) and peers write them as they like (llama.cpp's server, Ollama and
nginx write ``Content-Type``), so the names are lowered once, where headers enter: Hypercorn (h11,
h2) hands requests over lowered, ``upstream.py`` lowers the upstream's with
:func:`lowered_names`, and every comparison after that is exact. A proxy must drop
hop-by-hop headers (RFC 9110 §7.6.1): ``Connection``, every header ``Connection`` names, and the
fixed list below; they describe one connection, not the message. ``Host`` is replaced by the
upstream's, ``Content-Length`` is recomputed by the HTTP client for the body we send, and
``Accept-Encoding`` is pinned to ``identity`` so the bytes we pass on are the bytes we can parse
and cache. ``X-Forwarded-For``/``-Proto`` and ``X-Request-Id`` are added.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tproxy.core.dialects import CREDENTIAL_HEADERS

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Set by the proxy for the upstream leg, never copied from the client.
_REQUEST_OWNED = frozenset(
    {b"host", b"content-length", b"accept-encoding", b"x-request-id", b"x-forwarded-proto"}
)

# A request id we accept from a client: short and printable, so it is safe in logs and headers.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def lowered_names(headers: Iterable[Header]) -> list[Header]:
    """``headers`` as a peer wrote them, with the names lower-cased and the values untouched."""
    return [(name.lower(), value) for name, value in headers]


def _connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def end_to_end(headers: Sequence[Header]) -> list[Header]:
    """The headers that may cross a proxy: hop-by-hop ones and those Connection names removed."""
    dropped = HOP_BY_HOP | _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in dropped and not n.startswith(b"proxy-")]


def client_request_id(headers: Iterable[Header]) -> bytes | None:
    """The client's ``X-Request-Id`` when it is present and safe to echo, else None."""
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value
    return None


def upstream_request_headers(
    client_headers: Sequence[Header],
    *,
    client_host: str | None,
    scheme: str,
    request_id: bytes,
    extra: Sequence[Header] = (),
    authorization: bytes | None = None,
    drop_credentials: bool = False,
) -> list[Header]:
    """The headers to send upstream for a client's request.

    ``authorization``, when given, replaces every client credential: the upstream's key is
    injected by the proxy and the client's own is not passed on. ``drop_credentials`` drops the
    client's credentials even without a replacement: when clients authenticate to the proxy,
    their key is the proxy's, not the upstream's.
    """
    extra_names = {name for name, _ in extra}
    forwarded_for: bytes | None = None
    result: list[Header] = []
    for name, value in end_to_end(client_headers):
        if name in _REQUEST_OWNED or name in extra_names:
            continue
        if (authorization is not None or drop_credentials) and name in CREDENTIAL_HEADERS:
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            continue
        result.append((name, value))
    if client_host:
        hop = client_host.encode("ascii", "replace")
        forwarded_for = hop if forwarded_for is None else forwarded_for + b", " + hop
    if forwarded_for is not None:
        result.append((b"x-forwarded-for", forwarded_for))
    result.append((b"x-forwarded-proto", scheme.encode("ascii")))
    result.append((b"x-request-id", request_id))
    result.append((b"accept-encoding", b"identity"))
    result.extend(extra)
    if authorization is not None:
        result.append((b"authorization", authorization))
    return result


def client_response_headers(
    upstream_headers: Sequence[Header], *, request_id: bytes, cache_status: bytes | None
) -> list[Header]:
    """The upstream's end-to-end response headers, plus ours."""
    ours = {b"x-request-id", b"cache-status", b"server", b"date"}
    result = [(n, v) for n, v in end_to_end(upstream_headers) if n not in ours]
    result.append((b"x-request-id", request_id))
    if cache_status is not None:
        result.append((b"cache-status", cache_status))
    return result


def header_value(headers: Iterable[Header], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
