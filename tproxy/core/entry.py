"""What a cached answer is, and how it is laid out as bytes.

A :class:`StoredEntry` holds what replaying an answer needs: the status, the few response headers
worth repeating, and the upstream's exact bytes — one chunk per SSE frame for a stream, one chunk
for a whole body — with the time each chunk arrived, for a later paced replay. It also keeps the
answer's ``usage`` counts, read once when the answer was stored, so that a replay can say what
it saved without parsing the body again (a JSON body of embeddings costs ~1 ms per 30 KB).

The encoding is compact and self-checking, because a store may hand back a value that a killed
writer or a bad disk left torn. Every value starts with a fixed header::

    magic  b"TPXE"        4 bytes
    format version         u8   (ENTRY_FORMAT_VERSION)
    payload length         u32
    crc32 of the payload   u32

and the payload that follows is, big-endian throughout::

    status u16 | flags u8 | created_at f64 | expires_at f64
    model length u16 | model (UTF-8, present when flags has MODEL)
    usage length u16 | usage (present when flags has USAGE: a compact JSON object of
                              non-negative integers, e.g. {"prompt_tokens":12,...})
    header count u16 | per header: name length u16, value length u32
                     | the header names and values, in that order
    chunk count u32  | chunk lengths u32 * n | offsets f64 * n | the chunks, concatenated

Entries written before USAGE existed simply lack the flag. Decoding checks the magic, the version,
the length and the checksum before reading a field, then checks that every length stays inside
the payload and that nothing is left over. Whatever is
wrong, :func:`decode_entry` raises :class:`CorruptEntry` and nothing else, so a store can treat
any undecodable value as a miss.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate, pairwise
from types import MappingProxyType
from typing import Any

from tproxy.core.errors import CorruptEntry

ENTRY_FORMAT_VERSION = 1

_MAGIC = b"TPXE"
_HEADER = struct.Struct(">4sBII")
_FIXED = struct.Struct(">HBddH")
_COUNT16 = struct.Struct(">H")
_COUNT32 = struct.Struct(">I")
_HEADER_LENGTHS = struct.Struct(">HI")
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFFFFFF


# Bits of the flags byte (plain ints: this is the hot path of every cache hit).
_STREAMED = 1
_HAS_MODEL = 2
_HAS_USAGE = 4


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One complete upstream answer, as the cache keeps and replays it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    chunks: tuple[bytes, ...]
    offsets: tuple[float, ...]
    streamed: bool
    created_at: float
    expires_at: float
    model: str | None = None
    usage: Mapping[str, int] | None = None  # the answer's top-level usage counts, if it had any

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.chunks):
            raise ValueError(
                f"{len(self.chunks)} chunks but {len(self.offsets)} offsets: one offset per chunk"
            )

    @property
    def body_size(self) -> int:
        """The number of body bytes a replay sends."""
        return sum(len(chunk) for chunk in self.chunks)


def encode_entry(entry: StoredEntry) -> bytes:
    """Serialize ``entry``; raises ValueError if a field cannot fit its length prefix."""
    flags = _STREAMED if entry.streamed else 0
    model = b""
    if entry.model is not None:
        flags |= _HAS_MODEL
        model = entry.model.encode()
    _check_fits(len(model), _MAX_U16, "model name")
    usage = b""
    if entry.usage is not None:
        flags |= _HAS_USAGE
        usage = _encode_usage(entry.usage)
        _check_fits(len(usage), _MAX_U16, "usage")
    _check_fits(len(entry.headers), _MAX_U16, "header count")
    _check_fits(len(entry.chunks), _MAX_U32, "chunk count")
    parts = [
        _FIXED.pack(entry.status, flags, entry.created_at, entry.expires_at, len(model)),
        model,
        *((_COUNT16.pack(len(usage)), usage) if entry.usage is not None else ()),
        _COUNT16.pack(len(entry.headers)),
    ]
    for name, value in entry.headers:
        _check_fits(len(name), _MAX_U16, "header name")
        _check_fits(len(value), _MAX_U32, "header value")
        parts.append(_HEADER_LENGTHS.pack(len(name), len(value)))
    for name, value in entry.headers:
        parts += (name, value)
    count = len(entry.chunks)
    lengths = [len(chunk) for chunk in entry.chunks]
    for length in lengths:
        _check_fits(length, _MAX_U32, "chunk")
    parts += (
        _COUNT32.pack(count),
        struct.pack(f">{count}I", *lengths),
        struct.pack(f">{count}d", *entry.offsets),
        *entry.chunks,
    )
    payload = b"".join(parts)
    _check_fits(len(payload), _MAX_U32, "entry")
    return _HEADER.pack(_MAGIC, ENTRY_FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def decode_entry(data: bytes) -> StoredEntry:
    """Parse what :func:`encode_entry` produced; raises CorruptEntry for anything else."""
    if len(data) < _HEADER.size:
        raise CorruptEntry(f"entry too short for its header ({len(data)} bytes)")
    magic, version, length, checksum = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptEntry("not a tproxy entry (bad magic)")
    if version != ENTRY_FORMAT_VERSION:
        raise CorruptEntry(f"entry format version {version}, expected {ENTRY_FORMAT_VERSION}")
    if len(data) - _HEADER.size != length:
        raise CorruptEntry(
            f"entry payload is {len(data) - _HEADER.size} bytes, its header says {length}"
        )
    if zlib.crc32(memoryview(data)[_HEADER.size :]) != checksum:
        raise CorruptEntry("entry checksum mismatch")
    return _decode_payload(_Reader(data, _HEADER.size))


def _decode_payload(reader: _Reader) -> StoredEntry:
    status, flags, created_at, expires_at, model_length = reader.unpack(_FIXED)
    if flags & ~(_STREAMED | _HAS_MODEL | _HAS_USAGE):
        raise CorruptEntry(f"unknown entry flags {flags:#x}")
    model_bytes = reader.take(model_length)
    if not flags & _HAS_MODEL and model_length:
        raise CorruptEntry("model bytes present without the model flag")
    model = _decode_model(model_bytes) if flags & _HAS_MODEL else None
    usage = None
    if flags & _HAS_USAGE:
        (usage_length,) = reader.unpack(_COUNT16)
        usage = _decode_usage(reader.take(usage_length))
    (header_count,) = reader.unpack(_COUNT16)
    header_lengths = [reader.unpack(_HEADER_LENGTHS) for _ in range(header_count)]
    headers = tuple(
        (reader.take(name_length), reader.take(value_length))
        for name_length, value_length in header_lengths
    )
    (count,) = reader.unpack(_COUNT32)
    lengths = reader.unpack_array("I", count)
    offsets = reader.unpack_array("d", count)
    chunks = reader.take_all(lengths)
    if not reader.at_end():
        raise CorruptEntry("trailing bytes after the last chunk")
    return StoredEntry(
        status=status,
        headers=headers,
        chunks=chunks,
        offsets=offsets,
        streamed=bool(flags & _STREAMED),
        created_at=created_at,
        expires_at=expires_at,
        model=model,
        usage=usage,
    )


def _encode_usage(usage: Mapping[str, int]) -> bytes:
    if not all(
        isinstance(name, str) and type(count) is int and count >= 0 for name, count in usage.items()
    ):
        raise ValueError("usage counts must be non-negative integers named by strings")
    return json.dumps(dict(usage), separators=(",", ":")).encode()


def _decode_usage(raw: bytes) -> Mapping[str, int]:
    """Read-only: a decoded entry may be handed to many requests (``tproxy.store.decoded``)."""
    try:
        usage = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise CorruptEntry("usage is not JSON") from error
    if not isinstance(usage, dict) or not all(
        type(count) is int and count >= 0 for count in usage.values()
    ):
        raise CorruptEntry("usage is not an object of non-negative integers")
    return MappingProxyType(usage)


def _decode_model(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise CorruptEntry("model name is not UTF-8") from error


class _Reader:
    """A cursor over an encoded entry that refuses to read past its end."""

    __slots__ = ("_data", "_position")

    def __init__(self, data: bytes, position: int) -> None:
        self._data = data
        self._position = position

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        self._require(layout.size)
        fields = layout.unpack_from(self._data, self._position)
        self._position += layout.size
        return fields

    def unpack_array(self, code: str, count: int) -> tuple[Any, ...]:
        size = struct.calcsize(code) * count
        self._require(size)
        items = struct.unpack_from(f">{count}{code}", self._data, self._position)
        self._position += size
        return items

    def take(self, length: int) -> bytes:
        self._require(length)
        start = self._position
        self._position += length
        return self._data[start : self._position]

    def take_all(self, lengths: tuple[int, ...]) -> tuple[bytes, ...]:
        """Consecutive fields of the given lengths, checked once: streams have hundreds."""
        bounds = list(accumulate(lengths, initial=self._position))
        self._require(bounds[-1] - self._position)
        self._position = bounds[-1]
        data = self._data
        return tuple(data[start:end] for start, end in pairwise(bounds))

    def at_end(self) -> bool:
        return self._position == len(self._data)

    def _require(self, size: int) -> None:
        if self._position + size > len(self._data):
            raise CorruptEntry("entry payload ends inside a field")


def _check_fits(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise ValueError(f"{what} too large to encode ({size} > {limit})")
