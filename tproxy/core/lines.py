"""What every line-based framing shares: a bounded decoder fed with bytes as they arrive.

Theory of operation. SSE (:mod:`tproxy.core.sse`) and NDJSON (:mod:`tproxy.core.ndjson`) both
find whole lines in the bytes fed so far and give back items whose raw bytes, joined, are the
input exactly. :class:`LineDecoder` holds what they have in common, so that each framing states
only how its lines end and what its lines make:

- the life of a decoder: it decodes until a limit is passed, then it has *failed* (``failed``
  says why; it gives nothing more and never raises on the bytes, because the proxy must go on
  passing them through, and only caching gives up); ``close()`` ends it once, and a ``feed()``
  or ``close()`` after that raises :class:`~tproxy.core.errors.DecoderClosed`;
- the buffer: the bytes of the unfinished item stay pending, with the offset up to which no
  line ending lies in them (a later scan starts there, never byte by byte in Python); a chunk
  fed while nothing is pending is scanned where it lies, with no copy, which is the usual case
  of a chunk that holds whole items;
- the line limit: a line longer than ``max_line_bytes`` (without its ending) fails the decoder,
  and so does an unfinished line already longer than that, so that memory stays bounded (a CR
  that is the last byte fed so far is not counted: it may be the start of the line's ending).

A framing implements :meth:`LineDecoder._scan` (take the complete lines of a buffer, say where
the unfinished rest starts) and :meth:`LineDecoder._leftover` (what the bytes still pending at
the end of the stream make). ``feed()`` makes one call per chunk, to ``_scan``, as the SSE
decoder did before it shared this: the SSE decoder is on the path of every streamed answer.
"""

from __future__ import annotations

from enum import Enum
from typing import Generic, TypeVar

from tproxy.core.errors import DecoderClosed

__all__ = ["LineDecoder"]

Item = TypeVar("Item")


class _State(Enum):
    DECODING = "decoding"
    FAILED = "failed"
    CLOSED = "closed"


# The members as plain names: reading an Enum member off its class costs ~0.2 µs on Python 3.11,
# which feed() would pay twice per chunk.
_DECODING = _State.DECODING
_CLOSED = _State.CLOSED


class LineDecoder(Generic[Item]):
    """Incremental decoder of one line-based framing: ``feed()`` each chunk, then ``close()``
    once at the end of the stream. See the module's theory of operation."""

    __slots__ = ("_failure", "_line_start", "_max_line", "_pending", "_scan_from", "_state")

    def __init__(self, max_line_bytes: int = 1 << 20) -> None:
        """Raises ValueError when the limit is not positive."""
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self._max_line = max_line_bytes
        self._state = _DECODING
        self._failure: str | None = None
        self._pending = bytearray()  # the bytes of the unfinished item
        self._line_start = 0  # offset in _pending of its first line not yet taken
        self._scan_from = 0  # no line ending lies between _line_start and this offset

    @property
    def failed(self) -> str | None:
        """Why decoding stopped, or None while it is healthy."""
        return self._failure

    def feed(self, data: bytes) -> list[Item]:
        """Take the next chunk (any size, possibly empty); return the items it completed.

        Raises DecoderClosed after ``close()``. Never raises on the bytes themselves.
        """
        if self._state is not _DECODING:
            if self._state is _CLOSED:
                raise DecoderClosed("feed() after close()")
            return []
        if not data:
            return []
        buf: bytes | bytearray
        if self._pending:
            self._pending += data
            buf = self._pending
        else:
            buf = bytes(data)
        items, keep_from, line_start, line_end = self._scan(buf, at_end=False)
        if self._state is not _DECODING:
            return items
        # Kept inline rather than in a helper: this runs once per chunk on the hot path.
        if line_end - line_start > self._max_line:
            self._fail_line_too_long()
            return items
        if buf is self._pending:
            del self._pending[:keep_from]
        else:
            self._pending = bytearray(buf[keep_from:])
        self._line_start = line_start - keep_from
        self._scan_from = line_end - keep_from
        return items

    def close(self) -> list[Item]:
        """End of stream: return the items the end completes, then what the bytes still pending
        make (:meth:`_leftover`). Returns [] once decoding failed (its bytes were dropped).
        Raises DecoderClosed if already closed."""
        if self._state is _CLOSED:
            raise DecoderClosed("close() called twice")
        items: list[Item] = []
        pending = self._pending
        if self._state is _DECODING and pending:
            # The unfinished line was checked against the limit when it was fed.
            items, keep_from, _, _ = self._scan(pending, at_end=True)
            if self._state is _DECODING and keep_from < len(pending):
                items.append(self._leftover(bytes(pending[keep_from:])))
        self._state = _CLOSED
        self._pending = bytearray()
        return items

    def _scan(self, buf: bytes | bytearray, *, at_end: bool) -> tuple[list[Item], int, int, int]:
        """Take every complete line of ``buf`` (``_pending``, or a chunk fed while nothing was
        pending), from ``_line_start`` on, scanning for line endings from ``_scan_from``; at the
        end of the stream, a line ending held back may be complete. On a limit passed,
        :meth:`_fail` first.

        Returns the items, and the unfinished rest: where its item starts, where its line
        starts, and where that line ends so far (before a last CR that may start its ending;
        the next scan starts there).
        """
        raise NotImplementedError

    def _leftover(self, raw: bytes) -> Item:
        """What the bytes still pending at the end of the stream make."""
        raise NotImplementedError

    def _fail_line_too_long(self) -> None:
        self._fail(f"line longer than {self._max_line} bytes")

    def _fail(self, reason: str) -> None:
        self._state = _State.FAILED
        self._failure = reason
        self._pending = bytearray()
