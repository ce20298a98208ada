"""A newline-delimited JSON (NDJSON) decoder that works on lines, fed with bytes as they arrive.

Theory of operation. Ollama's native API streams one JSON object per line
(``application/x-ndjson``). The proxy forwards those bytes untouched and caches them line by line,
so, like :mod:`tproxy.core.sse`, the decoder says for every line which exact bytes make it up and
what text it carries. ``Line.raw`` is the line as received, its line ending included, so joining
the raw bytes of every line from ``feed()`` and then ``close()`` gives back the input exactly.

A line ends with LF; a CR right before the LF is part of the ending (CRLF is tolerated), so it is
not in ``Line.text``. Only the LF decides where a line ends, which is what makes every split of
the input into chunks decode exactly like the whole input fed at once. A blank line (nothing but
spaces, tabs or a CR) carries no text (``text`` is None) and is otherwise skipped. At the end of
the stream, a last line without its LF comes back from ``close()`` with its text: a whole JSON
object still reads as one, and a line cut in the middle reads as text that is not JSON, which is
for the completion check to judge.

Text is decoded as UTF-8 with replacement characters; the decoder does not parse the JSON (that
belongs to each API family's completion check).

Memory is bounded: a line longer than ``max_line_bytes`` (without its ending) stops decoding
(``failed`` says why) without raising, because the proxy must go on passing bytes through; only
caching gives up. Lines are found with ``bytes.find``, never byte by byte in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tproxy.core.errors import DecoderClosed

__all__ = ["Line", "NDJSONDecoder"]

_BLANK = b" \t\r"


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the stream: its exact bytes, and its text (None for a blank line)."""

    raw: bytes
    text: str | None


class _State(Enum):
    DECODING = "decoding"
    FAILED = "failed"
    CLOSED = "closed"


class NDJSONDecoder:
    """Incremental decoder: ``feed()`` each chunk, then ``close()`` once at end of stream."""

    __slots__ = ("_failure", "_max_line", "_pending", "_state")

    def __init__(self, max_line_bytes: int = 1 << 20) -> None:
        """Raises ValueError when the limit is not positive."""
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self._max_line = max_line_bytes
        self._state = _State.DECODING
        self._failure: str | None = None
        self._pending = bytearray()  # the start of a line whose LF has not arrived; never an LF

    @property
    def failed(self) -> str | None:
        """Why decoding stopped, or None while it is healthy."""
        return self._failure

    def feed(self, data: bytes) -> list[Line]:
        """Take the next chunk (any size, possibly empty); return the lines it completed.

        Raises DecoderClosed after ``close()``. Never raises on the bytes themselves.
        """
        if self._state is not _State.DECODING:
            if self._state is _State.CLOSED:
                raise DecoderClosed("feed() after close()")
            return []
        if not data:
            return []
        lines: list[Line] = []
        buf: bytes | bytearray
        if self._pending:
            scan_from = len(self._pending)  # the pending bytes hold no LF
            self._pending += data
            buf = self._pending
        else:
            scan_from = 0
            buf = bytes(data)
        start = 0
        lf = buf.find(b"\n", scan_from)
        while lf >= 0:
            if not self._keep(lines, buf, start, lf + 1):
                return lines
            start = lf + 1
            lf = buf.find(b"\n", start)
        rest = buf[start:]
        if len(rest.removesuffix(b"\r")) > self._max_line:
            self._fail()
            return lines
        self._pending = bytearray(rest)
        return lines

    def close(self) -> list[Line]:
        """End of stream: return the last line if it had no LF, else []. Returns [] once decoding
        failed (its bytes were dropped). Raises DecoderClosed if already closed."""
        if self._state is _State.CLOSED:
            raise DecoderClosed("close() called twice")
        lines: list[Line] = []
        if self._state is _State.DECODING and self._pending:
            self._keep(lines, self._pending, 0, len(self._pending))
        self._state = _State.CLOSED
        self._pending = bytearray()
        return lines

    def _keep(self, lines: list[Line], buf: bytes | bytearray, start: int, end: int) -> bool:
        """Append the line ``buf[start:end]``; False (and failed) when it is too long."""
        raw = bytes(buf[start:end])
        content = raw.removesuffix(b"\n").removesuffix(b"\r")
        if len(content) > self._max_line:
            self._fail()
            return False
        text = None if not content.strip(_BLANK) else content.decode("utf-8", "replace")
        lines.append(Line(raw, text))
        return True

    def _fail(self) -> None:
        self._state = _State.FAILED
        self._failure = f"line longer than {self._max_line} bytes"
        self._pending = bytearray()
