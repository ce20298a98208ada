"""The SSE decoder: the spec's rules, real upstreams' framing, and any chunking of the bytes."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.sse import Frame, ServerSentEvent, SSEDecoder, encode_event

E = ServerSentEvent


@dataclass(frozen=True)
class Decoded:
    frames: list[Frame]  # what feed() returned, then what close() returned
    failed: str | None
    # The raw bytes of close()'s frames. Left out of ==: chunkings must agree on the frames as a
    # whole, not on where feed() stops and close() takes over.
    at_close: bytes = field(default=b"", compare=False)

    @property
    def events(self) -> list[ServerSentEvent]:
        return [frame.event for frame in self.frames if frame.event is not None]


def decode(chunks: list[bytes], **limits: int) -> Decoded:
    decoder = SSEDecoder(**limits)
    frames = [frame for chunk in chunks for frame in decoder.feed(chunk)]
    closing = decoder.close()
    at_close = b"".join(frame.raw for frame in closing)
    return Decoded(frames + closing, decoder.failed, at_close)


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- the rules of the spec, one stream at a time ---------------------------------------------
# Each case: the stream, every event it dispatches, and the raw bytes close() returns (a block
# that only the end of the stream completes, or an unfinished one).

SPEC_CASES = [
    pytest.param(b"data: a\n\n", [E("a")], b"", id="lf"),
    pytest.param(b"data: a\r\n\r\n", [E("a")], b"", id="crlf"),
    pytest.param(b"data: a\r\rdata: b\r\r", [E("a"), E("b")], b"data: b\r\r", id="cr"),
    pytest.param(b"data: a\r\ndata: b\rdata: c\n\r\n", [E("a\nb\nc")], b"", id="mixed-endings"),
    pytest.param(b"data: a\n\r\n\r", [E("a")], b"\r", id="lf-then-crlf-blank-then-cr"),
    pytest.param(b"data: a\r", [], b"data: a\r", id="final-cr-ends-a-line-not-the-block"),
    pytest.param(b"\xef\xbb\xbfdata: a\n\n", [E("a")], b"", id="leading-bom-skipped"),
    pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], b"", id="only-one-bom-skipped"),
    pytest.param(b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [E("a")], b"", id="bom-later-is-a-name"),
    pytest.param(b": ping\n\n", [], b"", id="comment-only-block"),
    pytest.param(b":\ndata: a\n: more\n\n", [E("a")], b"", id="comments-among-fields"),
    pytest.param(b"data:a\n\n", [E("a")], b"", id="no-space-after-colon"),
    pytest.param(b"data:  a \n\n", [E(" a ")], b"", id="only-one-space-removed"),
    pytest.param(b"data : a\n\n", [], b"", id="space-before-colon-is-another-name"),
    pytest.param(b"data\n\n", [E("")], b"", id="name-without-colon-means-empty-value"),
    pytest.param(b"data\ndata\n\n", [E("\n")], b"", id="two-empty-data-lines"),
    pytest.param(b"data: a\ndata:\ndata: b\n\n", [E("a\n\nb")], b"", id="empty-line-inside-data"),
    pytest.param(b"data: a: b\n\n", [E("a: b")], b"", id="colon-inside-value"),
    pytest.param(b"foo: bar\ndata: x\n\n", [E("x")], b"", id="unknown-field-ignored"),
    pytest.param(b"event: add\ndata: x\n\n", [E("x", "add")], b"", id="event-type"),
    pytest.param(b"event:\ndata: x\n\n", [E("x")], b"", id="empty-event-type-is-message"),
    pytest.param(b"event: x\n\ndata: y\n\n", [E("y")], b"", id="type-reset-by-empty-block"),
    pytest.param(
        b"event: add\ndata: 1\n\ndata: 2\n\n", [E("1", "add"), E("2")], b"", id="type-per-event"
    ),
    pytest.param(
        b"id: 7\ndata: a\n\ndata: b\n\n", [E("a", id="7"), E("b", id="7")], b"", id="id-persists"
    ),
    pytest.param(b"id: 7\n\nid\ndata: a\n\n", [E("a", id="")], b"", id="bare-id-resets-it"),
    pytest.param(
        b"id: 7\nid: 8\x009\ndata: a\n\n", [E("a", id="7")], b"", id="id-with-nul-ignored"
    ),
    pytest.param(b"retry: 1000\ndata: a\n\n", [E("a", retry=1000)], b"", id="retry"),
    pytest.param(b"retry: 10x\ndata: a\n\n", [E("a")], b"", id="retry-not-digits-ignored"),
    pytest.param(b"retry:\ndata: a\n\n", [E("a")], b"", id="retry-empty-ignored"),
    pytest.param(b"retry: -5\ndata: a\n\n", [E("a")], b"", id="retry-negative-ignored"),
    pytest.param(b"retry: " + b"9" * 40 + b"\ndata: a\n\n", [E("a")], b"", id="retry-huge-ignored"),
    pytest.param(
        b"retry: 00000000000000000000007\ndata: a\n\n", [E("a", retry=7)], b"", id="retry-zeros"
    ),
    pytest.param(
        b"retry: 5\ndata: a\n\ndata: b\n\n", [E("a", retry=5), E("b")], b"", id="retry-per-block"
    ),
    pytest.param(b"data: \xff\xe2\x82\n\n", [E("\ufffd\ufffd")], b"", id="bad-utf8-replaced"),
    pytest.param("data: é ☃ 🦀\n\n".encode(), [E("é ☃ 🦀")], b"", id="utf8"),
    pytest.param(b"data: a\n", [], b"data: a\n", id="unfinished-block-not-dispatched"),
    pytest.param(b"data: a", [], b"data: a", id="unfinished-line-not-dispatched"),
    pytest.param(b"", [], b"", id="empty-stream"),
    # The examples of the spec's section on event stream interpretation.
    pytest.param(
        b"data: This is the first message.\n\n"
        b"data: This is the second message, it\ndata: has two lines.\n\n"
        b"data: This is the third message.\n\n",
        [
            E("This is the first message."),
            E("This is the second message, it\nhas two lines."),
            E("This is the third message."),
        ],
        b"",
        id="spec-three-messages",
    ),
    pytest.param(
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [E("73857293", "add"), E("2153", "remove"), E("113411", "add")],
        b"",
        id="spec-event-types",
    ),
    pytest.param(
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [E("first event", id="1"), E("second event", id=""), E(" third event", id="")],
        b"",
        id="spec-ids",
    ),
    pytest.param(b"data\n\ndata\ndata\n\ndata:", [E(""), E("\n")], b"data:", id="spec-empty-data"),
    pytest.param(b"data:test\n\ndata: test\n\n", [E("test"), E("test")], b"", id="spec-space"),
]


@pytest.mark.parametrize(("stream", "events", "at_close"), SPEC_CASES)
def test_spec_rules(stream: bytes, events: list[ServerSentEvent], at_close: bytes) -> None:
    whole = decode([stream])
    assert whole.events == events
    assert whole.at_close == at_close
    assert whole.failed is None
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_frames_carry_exact_bytes_including_comment_blocks() -> None:
    decoder = SSEDecoder()
    frames = decoder.feed(b": ping\r\n\r\nid: 1\r\ndata: a\r\n\r\ndata: b")
    assert frames == [
        Frame(b": ping\r\n\r\n", None),
        Frame(b"id: 1\r\ndata: a\r\n\r\n", E("a", id="1")),
    ]
    assert decoder.close() == [Frame(b"data: b", None)]


def test_a_block_without_data_is_a_frame_without_event() -> None:
    assert decode([b"event: x\nid: 3\nretry: 9\n\n"]).frames == [
        Frame(b"event: x\nid: 3\nretry: 9\n\n", None)
    ]


def test_the_bom_belongs_to_the_first_frame() -> None:
    assert decode([b"\xef\xbb", b"\xbfdata: a\n\n"]).frames == [
        Frame(b"\xef\xbb\xbfdata: a\n\n", E("a"))
    ]


def test_a_cr_at_the_end_of_a_chunk_waits_for_a_possible_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == []
    assert decoder.feed(b"\n") == [Frame(b"data: a\r\n\r\n", E("a"))]
    assert decoder.feed(b"data: b\r\r") == []
    assert decoder.feed(b"data: c\r\r") == [Frame(b"data: b\r\r", E("b"))]


def test_at_the_end_of_the_stream_a_held_cr_completes_the_last_block() -> None:
    """No LF can follow the last byte, so the held CR is the blank line that ends the block."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    assert decoder.close() == [Frame(b"data: a\r\r", E("a"))]


def test_done_ended_by_a_bare_cr_as_the_last_bytes_is_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\rdata: [DONE]\r") == [Frame(b"data: x\r\r", E("x"))]
    assert decoder.feed(b"\r") == []
    assert decoder.close() == [Frame(b"data: [DONE]\r\r", E("[DONE]"))]


# --- real upstreams ---------------------------------------------------------------------------


def test_sse_starlette_crlf_framing_and_pings() -> None:
    chunks = [
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\r\n\r\n',
        b": ping - 2025-01-01 00:00:15.000000+00:00\r\n\r\n",
        b'data: {"choices":[{"finish_reason":"stop"}]}\r\n\r\n',
        b"data: [DONE]\r\n\r\n",
    ]
    decoder = SSEDecoder()
    frames = [decoder.feed(chunk) for chunk in chunks]
    assert [[frame.raw for frame in group] for group in frames] == [[chunk] for chunk in chunks]
    assert [group[0].event for group in frames] == [
        E('{"choices":[{"delta":{"content":"Hi"}}]}'),
        None,
        E('{"choices":[{"finish_reason":"stop"}]}'),
        E("[DONE]"),
    ]
    assert decoder.close() == []


def test_llama_cpp_lf_framing_with_two_events_in_one_chunk() -> None:
    first = b'data: {"content":"a"}\n\n'
    second = b'data: {"content":"b"}\n\n'
    decoder = SSEDecoder()
    assert decoder.feed(first + second + b"data: [DO") == [
        Frame(first, E('{"content":"a"}')),
        Frame(second, E('{"content":"b"}')),
    ]
    assert decoder.feed(b"NE]\n\n") == [Frame(b"data: [DONE]\n\n", E("[DONE]"))]


# --- limits, failure and the end of the stream ------------------------------------------------


def test_a_line_longer_than_the_limit_stops_decoding_without_raising() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    assert decoder.feed(b"data: ok\n\n" + b"data: 0123456789\n\ndata: b\n\n") == [
        Frame(b"data: ok\n\n", E("ok"))
    ]
    assert decoder.failed == "line longer than 10 bytes"
    assert decoder.feed(b"data: c\n\n") == []
    assert decoder.close() == []


def test_an_unfinished_line_over_the_limit_fails_before_its_end_arrives() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    assert decoder.feed(b"data: 01234") == []
    assert decoder.failed == "line longer than 10 bytes"
    assert decoder.feed(b"x" * 100) == []
    assert decoder.close() == []


def test_a_line_of_exactly_the_limit_is_fine() -> None:
    assert decode([b"data: 0123\n\n"], max_line_bytes=10) == Decoded(
        [Frame(b"data: 0123\n\n", E("0123"))], None
    )
    assert decode([b"data: 0123\r", b"\n\r\n"], max_line_bytes=10).failed is None


def test_a_block_of_many_short_lines_over_its_limit_stops_decoding() -> None:
    decoded = decode([b"data: a\n" * 5 + b"\n"], max_block_bytes=20)
    assert decoded == Decoded([], "event block longer than 20 bytes")


def test_empty_chunks_are_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"") == []
    assert decoder.close() == [Frame(b"data: a\r\r", E("a"))]


@pytest.mark.parametrize("limits", [{"max_line_bytes": 0}, {"max_block_bytes": 0}])
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        SSEDecoder(**limits)


# --- any chunking gives the same result -------------------------------------------------------

PIECES = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"data",
    b"data:",
    b"data: ",
    b"event: ",
    b"id: ",
    b"id",
    b"retry: ",
    b"12",
    b":",
    b": ping",
    b" ",
    b"x",
    b"\x00",
    b"\xef\xbb\xbf",
    "é🦀".encode(),
    b"\xff",
    b"\xe2\x82",
]
streams = st.lists(st.sampled_from(PIECES) | st.binary(max_size=6), max_size=40).map(b"".join)
limit_sets = st.sampled_from([{}, {"max_line_bytes": 12, "max_block_bytes": 40}])


@settings(max_examples=300)
@given(stream=streams, data=st.data(), limits=limit_sets)
def test_any_split_decodes_like_the_whole_stream(
    stream: bytes, data: st.DataObject, limits: dict[str, int]
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert decode(split_at(stream, cuts), **limits) == decode([stream], **limits)


@settings(max_examples=200)
@given(stream=streams, limits=limit_sets)
def test_byte_by_byte_decodes_like_the_whole_stream(stream: bytes, limits: dict[str, int]) -> None:
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    assert decode(one_by_one, **limits) == decode([stream], **limits)


@settings(max_examples=300)
@given(stream=streams, data=st.data())
def test_frames_give_back_every_byte(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    decoded = decode(split_at(stream, cuts))
    assert decoded.failed is None
    assert b"".join(frame.raw for frame in decoded.frames) == stream
    # Only the last frame may be an unfinished block, cut off by the end of the stream.
    assert all(frame.raw.endswith((b"\n", b"\r")) for frame in decoded.frames[:-1])


def reference_events(stream: bytes) -> list[ServerSentEvent]:
    """The spec's algorithm, literally: decode everything, split lines, interpret each."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # the last piece has no line ending
    events: list[ServerSentEvent] = []
    data, event_type, last_id, retry = "", "", None, None
    for line in lines:
        if not line:
            if data:
                events.append(E(data[:-1], event_type or "message", last_id, retry))
            data, event_type, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Our documented cap: more than 18 significant digits are ignored.
            retry = int(value) if len(value.lstrip("0")) <= 18 else retry
    return events


@settings(max_examples=300)
@given(stream=streams)
def test_events_match_a_literal_reading_of_the_spec(stream: bytes) -> None:
    assert decode([stream]).events == reference_events(stream)


# --- generated field mixes decode to what the model says --------------------------------------

line_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=12
)
endings = st.sampled_from(["\n", "\r\n", "\r"])
fields = st.one_of(
    st.tuples(st.just("data"), line_text),
    st.tuples(st.just("event"), line_text),
    st.tuples(st.just("id"), line_text),
    st.tuples(st.just("retry"), st.integers(0, 10**9).map(str) | line_text),
    st.tuples(st.just(""), line_text),  # a comment
    st.tuples(st.sampled_from(["foo", "Data", "ids", "retry "]), line_text),
)


@dataclass
class Model:
    """What an EventSource would see: the trivially correct bookkeeping, field by field."""

    last_id: str | None = None

    def event_of(self, block: list[tuple[str, str]]) -> ServerSentEvent | None:
        data: list[str] = []
        event_type, retry = "", None
        for name, value in block:
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id" and "\x00" not in value:
                self.last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                retry = int(value)
        if not data:
            return None
        return E("\n".join(data), event_type or "message", self.last_id, retry)


def render(name: str, value: str, style: int) -> str:
    if name == "":
        return ":" + value
    if value == "" and style == 0:
        return name
    if style == 1 and not value.startswith(" "):
        return f"{name}:{value}"
    return f"{name}: {value}"


@settings(max_examples=200)
@given(
    blocks=st.lists(
        st.lists(st.tuples(fields, endings, st.integers(0, 2)), max_size=5), max_size=6
    ),
    blank_endings=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=6, max_size=6),
    bom=st.booleans(),
    data=st.data(),
)
def test_generated_field_mixes_decode_to_what_the_model_says(
    blocks: list[list[tuple[tuple[str, str], str, int]]],
    blank_endings: list[str],
    bom: bool,
    data: st.DataObject,
) -> None:
    model = Model()
    raws: list[bytes] = []
    expected: list[ServerSentEvent | None] = []
    for block, blank in zip(blocks, blank_endings, strict=False):
        text = "".join(render(name, value, style) + end for (name, value), end, style in block)
        before = text or (raws[-1] if raws else b"").decode()
        if before.endswith("\r") and blank == "\n":
            blank = "\r\n"  # a lone LF would join the CR before it into one line ending
        raws.append((text + blank).encode())
        expected.append(model.event_of([field for field, _, _ in block]))
    if bom and raws:
        raws[0] = b"\xef\xbb\xbf" + raws[0]
    stream = b"".join(raws)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    decoded = decode(split_at(stream, cuts))
    assert [frame.raw for frame in decoded.frames] == raws
    assert [frame.event for frame in decoded.frames] == expected


# --- the encoder ------------------------------------------------------------------------------


def test_encode_event_frames_with_lf_and_splits_every_line_ending() -> None:
    assert encode_event("a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert encode_event("", event="ping", id="3") == b"event: ping\nid: 3\ndata: \n\n"


@pytest.mark.parametrize(
    ("event", "id"), [("a\nb", None), ("a\rb", None), (None, "1\n2"), (None, "1\x002")]
)
def test_encode_event_refuses_what_would_not_decode_back(event: str | None, id: str | None) -> None:
    with pytest.raises(ValueError, match="cannot contain"):
        encode_event("x", event=event, id=id)


@settings(max_examples=200)
@given(
    data=st.text(),
    event=st.none() | line_text,
    id=st.none() | line_text.filter(lambda text: "\x00" not in text),
)
def test_encoded_events_decode_back(data: str, event: str | None, id: str | None) -> None:
    [frame] = decode([encode_event(data, event, id)]).frames
    assert frame.event == E(re.sub(r"\r\n|\r", "\n", data), event or "message", id)
