"""``BodyMemo``: a repeated body is not parsed again (tests/test_body.py counts the parses), and
the decision does not change.

The memo is an optimisation only: every decision taken with it must equal the one taken without
it, for any sequence of bodies (repeats, evictions, bodies with no canonical form, paths whose
API families stream by default or not). Its memory stays under its bound.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tproxy.core import body as request_body
from tproxy.core.body import BodyMemo, RequestBody
from tproxy.core.cachekey import CacheDecision, decide

PATHS = ("/v1/chat/completions", "/api/chat", "/v1/embeddings")
IGNORED = ("user",)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["model", "stream", "user", "a", "é"]), children, max_size=4
        )
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"model": st.text(max_size=4) | st.integers()},
    optional={"stream": st.booleans() | st.none(), "user": st.text(max_size=4), "x": json_values},
)
bodies = st.one_of(
    requests.map(lambda value: json.dumps(value).encode()),
    requests.map(lambda value: json.dumps(value, indent=1, sort_keys=True).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=24),  # mostly not JSON at all
)


def decision(path: str, body: bytes, memo: BodyMemo | None) -> CacheDecision:
    return decide(
        enabled=True,
        method="POST",
        route="r",
        path=path,
        query="",
        cacheable_paths=frozenset(PATHS),
        headers=[(b"authorization", b"Bearer k")],
        body=RequestBody(path, body, IGNORED, memo),
        tenant="k",
        shared=False,
    )


@given(st.lists(st.tuples(st.sampled_from(PATHS), bodies), max_size=30), st.integers(0, 400))
def test_a_decision_is_the_same_with_and_without_the_memo(
    requests_sent: list[tuple[str, bytes]], max_bytes: int
) -> None:
    memo = BodyMemo(max_bytes=max_bytes, max_body_bytes=64)  # small: evictions and skips happen
    for path, body in requests_sent * 2:  # every request again: the second time from the memo
        assert decision(path, body, memo) == decision(path, body, None)
        assert memo.bytes_held <= max_bytes


def test_the_least_recently_used_body_leaves_first_and_the_bound_holds() -> None:
    def body(n: int) -> bytes:
        return b'{"model": "m%03d"}' % n

    canonical = request_body.canonical_json(body(0))
    assert canonical is not None
    each = len(body(0)) + len(canonical)
    memo = BodyMemo(max_bytes=each * 3, max_body_bytes=64)  # room for three
    for n in range(3):
        memo.facts(PATHS[0], body(n), IGNORED)
    memo.facts(PATHS[0], body(0), IGNORED)  # used again: now the newest
    memo.facts(PATHS[0], body(3), IGNORED)  # evicts body(1), the oldest
    assert (len(memo), memo.bytes_held) == (3, each * 3)
    kept = {key[2] for key in memo._entries}
    assert kept == {body(0), body(2), body(3)}


def test_a_body_over_the_size_limit_is_not_kept() -> None:
    memo = BodyMemo(max_body_bytes=16)
    facts = memo.facts(PATHS[0], b'{"model": "a longer name"}', IGNORED)
    assert facts is not None
    assert facts.model == "a longer name"
    assert (len(memo), memo.bytes_held) == (0, 0)
