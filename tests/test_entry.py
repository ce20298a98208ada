"""The stored-entry codec: a round trip keeps every field, and damaged bytes never decode."""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.entry import ENTRY_FORMAT_VERSION, StoredEntry, decode_entry, encode_entry
from tproxy.core.errors import CorruptEntry

HEADER_SIZE = 13  # magic, version, payload length, checksum


def sample_stream() -> StoredEntry:
    frames = (b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', b"data: [DONE]\n\n")
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"text/event-stream"),),
        chunks=frames,
        offsets=(0.0, 0.25),
        streamed=True,
        created_at=1_700_000_000.5,
        expires_at=1_700_003_600.5,
        model="llama-3",
    )


@st.composite
def entries(draw: st.DrawFn) -> StoredEntry:
    chunks = draw(st.lists(st.binary(max_size=64), max_size=6))
    offsets = draw(
        st.lists(st.floats(min_value=0, max_value=1e6), min_size=len(chunks), max_size=len(chunks))
    )
    return StoredEntry(
        status=draw(st.integers(min_value=100, max_value=599)),
        headers=tuple(
            draw(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=4))
        ),
        chunks=tuple(chunks),
        offsets=tuple(offsets),
        streamed=draw(st.booleans()),
        created_at=draw(st.floats(min_value=0, max_value=4e9)),
        expires_at=draw(st.one_of(st.floats(min_value=0, max_value=4e9), st.just(math.inf))),
        model=draw(st.one_of(st.none(), st.text(max_size=30))),
        usage=draw(
            st.one_of(
                st.none(),
                st.dictionaries(st.text(max_size=20), st.integers(0, 2**70), max_size=4),
            )
        ),
    )


def with_checksum(payload: bytes, version: int = ENTRY_FORMAT_VERSION) -> bytes:
    """A value whose header vouches for ``payload``, however malformed the payload is."""
    return struct.pack(">4sBII", b"TPXE", version, len(payload), zlib.crc32(payload)) + payload


def test_a_stream_round_trips_field_for_field() -> None:
    entry = sample_stream()
    assert decode_entry(encode_entry(entry)) == entry


def test_a_whole_body_without_model_or_expiry_round_trips() -> None:
    entry = StoredEntry(200, (), (b'{"object":"list"}',), (0.01,), False, 5.0, math.inf)
    decoded = decode_entry(encode_entry(entry))
    assert decoded == entry
    assert decoded.model is None
    assert decoded.expires_at == math.inf


def test_an_empty_model_name_is_kept_apart_from_no_model() -> None:
    entry = StoredEntry(200, (), (), (), False, 1.0, 2.0, model="")
    assert decode_entry(encode_entry(entry)).model == ""


def test_the_usage_counts_round_trip_and_older_entries_have_none() -> None:
    counts = {"prompt_tokens": 12, "completion_tokens": 200, "total_tokens": 212}
    entry = dataclasses.replace(sample_stream(), usage=counts)
    assert decode_entry(encode_entry(entry)).usage == counts
    assert decode_entry(encode_entry(sample_stream())).usage is None


@pytest.mark.parametrize(
    "usage", [b"not json", b"[1]", b'{"prompt_tokens":-1}', b'{"a":true}', b'{"a":1.5}']
)
def test_usage_that_is_not_an_object_of_counts_is_corrupt(usage: bytes) -> None:
    flags = 4  # USAGE
    payload = (
        struct.pack(">HBddH", 200, flags, 1.0, 2.0, 0)
        + struct.pack(">H", len(usage))
        + usage
        + struct.pack(">H", 0)
        + struct.pack(">I", 0)
    )
    with pytest.raises(CorruptEntry, match="usage"):
        decode_entry(with_checksum(payload))


def test_usage_that_is_not_counts_is_refused_at_encoding() -> None:
    entry = dataclasses.replace(sample_stream(), usage={"prompt_tokens": True})
    with pytest.raises(ValueError, match="usage"):
        encode_entry(entry)


def test_body_size_adds_up_the_chunks() -> None:
    assert sample_stream().body_size == sum(len(chunk) for chunk in sample_stream().chunks)


def test_each_chunk_needs_an_offset() -> None:
    with pytest.raises(ValueError, match="offsets"):
        StoredEntry(200, (), (b"a", b"b"), (0.0,), True, 1.0, 2.0)


def test_a_model_name_too_long_for_its_length_prefix_is_refused() -> None:
    entry = StoredEntry(200, (), (), (), False, 1.0, 2.0, model="m" * 70_000)
    with pytest.raises(ValueError, match="model name"):
        encode_entry(entry)


@given(entries())
@settings(max_examples=200)
def test_any_entry_round_trips(entry: StoredEntry) -> None:
    assert decode_entry(encode_entry(entry)) == entry


@given(entries())
@settings(max_examples=40)
def test_every_truncation_is_detected(entry: StoredEntry) -> None:
    encoded = encode_entry(entry)
    for length in range(len(encoded)):
        with pytest.raises(CorruptEntry):
            decode_entry(encoded[:length])


@given(entries(), st.data())
@settings(max_examples=150)
def test_a_changed_byte_anywhere_is_detected(entry: StoredEntry, data: st.DataObject) -> None:
    encoded = bytearray(encode_entry(entry))
    position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(CorruptEntry):
        decode_entry(bytes(encoded))


def test_every_byte_of_a_stream_entry_is_covered_by_a_check() -> None:
    encoded = encode_entry(sample_stream())
    for position in range(len(encoded)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(encoded)
            damaged[position] ^= flip
            with pytest.raises(CorruptEntry):
                decode_entry(bytes(damaged))


def test_an_appended_byte_is_detected() -> None:
    with pytest.raises(CorruptEntry, match="payload"):
        decode_entry(encode_entry(sample_stream()) + b"\0")


def test_another_format_version_is_refused_by_name() -> None:
    payload = encode_entry(sample_stream())[HEADER_SIZE:]
    with pytest.raises(CorruptEntry, match=f"version 2, expected {ENTRY_FORMAT_VERSION}"):
        decode_entry(with_checksum(payload, version=2))


def test_a_foreign_value_is_refused() -> None:
    with pytest.raises(CorruptEntry, match="magic"):
        decode_entry(b'{"not": "an entry"}')


def test_unknown_flags_are_refused_even_with_a_good_checksum() -> None:
    payload = bytearray(encode_entry(sample_stream())[HEADER_SIZE:])
    payload[2] |= 0x80  # the flags byte follows the u16 status
    with pytest.raises(CorruptEntry, match="flags"):
        decode_entry(with_checksum(bytes(payload)))


def test_a_model_that_is_not_utf8_is_refused() -> None:
    entry = StoredEntry(200, (), (), (), False, 1.0, 2.0, model="é")
    payload = bytearray(encode_entry(entry)[HEADER_SIZE:])
    model_at = payload.index("é".encode())
    payload[model_at] = 0xFF
    with pytest.raises(CorruptEntry, match="UTF-8"):
        decode_entry(with_checksum(bytes(payload)))


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_malformed_payloads_with_valid_checksums_raise_only_corrupt_entry(payload: bytes) -> None:
    try:
        entry = decode_entry(with_checksum(payload))
    except CorruptEntry:
        return
    assert encode_entry(entry) == with_checksum(payload)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_arbitrary_bytes_raise_only_corrupt_entry(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_entry(data)


def test_model_bytes_without_the_model_flag_are_refused() -> None:
    payload = bytearray(encode_entry(sample_stream())[HEADER_SIZE:])
    payload[2] &= ~0x02  # clear the model flag, keep the model's bytes
    with pytest.raises(CorruptEntry, match="model flag"):
        decode_entry(with_checksum(bytes(payload)))


def test_bytes_after_the_last_chunk_are_refused_even_with_a_good_checksum() -> None:
    payload = encode_entry(sample_stream())[HEADER_SIZE:] + b"extra"
    with pytest.raises(CorruptEntry, match="trailing"):
        decode_entry(with_checksum(payload))
