"""What a request line and its framing must look like before tproxy forwards anything.

Theory of operation: tproxy is a reverse proxy, never an open one. A request target must be in
origin form (``/path?query``); absolute form (``http://host/...``), authority form (``CONNECT``)
and asterisk form are refused. Dot segments (``.`` and ``..``, also percent-encoded) are refused
too: routes match the path as sent, and an HTTP client resolves dot segments when it builds the
upstream URL, so ``/v1/../admin`` would be routed as ``/v1/`` and arrive as ``/admin``. Finally a
request framed both by ``Transfer-Encoding`` and ``Content-Length`` is ambiguous (RFC 9112
§6.3) and refused, whatever the server in front of us chose to believe.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

from tproxy.core.errors import RequestRejected

_DOT_SEGMENTS = frozenset({b".", b".."})


def check_request_line(
    method: str, raw_path: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> RequestRejected | None:
    """The refusal for a request tproxy must not forward, or None when it may go on."""
    if method == "CONNECT" or not raw_path.startswith(b"/"):
        return RequestRejected(
            400,
            "absolute_form_refused",
            "tproxy is a reverse proxy: only origin-form targets such as /v1/models are served",
        )
    if any(unquote_to_bytes(segment) in _DOT_SEGMENTS for segment in raw_path.split(b"/")):
        return RequestRejected(
            400, "dot_segment_refused", "request paths may not contain '.' or '..' segments"
        )
    names = {name for name, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return RequestRejected(
            400,
            "ambiguous_framing",
            "a request may not carry both Transfer-Encoding and Content-Length",
        )
    return None
