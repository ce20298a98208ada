"""A WHATWG ``text/event-stream`` decoder that works on frames, fed with bytes as they arrive.

Theory of operation. The proxy forwards the upstream's bytes untouched and caches them event by
event, so the decoder answers two questions for every block of lines: which exact bytes make it
up, and which event (if any) it dispatches. A block runs from its first byte through the blank
line that ends it; ``Frame.raw`` is those bytes as received, so joining the raw bytes of every
frame from ``feed()`` and then ``close()`` gives back the input exactly.

Lines end with LF, CRLF or CR, mixed freely. A CR that is the last byte fed so far is held back
until the next byte shows whether an LF follows; that is what makes every split of the input
into chunks decode exactly like the whole input fed at once. At the end of the stream no LF can
follow, so ``close()`` takes a held CR as the line ending it is: a stream whose very last byte is
the bare CR of its final blank line still dispatches that block. Whatever unfinished block is
left then comes back from ``close()`` as one last frame without an event, as the spec says.

Per the spec, a UTF-8 BOM is skipped at the very start of the stream only, text is decoded as
UTF-8 with replacement characters, comments and unknown fields are ignored, and a block without
``data`` dispatches nothing. Splitting on bytes before decoding is equivalent to decoding first,
because CR, LF and ``:`` never occur inside a multi-byte UTF-8 sequence.

Memory is bounded: a line longer than ``max_line_bytes`` or a block whose complete lines exceed
``max_block_bytes`` stops decoding (``failed`` says why) without raising, because the proxy must
go on passing bytes through; only caching gives up. The common path scans with ``bytes.find``,
never byte by byte in Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from tproxy.core.errors import DecoderClosed

__all__ = ["Frame", "SSEDecoder", "ServerSentEvent", "encode_event"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_COLON = 0x3A
_SPACE = 0x20
# A retry of more digits than this (after leading zeros) is ignored rather than converted: it
# would be a reconnection delay of millions of years, and int() refuses very long strings.
_MAX_RETRY_DIGITS = 18
_LINE_ENDING = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event, as an ``EventSource`` would deliver it."""

    data: str
    event: str = "message"
    id: str | None = None  # the last event ID in force at dispatch; None if never set
    retry: int | None = None  # a retry set inside this event's block, if any


@dataclass(frozen=True, slots=True)
class Frame:
    """One block of the stream: its exact bytes and the event it dispatched, if any."""

    raw: bytes
    event: ServerSentEvent | None


class _State(Enum):
    DECODING = "decoding"
    FAILED = "failed"
    CLOSED = "closed"


class SSEDecoder:
    """Incremental decoder: ``feed()`` each chunk, then ``close()`` once at end of stream."""

    __slots__ = (
        "_data",
        "_event_type",
        "_failure",
        "_first_line",
        "_last_id",
        "_line_start",
        "_max_block",
        "_max_line",
        "_pending",
        "_retry",
        "_scan_from",
        "_state",
    )

    def __init__(self, max_line_bytes: int = 1 << 20, max_block_bytes: int = 8 << 20) -> None:
        """Raises ValueError when a limit is not positive."""
        if max_line_bytes < 1 or max_block_bytes < 1:
            raise ValueError("max_line_bytes and max_block_bytes must be positive")
        self._max_line = max_line_bytes
        self._max_block = max_block_bytes
        self._state = _State.DECODING
        self._failure: str | None = None
        # Raw bytes of the current, unfinished block: its complete lines, then the partial one.
        self._pending = bytearray()
        self._line_start = 0  # offset in _pending of the first line not yet interpreted
        self._scan_from = 0  # no line ending lies between _line_start and here
        self._first_line = True  # the BOM may only start the first line of the stream
        self._data: list[str] = []
        self._event_type = ""
        self._retry: int | None = None
        self._last_id: str | None = None  # outlives blocks, as the spec's last event ID buffer

    @property
    def failed(self) -> str | None:
        """Why decoding stopped, or None while it is healthy."""
        return self._failure

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next chunk (any size, possibly empty); return the blocks it completed.

        Raises DecoderClosed after ``close()``. Never raises on the bytes themselves.
        """
        if self._state is not _State.DECODING:
            if self._state is _State.CLOSED:
                raise DecoderClosed("feed() after close()")
            return []
        if not data:
            return []
        # Work on the caller's bytes directly when nothing is pending: the usual case of a chunk
        # holding whole events then needs no copy into the buffer.
        buf: bytes | bytearray
        if self._pending:
            self._pending += data
            buf = self._pending
        else:
            buf = bytes(data)
        return self._scan(buf, at_end=False)

    def close(self) -> list[Frame]:
        """End of stream: return the frames the end completes, then any unfinished block.

        The end completes a block whose last line ending was a held CR. Bytes of a block still
        unfinished come last as ``Frame(raw, None)``: per the spec it is not dispatched. Returns
        [] once decoding failed (its bytes were dropped). Raises DecoderClosed if already closed.
        """
        if self._state is _State.CLOSED:
            raise DecoderClosed("close() called twice")
        frames: list[Frame] = []
        if self._state is _State.DECODING and self._pending:
            frames = self._scan(self._pending, at_end=True)
            if self._pending and self._state is _State.DECODING:
                frames.append(Frame(bytes(self._pending), None))
        self._state = _State.CLOSED
        self._pending = bytearray()
        return frames

    def _scan(self, buf: bytes | bytearray, *, at_end: bool) -> list[Frame]:
        """Interpret every complete line of ``buf`` (``_pending`` or a fresh chunk) and keep the
        rest pending; at the end of the stream a final CR counts as a complete line ending."""
        frames: list[Frame] = []
        end = len(buf)
        start = self._line_start
        block_start = 0
        lf = buf.find(b"\n", self._scan_from)
        cr = buf.find(b"\r", self._scan_from)
        held_cr = False
        while lf >= 0 or cr >= 0:
            if cr < 0 or 0 <= lf < cr:
                eol, nxt = lf, lf + 1
            elif cr + 1 < end:
                eol = cr
                nxt = cr + 2 if buf[cr + 1] == _LF else cr + 1
            elif at_end:
                eol, nxt = cr, end  # no LF can follow any more
            else:
                held_cr = True  # an LF may follow in the next chunk
                break
            if eol - start > self._max_line:
                self._fail(f"line longer than {self._max_line} bytes")
                return frames
            if nxt - block_start > self._max_block:
                self._fail(f"event block longer than {self._max_block} bytes")
                return frames
            if self._first_line:
                self._first_line = False
                if buf.startswith(_BOM, start):
                    start += len(_BOM)
            if eol == start:
                frames.append(Frame(bytes(buf[block_start:nxt]), self._dispatch()))
                block_start = nxt
            else:
                self._interpret(buf, start, eol)
            start = nxt
            if 0 <= lf < start:
                lf = buf.find(b"\n", start)
            if 0 <= cr < start:
                cr = buf.find(b"\r", start)
        partial_end = end - 1 if held_cr else end
        if partial_end - start > self._max_line:
            self._fail(f"line longer than {self._max_line} bytes")
            return frames
        if buf is self._pending:
            del self._pending[:block_start]
        else:
            self._pending = bytearray(buf[block_start:])
        self._line_start = start - block_start
        self._scan_from = partial_end - block_start
        return frames

    def _fail(self, reason: str) -> None:
        self._state = _State.FAILED
        self._failure = reason
        self._pending = bytearray()
        self._data = []

    def _interpret(self, buf: bytes | bytearray, start: int, eol: int) -> None:
        """Apply one non-blank line ``buf[start:eol]`` to the event being built."""
        if buf[start] == _COLON:
            return  # a comment, e.g. a keep-alive ping
        colon = buf.find(b":", start, eol)
        if colon < 0:
            name = buf[start:eol]
            value = buf[eol:eol]
        else:
            name = buf[start:colon]
            value_start = colon + 1
            if value_start < eol and buf[value_start] == _SPACE:
                value_start += 1
            value = buf[value_start:eol]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit() and len(value.lstrip(b"0")) <= _MAX_RETRY_DIGITS:
            self._retry = int(value)

    def _dispatch(self) -> ServerSentEvent | None:
        """A blank line ends the block: build its event (None without data) and reset."""
        event = None
        if self._data:
            event = ServerSentEvent(
                "\n".join(self._data), self._event_type or "message", self._last_id, self._retry
            )
            self._data = []
        self._event_type = ""
        self._retry = None
        return event


def encode_event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """Frame one event with LF line endings; ``data`` may hold lines ended by LF, CRLF or CR.

    Raises ValueError when ``event`` or ``id`` contains a line ending, or ``id`` a NUL: the
    result would not decode to the same event.
    """
    lines: list[str] = []
    if event is not None:
        if _LINE_ENDING.search(event):
            raise ValueError("an event type cannot contain a line ending")
        lines.append(f"event: {event}\n")
    if id is not None:
        if _LINE_ENDING.search(id) or "\x00" in id:
            raise ValueError("an event id cannot contain a line ending or NUL")
        lines.append(f"id: {id}\n")
    lines.extend(f"data: {line}\n" for line in _LINE_ENDING.split(data))
    lines.append("\n")
    return "".join(lines).encode()
