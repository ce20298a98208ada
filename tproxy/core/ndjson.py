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
caching gives up. Lines are found with ``bytes.find``, never byte by byte in Python. The
decoder's life, its pending bytes and the line limit are those of every line-based framing
(:mod:`tproxy.core.lines`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.core.lines import LineDecoder

__all__ = ["Line", "NDJSONDecoder"]

_BLANK = b" \t\r"
_CR = 0x0D


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the stream: its exact bytes, and its text (None for a blank line)."""

    raw: bytes
    text: str | None


class NDJSONDecoder(LineDecoder[Line]):
    """Incremental decoder: ``feed()`` each chunk, then ``close()`` once at end of stream.

    ``close()`` returns the last line if it had no LF, else [].
    """

    __slots__ = ()

    def _scan(self, buf: bytes | bytearray, *, at_end: bool) -> tuple[list[Line], int, int, int]:
        """Take every line of ``buf`` its LF completed; the end of the stream changes nothing
        here (a last line without its LF is the leftover)."""
        lines: list[Line] = []
        start = 0
        lf = buf.find(b"\n", self._scan_from)
        while lf >= 0:
            line = self._line(bytes(buf[start : lf + 1]))
            if line is None:
                break
            lines.append(line)
            start = lf + 1
            lf = buf.find(b"\n", start)
        end = len(buf)
        if end > start and buf[end - 1] == _CR:
            end -= 1  # a CR that may start a CRLF: it does not count against the limit
        return lines, start, start, end

    def _leftover(self, raw: bytes) -> Line:
        line = self._line(raw)
        assert line is not None, "the pending line was checked against the limit"
        return line

    def _line(self, raw: bytes) -> Line | None:
        """The line ``raw`` (its ending included); None (and failed) when it is too long."""
        content = raw.removesuffix(b"\n").removesuffix(b"\r")
        if len(content) > self._max_line:
            self._fail_line_too_long()
            return None
        text = None if not content.strip(_BLANK) else content.decode("utf-8", "replace")
        return Line(raw, text)
