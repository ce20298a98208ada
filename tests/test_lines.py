"""The life every line-based decoder shares (``tproxy.core.lines``), shown on SSE and NDJSON alike.

What each framing makes of its lines is in test_sse and test_ndjson, where hypothesis checks
every split of a stream; here, what they have in common: ``close()`` ends a decoder once, a
failed decoder gives nothing more and never raises, an unfinished line is held to the limit
before its ending arrives (a last CR not counted), and a chunk fed while nothing is pending is
decoded where it lies.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tproxy.core.errors import DecoderClosed
from tproxy.core.ndjson import NDJSONDecoder
from tproxy.core.sse import SSEDecoder

MakeDecoder = Callable[[int], SSEDecoder | NDJSONDecoder]
# Each framing, and what comes before and after the text of one whole item.
DECODERS = [
    pytest.param(SSEDecoder, b"data: ", b"\n\n", id="sse"),
    pytest.param(NDJSONDecoder, b"", b"\n", id="ndjson"),
]


@pytest.mark.parametrize(("make", "prefix", "ending"), DECODERS)
def test_feeding_or_closing_after_close_is_illegal(
    make: MakeDecoder, prefix: bytes, ending: bytes
) -> None:
    decoder = make(1 << 20)
    decoder.close()
    with pytest.raises(DecoderClosed):
        decoder.feed(prefix + b"a" + ending)
    with pytest.raises(DecoderClosed):
        decoder.close()


@pytest.mark.parametrize(("make", "prefix", "ending"), DECODERS)
def test_an_unfinished_line_over_the_limit_fails_before_its_ending_arrives(
    make: MakeDecoder, prefix: bytes, ending: bytes
) -> None:
    decoder = make(len(prefix) + 4)
    assert decoder.feed(prefix + b"1234\r") == []  # a last CR may start a CRLF: not counted
    assert decoder.failed is None
    decoder = make(len(prefix) + 4)
    assert decoder.feed(prefix + b"12") == []
    assert decoder.feed(b"345") == []
    assert decoder.failed == f"line longer than {len(prefix) + 4} bytes"
    assert decoder.feed(ending) == []  # failed: silent from now on, never raising
    assert decoder.close() == []


@pytest.mark.parametrize(("make", "prefix", "ending"), DECODERS)
def test_a_chunk_of_one_whole_item_is_that_item_with_no_copy(
    make: MakeDecoder, prefix: bytes, ending: bytes
) -> None:
    chunk = prefix + b"a" + ending
    decoder = make(1 << 20)
    (item,) = decoder.feed(chunk)
    assert item.raw is chunk
    assert decoder.close() == []
