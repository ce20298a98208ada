"""Fuzzing the parsers that read what clients and upstreams send, where tests/test_sse.py and
tests/test_cachekey.py stop: any bytes under any limits for the SSE decoder, and any request
facts for the cache decision. Nothing may escape as an exception; nothing may depend on how the
same request happens to be written.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.body import RequestBody
from tproxy.core.cachekey import CacheDecision, Verdict, decide, tenant_namespace
from tproxy.core.sse import Frame, SSEDecoder

# --- the SSE decoder: any bytes, any chunking, any limits --------------------------------------

limits = st.fixed_dictionaries(
    {"max_line_bytes": st.integers(1, 64), "max_block_bytes": st.integers(1, 256)}
)
# Raw bytes, weighted towards the ones that mean something to the decoder.
stream_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"\xef\xbb\xbf"])
    | st.binary(max_size=40),
    max_size=60,
).map(b"".join)


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


def decode(chunks: list[bytes], options: dict[str, int]) -> tuple[list[Frame], str | None]:
    decoder = SSEDecoder(**options)
    frames: list[Frame] = []
    for chunk in chunks:
        before = decoder.failed
        produced = decoder.feed(chunk)
        if before is not None:
            assert produced == []  # once failed, it stays failed and silent
            assert decoder.failed == before
        frames += produced
    frames += decoder.close()
    return frames, decoder.failed


@settings(max_examples=400)
@given(stream=stream_bytes, options=limits, data=st.data())
def test_any_bytes_under_any_limits_decode_without_raising(
    stream: bytes, options: dict[str, int], data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    frames, failed = decode(cut(stream, cuts), options)
    raw = b"".join(frame.raw for frame in frames)
    assert stream.startswith(raw)  # frames give back the stream's bytes, in order, or a prefix
    if failed is None:
        assert raw == stream
    for frame in frames:
        if frame.event is not None:
            assert frame.raw.endswith((b"\n", b"\r"))


@settings(max_examples=300)
@given(stream=stream_bytes, options=limits, data=st.data())
def test_under_any_limits_chunking_never_changes_the_result(
    stream: bytes, options: dict[str, int], data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert decode(cut(stream, cuts), options) == decode([stream], options)


@settings(max_examples=200)
@given(line=st.integers(1, 64), extra=st.integers(1, 200), chunk=st.integers(1, 17))
def test_a_line_without_end_over_the_limit_always_fails_whatever_the_chunk_size(
    line: int, extra: int, chunk: int
) -> None:
    """The bound that keeps a runaway upstream line from growing the decoder's buffer."""
    stream = b"data: " + b"x" * (line + extra)
    decoder = SSEDecoder(max_line_bytes=line)
    for start in range(0, len(stream), chunk):
        assert decoder.feed(stream[start : start + chunk]) == []
    assert decoder.failed == f"line longer than {line} bytes"
    assert decoder.close() == []


# --- the cache decision: any request facts -----------------------------------------------------

HEX64 = re.compile(r"[0-9a-f]{64}")
CHAT = "/v1/chat/completions"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)
header_names = st.sampled_from(
    [b"authorization", b"Authorization", b"api-key", b"x-api-key", b"cache-control", b"x-other"]
) | st.binary(min_size=1, max_size=12)
headers = st.lists(st.tuples(header_names, st.binary(max_size=24)), max_size=6)
bodies = st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode())


def decide_with(
    *, body: bytes = b"{}", ignore_fields: tuple[str, ...] = ("user",), **facts: Any
) -> CacheDecision:
    """The decision for these request facts; the body and the tenant as the app hands them."""
    arguments: dict[str, Any] = {
        "enabled": True,
        "method": "POST",
        "route": "default",
        "path": CHAT,
        "query": "",
        "cacheable_paths": (CHAT, "/v1/embeddings"),
        "headers": [],
        "shared": False,
    }
    arguments.update(facts)
    arguments["body"] = RequestBody(arguments["path"], body, ignore_fields)
    arguments["tenant"] = tenant_namespace(arguments["headers"], shared=False)
    return decide(**arguments)


@settings(max_examples=400)
@given(
    enabled=st.booleans(),
    method=st.sampled_from(["POST", "GET", "post", "PUT"]) | st.text(max_size=8),
    path=st.sampled_from([CHAT, "/v1/embeddings", "/"]) | st.text(max_size=20),
    query=st.text(max_size=20),
    headers=headers,
    body=bodies,
    ignore=st.lists(st.text(max_size=4), max_size=3),
    shared=st.booleans(),
)
def test_decide_never_raises_and_keeps_its_promises(
    enabled: bool,
    method: str,
    path: str,
    query: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    ignore: list[str],
    shared: bool,
) -> None:
    facts: dict[str, Any] = {
        "enabled": enabled,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body": body,
        "ignore_fields": tuple(ignore),
        "shared": shared,
    }
    decision = decide_with(**facts)
    assert decision == decide_with(**facts)  # a function of the facts alone
    if decision.verdict is Verdict.CACHEABLE:
        assert decision.key is not None
        assert HEX64.fullmatch(decision.key)
    else:
        assert decision.key is None
        assert not decision.lookup
        assert not decision.store
        assert not decision.streamed
        assert decision.model is None


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        names = list(value)
        rng.shuffle(names)
        return {name: shuffled(value[name], rng) for name in names}
    if isinstance(value, list):
        return [shuffled(item, rng) for item in value]
    return value


@settings(max_examples=200)
@given(
    value=st.dictionaries(st.text(max_size=5), json_values, max_size=5),
    credential=st.binary(min_size=1, max_size=20).filter(bytes.strip),
    others=st.lists(st.tuples(st.just(b"x-other"), st.binary(max_size=8)), max_size=3),
    rng=st.randoms(use_true_random=False),
    indent=st.sampled_from([None, 1, "\t"]),
    ascii_only=st.booleans(),
)
def test_one_request_written_any_way_has_one_key(
    value: dict[str, Any],
    credential: bytes,
    others: list[tuple[bytes, bytes]],
    rng: random.Random,
    indent: int | str | None,
    ascii_only: bool,
) -> None:
    """Member order, whitespace, escapes and unrelated headers never change the key."""
    first_headers = [(b"authorization", credential), *others]
    second_headers = [*others, (b"Authorization", credential)]
    rng.shuffle(second_headers)
    first = decide_with(body=json.dumps(value).encode(), headers=first_headers)
    rewritten = json.dumps(shuffled(value, rng), indent=indent, ensure_ascii=ascii_only)
    second = decide_with(body=rewritten.encode(), headers=second_headers)
    assert first.verdict is Verdict.CACHEABLE
    assert first.key == second.key


@settings(max_examples=100)
@given(
    value=st.dictionaries(st.text(max_size=5), json_values, max_size=5),
    credentials=st.lists(
        st.binary(min_size=1, max_size=20).filter(bytes.strip), min_size=2, max_size=2, unique=True
    ),
)
def test_two_credentials_never_share_a_key(value: dict[str, Any], credentials: list[bytes]) -> None:
    body = json.dumps(value).encode()
    keys = {decide_with(body=body, headers=[(b"authorization", c)]).key for c in credentials}
    assert len(keys) == 2
