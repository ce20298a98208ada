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
never byte by byte in Python. The decoder's life, its pending bytes and the line limit are those
of every line-based framing (:mod:`tproxy.core.lines`); this module says how SSE lines end and
what a block of them makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tproxy.core.lines import LineDecoder

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


class SSEDecoder(LineDecoder[Frame]):
    """Incremental decoder: ``feed()`` each chunk, then ``close()`` once at end of stream.

    ``close()`` returns the frames the end completes (a block whose last line ending was a held
    CR), then the bytes of a block still unfinished as ``Frame(raw, None)``: per the spec it is
    not dispatched.
    """

    __slots__ = (
        "_data",
        "_event_type",
        "_first_line",
        "_last_id",
        "_max_block",
        "_retry",
    )

    def __init__(self, max_line_bytes: int = 1 << 20, max_block_bytes: int = 8 << 20) -> None:
        """Raises ValueError when a limit is not positive."""
        if max_block_bytes < 1:
            raise ValueError("max_block_bytes must be positive")
        super().__init__(max_line_bytes)
        self._max_block = max_block_bytes
        # _pending holds the raw bytes of the current, unfinished block: its complete lines,
        # then the partial one.
        self._first_line = True  # the BOM may only start the first line of the stream
        self._data: list[str] = []
        self._event_type = ""
        self._retry: int | None = None
        self._last_id: str | None = None  # outlives blocks, as the spec's last event ID buffer

    def _scan(self, buf: bytes | bytearray, *, at_end: bool) -> tuple[list[Frame], int, int, int]:
        """Interpret every complete line of ``buf``; a blank one ends a block, the frame. At the
        end of the stream a final CR counts as a complete line ending."""
        frames: list[Frame] = []
        end = len(buf)
        max_line, max_block = self._max_line, self._max_block
        start = self._line_start
        block_start = 0
        line_end = end
        lf = buf.find(b"\n", self._scan_from)
        cr = buf.find(b"\r", self._scan_from)
        while lf >= 0 or cr >= 0:
            if cr < 0 or 0 <= lf < cr:
                eol, nxt = lf, lf + 1
            elif cr + 1 < end:
                eol = cr
                nxt = cr + 2 if buf[cr + 1] == _LF else cr + 1
            elif at_end:
                eol, nxt = cr, end  # no LF can follow any more
            else:
                line_end = cr  # an LF may follow in the next chunk: the CR is held
                break
            if eol - start > max_line:
                self._fail_line_too_long()
                return frames, block_start, start, end
            if nxt - block_start > max_block:
                self._fail(f"event block longer than {max_block} bytes")
                return frames, block_start, start, end
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
        return frames, block_start, start, line_end

    def _leftover(self, raw: bytes) -> Frame:
        return Frame(raw, None)

    def _fail(self, reason: str) -> None:
        super()._fail(reason)
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
