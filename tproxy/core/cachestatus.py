"""Cache-Status as a value: one object gives the header (RFC 9211) and the metric label.

Theory of operation: the app builds a :class:`CacheStatus` once it knows what the cache does with
a request: a hit (from which tier, with how long to live) or forwarded to the upstream, and why.
The exchange keeps it (the ``Classified`` fact); a request that joins an identical one in flight
is told ``JoinedFlight``, and its status becomes :meth:`CacheStatus.joined`. The header's bytes,
the access log's text and the one word of the metric labels and the console line are all read
from the same fields: nothing parses a header back.

The header is ``tproxy`` then its parameters, in this order: ``hit`` or ``fwd=<reason>``,
``ttl=<seconds>``, ``collapsed``, ``detail=<token or string>``; for instance
``tproxy; hit; ttl=60; detail=shared`` or ``tproxy; fwd=miss; collapsed``. It is always
printable ASCII: ``ttl`` is clamped to the structured-field integer range (RFC 8941 §3.3.1) and
``detail`` is written as a token when it is one, else as a string whose characters outside
printable ASCII (CR and LF included) become ``?``.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

CACHE_NAME = "tproxy"

# RFC 8941 §3.3.4 and §3.3.1: what may appear bare in a structured field, and integer range.
_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*")
_SF_INTEGER_MAX = 999_999_999_999_999


class Forward(enum.Enum):
    """Why a request went to the upstream: the RFC 9211 ``fwd`` reasons tproxy sends. Each is a
    structured-field token, and is also the request's metric label."""

    BYPASS = "bypass"  # not cacheable: the cache is off, or the method or path is not cached
    REQUEST = "request"  # the client's Cache-Control said no-store or no-cache
    MISS = "miss"  # nothing stored (with detail=not-json: the body has no canonical form)
    STALE = "stale"  # stored, but older than the client's max-age allows


class CacheStatus(NamedTuple):
    """What the cache did for one answer. ``fwd`` None is a hit.

    ``detail`` is free text (the tier that answered a hit, or why a body could not be keyed).
    An immutable value; a named tuple because one is built for every request, and a tuple is
    built in a quarter of the time of a frozen dataclass (~0.25 µs against ~1 µs).
    """

    fwd: Forward | None
    ttl: int | None = None
    collapsed: bool = False
    detail: str | None = None

    @classmethod
    def hit(cls, ttl: int | None = None, tier: str | None = None) -> CacheStatus:
        """A stored answer; ``tier`` names the tier that had it when it is not the first."""
        return cls(None, ttl, False, tier)

    @classmethod
    def forwarded(cls, fwd: Forward, detail: str | None = None) -> CacheStatus:
        return cls(fwd, None, False, detail)

    def joined(self) -> CacheStatus:
        """This status for a request that joined an identical one in flight. Raises ValueError
        for a hit: a request that joins a flight was forwarded."""
        if self.fwd is None:
            raise ValueError("a hit is not collapsed: a request that joins a flight is forwarded")
        return self._replace(collapsed=True)

    @property
    def text(self) -> str:
        """The header's value, e.g. ``tproxy; fwd=miss; collapsed`` (printable ASCII)."""
        text = _OPENINGS[self.fwd]
        if self.ttl is not None:
            text += f"; ttl={max(-_SF_INTEGER_MAX, min(_SF_INTEGER_MAX, self.ttl))}"
        if self.collapsed:
            text += "; collapsed"
        if self.detail is not None:
            text += "; detail=" + _token_or_string(self.detail)
        return text

    @property
    def header(self) -> bytes:
        """The ``Cache-Status`` header's value as sent."""
        return self.text.encode()  # ASCII: UTF-8 writes it byte for byte

    @property
    def label(self) -> str:
        """One word for a metric label or a console line: ``hit``, ``collapsed`` (joined an
        identical request in flight), or the ``fwd`` reason."""
        if self.fwd is None:
            return "hit"
        return "collapsed" if self.collapsed else self.fwd.value


# The first parameter, after the cache's name: ``hit`` or the ``fwd`` reason.
_OPENINGS: dict[Forward | None, str] = {
    None: f"{CACHE_NAME}; hit",
    **{fwd: f"{CACHE_NAME}; fwd={fwd.value}" for fwd in Forward},
}


def _token_or_string(text: str) -> str:
    """``text`` as an RFC 8941 token, or else as a string.

    A string holds printable ASCII only, so anything else (CR and LF included) becomes ``?``.
    """
    if _SF_TOKEN.fullmatch(text):
        return text
    printable = "".join(char if " " <= char <= "~" else "?" for char in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'
