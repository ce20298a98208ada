"""The NDJSON decoder: Ollama's framing, any chunking of the bytes, bounded lines, exact bytes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.ndjson import Line, NDJSONDecoder


@dataclass(frozen=True)
class Decoded:
    lines: list[Line]  # what feed() returned, then what close() returned
    failed: str | None

    @property
    def texts(self) -> list[str]:
        return [line.text for line in self.lines if line.text is not None]


def decode(chunks: list[bytes], max_line_bytes: int = 1 << 20) -> Decoded:
    decoder = NDJSONDecoder(max_line_bytes)
    lines = [line for chunk in chunks for line in decoder.feed(chunk)]
    return Decoded(lines + decoder.close(), decoder.failed)


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


OLLAMA_CHAT = (
    b'{"model":"llama3.2","created_at":"2026-01-01T00:00:00Z",'
    b'"message":{"role":"assistant","content":"Hi"},"done":false}\n'
    b'{"model":"llama3.2","created_at":"2026-01-01T00:00:01Z",'
    b'"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    b'"prompt_eval_count":3,"eval_count":1}\n'
)


def test_ollama_lines_come_out_one_by_one_with_their_bytes() -> None:
    decoded = decode([OLLAMA_CHAT])
    assert [line.raw for line in decoded.lines] == OLLAMA_CHAT.splitlines(keepends=True)
    assert decoded.texts == [raw.decode() for raw in OLLAMA_CHAT.splitlines()]
    assert decoded.failed is None


def test_crlf_endings_are_tolerated_and_not_part_of_the_text() -> None:
    decoded = decode([b'{"a":1}\r\n{"b":2}\r\n'])
    assert decoded.texts == ['{"a":1}', '{"b":2}']
    assert decoded.lines[0].raw == b'{"a":1}\r\n'


def test_blank_lines_carry_no_text_but_keep_their_bytes() -> None:
    decoded = decode([b'\n  \r\n{"a":1}\n\t\n'])
    assert [line.text for line in decoded.lines] == [None, None, '{"a":1}', None]
    assert b"".join(line.raw for line in decoded.lines) == b'\n  \r\n{"a":1}\n\t\n'


def test_a_line_waits_for_its_lf() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"a":') == []
    assert decoder.feed(b"1}\r") == []
    assert decoder.feed(b"\n") == [Line(b'{"a":1}\r\n', '{"a":1}')]


def test_a_last_line_without_lf_comes_back_at_close_with_its_text() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"a":1}\n{"done":true}') == [Line(b'{"a":1}\n', '{"a":1}')]
    assert decoder.close() == [Line(b'{"done":true}', '{"done":true}')]


def test_a_bare_cr_inside_a_line_is_text() -> None:
    assert decode([b"a\rb\n"]).texts == ["a\rb"]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode([b"\xff\xfe\n"]).texts == ["\ufffd\ufffd"]


def test_a_line_longer_than_the_limit_stops_decoding_without_raising() -> None:
    decoded = decode([b"ok\n", b"x" * 11 + b"\n", b"never\n"], max_line_bytes=10)
    assert decoded.texts == ["ok"]
    assert decoded.failed == "line longer than 10 bytes"


def test_an_unfinished_line_over_the_limit_fails_before_its_end_arrives() -> None:
    decoder = NDJSONDecoder(max_line_bytes=4)
    assert decoder.feed(b"12345") == []
    assert decoder.failed is not None
    assert decoder.feed(b"\n") == []
    assert decoder.close() == []


def test_a_line_of_exactly_the_limit_is_fine_and_its_ending_does_not_count() -> None:
    assert decode([b"1234\r\n"], max_line_bytes=4).texts == ["1234"]
    assert decode([b"1234\r"], max_line_bytes=4).texts == ["1234"]


def test_empty_chunks_are_harmless() -> None:
    assert decode([b"", b"a\n", b"", b"b", b""]).texts == ["a", "b"]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        NDJSONDecoder(0)


# --- any chunking ------------------------------------------------------------------------------

streams = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b" ", b'{"done":true}', b'{"a":"\xc3\xa9"}']),
        st.binary(max_size=12),
    ),
    max_size=16,
).map(b"".join)
limits = st.sampled_from([1, 4, 16, 1 << 20])


@settings(max_examples=300)
@given(stream=streams, data=st.data(), max_line_bytes=limits)
def test_any_split_decodes_like_the_whole_stream(
    stream: bytes, data: st.DataObject, max_line_bytes: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert decode(split_at(stream, cuts), max_line_bytes) == decode([stream], max_line_bytes)


@settings(max_examples=200)
@given(stream=streams, max_line_bytes=limits)
def test_byte_by_byte_decodes_like_the_whole_stream(stream: bytes, max_line_bytes: int) -> None:
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert decode(bytewise, max_line_bytes) == decode([stream], max_line_bytes)


@settings(max_examples=300)
@given(stream=streams, data=st.data())
def test_lines_give_back_every_byte(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    decoded = decode(split_at(stream, cuts))
    assert b"".join(line.raw for line in decoded.lines) == stream
    for line in decoded.lines[:-1]:
        assert line.raw.endswith(b"\n")
        assert b"\n" not in line.raw[:-1]


@settings(max_examples=300)
@given(stream=streams)
def test_texts_are_the_non_blank_lines(stream: bytes) -> None:
    expected = [
        part.removesuffix(b"\r").decode("utf-8", "replace")
        for part in stream.split(b"\n")
        if part.strip(b" \t\r")
    ]
    assert decode([stream]).texts == expected
