"""Cache keys and cacheability: one request, one key; different answers, different keys."""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tproxy.core import cachekey
from tproxy.core.body import CANONICAL_BODY_LIMIT, RequestBody, canonical_json
from tproxy.core.cachekey import (
    KEY_VERSION,
    CacheDecision,
    RequestCacheControl,
    Verdict,
    cache_key,
    decide,
    parse_cache_control,
    response_store_refusal,
    tenant_namespace,
)

CHAT = "/v1/chat/completions"
PATHS = frozenset({CHAT, "/v1/embeddings", "/v1/models"})
REQUEST: dict[str, Any] = {
    "model": "llama-3-8b",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ],
    "temperature": 0,
    "seed": 7,
    "max_tokens": 16,
    "stream": False,
}
HEX = re.compile(r"[0-9a-f]+")


def body_of(request: Any, **dumps: Any) -> bytes:
    return json.dumps(request, **dumps).encode()


def decide_for(
    *,
    body: bytes | None = None,
    method: str = "POST",
    path: str = CHAT,
    query: str = "",
    route: str = "local",
    headers: list[tuple[bytes, bytes]] | None = None,
    enabled: bool = True,
    ignore_fields: tuple[str, ...] = ("user",),
    shared: bool = False,
    tenant: str | None = None,
) -> CacheDecision:
    """The decision for a request; ``tenant`` defaults to the hash of ``headers``' credential."""
    headers = headers if headers is not None else [(b"authorization", b"Bearer sk-alice")]
    data = body_of(REQUEST) if body is None else body
    return decide(
        enabled=enabled,
        method=method,
        route=route,
        path=path,
        query=query,
        cacheable_paths=PATHS,
        headers=headers,
        body=RequestBody(path, data, ignore_fields),
        tenant=tenant_namespace(headers, shared=False) if tenant is None else tenant,
        shared=shared,
    )


def key_of(request: Any, **options: Any) -> str | None:
    return decide_for(body=body_of(request), **options).key


# --- canonical_json -------------------------------------------------------------------------


def test_the_canonical_form_is_sorted_compact_utf8() -> None:
    body = '{ "b": [1, {"z": 1, "a": "é"}], "a": null }'.encode()
    assert canonical_json(body) == '{"a":null,"b":[1,{"a":"é","z":1}]}'.encode()


def test_one_request_written_differently_has_one_canonical_form() -> None:
    compact = body_of(REQUEST, separators=(",", ":"))
    pretty = body_of(dict(reversed(REQUEST.items())), indent=4)
    escaped = body_of(REQUEST, ensure_ascii=True).replace(b"Name", b"\\u004eame")
    assert canonical_json(compact) == canonical_json(pretty) == canonical_json(escaped)
    assert key_of(REQUEST) == decide_for(body=pretty).key == decide_for(body=escaped).key


def test_unicode_escapes_and_raw_utf8_are_the_same_text() -> None:
    assert canonical_json(b'"h\\u00e9llo \\ud83d\\ude00"') == '"héllo 😀"'.encode()


def test_float_spellings_agree_but_an_integer_is_not_a_float() -> None:
    assert canonical_json(b"1.0") == canonical_json(b"1.00") == canonical_json(b"1e0") == b"1.0"
    assert canonical_json(b"1") == b"1"


def test_a_lone_surrogate_escape_is_kept_as_the_same_escape() -> None:
    canonical = canonical_json(b'{"content": "x\\ud800"}')
    assert canonical == b'{"content":"x\\ud800"}'
    assert canonical_json(canonical) == canonical


def test_ignore_fields_removes_top_level_members() -> None:
    with_user = body_of({**REQUEST, "user": "alice"})
    assert canonical_json(with_user, ["user"]) == canonical_json(body_of(REQUEST))
    assert key_of({**REQUEST, "user": "alice"}) == key_of({**REQUEST, "user": "bob"})


def test_ignore_fields_never_reach_below_the_top_level() -> None:
    nested = {**REQUEST, "metadata": {"user": "alice"}}
    other = {**REQUEST, "metadata": {"user": "bob"}}
    assert canonical_json(body_of(nested), ["user"]) != canonical_json(body_of(other), ["user"])
    assert key_of(nested) != key_of(other)


def test_ignore_fields_leave_a_top_level_array_alone() -> None:
    assert canonical_json(b'["user", {"user": 1}]', ["user"]) == b'["user",{"user":1}]'


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"model": ', id="truncated"),
        pytest.param(b'{"model": "a"} x', id="trailing-garbage"),
        pytest.param(b'{"content": "\xff"}', id="invalid-utf8"),
        pytest.param('{"a": 1}'.encode("utf-16"), id="utf16"),
        pytest.param(b'\xef\xbb\xbf{"a": 1}', id="utf8-bom"),
        pytest.param(b'{"temperature": NaN}', id="nan"),
        pytest.param(b'{"temperature": Infinity}', id="infinity"),
        pytest.param(b"[-Infinity]", id="minus-infinity"),
        pytest.param(b"1e400", id="overflows-to-infinity"),
        pytest.param(b"9" * 5000, id="integer-too-long"),
        pytest.param(b'{"model": "a", "model": "b"}', id="duplicate-name"),
        pytest.param(b"[" * 65 + b"]" * 65, id="65-levels"),
        pytest.param(b'{"a":' * 65 + b"1" + b"}" * 65, id="65-object-levels"),
        pytest.param(b"[" * 100_000, id="far-too-deep"),
    ],
)
def test_a_body_without_one_reading_has_no_canonical_form(body: bytes) -> None:
    assert canonical_json(body) is None


def test_64_levels_of_nesting_are_allowed() -> None:
    assert canonical_json(b"[" * 64 + b"]" * 64) == b"[" * 64 + b"]" * 64
    assert canonical_json(b'{"a":' * 64 + b"1" + b"}" * 64) is not None


# --- hypothesis: canonical_json -------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
json_looking_bytes = st.text(alphabet='{}[]",:.eE+-0123456789 \\u\ud800nulltruefalseNaInfity').map(
    lambda text: text.encode("utf-8", "surrogatepass")
)


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        names = list(value)
        rng.shuffle(names)
        return {name: shuffled(value[name], rng) for name in names}
    if isinstance(value, list):
        return [shuffled(item, rng) for item in value]
    return value


@settings(max_examples=300)
@given(json_values, st.booleans(), st.sampled_from([None, 1, "\t"]))
def test_canonical_json_is_idempotent(value: Any, ascii_only: bool, indent: int | str) -> None:
    canonical = canonical_json(json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode())
    assert canonical is not None
    assert canonical_json(canonical) == canonical


@settings(max_examples=300)
@given(json_values, st.randoms(use_true_random=False))
def test_canonical_json_ignores_the_order_of_object_members(value: Any, rng: random.Random) -> None:
    original = json.dumps(value).encode()
    reordered = json.dumps(shuffled(value, rng), indent=2).encode()
    assert canonical_json(original) == canonical_json(reordered)
    assert canonical_json(original, ["a"]) == canonical_json(reordered, ["a"])


@settings(max_examples=300)
@given(st.binary() | json_looking_bytes, st.lists(st.text(max_size=3), max_size=2))
def test_canonical_json_never_raises_and_its_output_is_a_fixed_point(
    body: bytes, ignore: list[str]
) -> None:
    canonical = canonical_json(body, ignore)
    if canonical is not None:
        assert canonical_json(canonical, ignore) == canonical


# --- what the key covers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"model": "llama-3-70b"}, id="model"),
        pytest.param({"messages": REQUEST["messages"][:1]}, id="fewer-messages"),
        pytest.param(
            {"messages": [REQUEST["messages"][0], {"role": "user", "content": "Name a fruit."}]},
            id="message-content",
        ),
        pytest.param(
            {
                "messages": [
                    REQUEST["messages"][0],
                    {"role": "assistant", "content": "Name a colour."},
                ]
            },
            id="message-role",
        ),
        pytest.param({"temperature": 0.7}, id="temperature"),
        pytest.param({"temperature": 0.0}, id="temperature-as-float"),
        pytest.param({"seed": 8}, id="seed"),
        pytest.param({"max_tokens": 17}, id="max-tokens"),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            id="tools",
        ),
        pytest.param({"top_k": 40}, id="provider-extra-top-k"),
        pytest.param({"chat_template_kwargs": {"enable_thinking": False}}, id="provider-extra"),
        pytest.param({"stream_options": {"include_usage": True}}, id="stream-options"),
        pytest.param({"stream": True}, id="stream"),
        pytest.param({"n": 2}, id="n"),
    ],
)
def test_any_change_that_can_change_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert key_of({**REQUEST, **change}) != key_of(REQUEST)


def test_streamed_and_whole_answers_have_different_keys() -> None:
    streamed = decide_for(body=body_of({**REQUEST, "stream": True}))
    whole = decide_for(body=body_of({**REQUEST, "stream": False}))
    assert streamed.streamed
    assert not whole.streamed
    assert streamed.key != whole.key


def test_the_key_covers_route_path_query_and_namespace() -> None:
    base = decide_for().key
    assert decide_for(route="other-upstream").key != base
    assert decide_for(path="/v1/embeddings").key != base
    assert decide_for(query="api-version=2024-06-01").key != base
    assert decide_for(headers=[(b"authorization", b"Bearer sk-bob")]).key != base
    assert decide_for(query="").key == base


def test_the_key_is_the_documented_tuple() -> None:
    decision = decide_for(query="a=1", headers=[(b"api-key", b"k")])
    namespace = tenant_namespace([(b"api-key", b"k")], shared=False)
    canonical = canonical_json(body_of(REQUEST), ["user"])
    assert canonical is not None
    assert decision.key == cache_key("POST", "local", f"{CHAT}?a=1", namespace, canonical)


def test_a_key_is_64_hex_digits_and_the_method_is_case_insensitive() -> None:
    key = cache_key("post", "local", CHAT, "anonymous", b"{}")
    assert HEX.fullmatch(key)
    assert len(key) == 64
    assert key == cache_key("POST", "local", CHAT, "anonymous", b"{}")
    assert key != cache_key("GET", "local", CHAT, "anonymous", b"{}")


def test_raising_key_version_retires_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert KEY_VERSION == 1
    before = cache_key("POST", "local", CHAT, "anonymous", b"{}")
    monkeypatch.setattr(cachekey, "KEY_VERSION", KEY_VERSION + 1)
    assert cache_key("POST", "local", CHAT, "anonymous", b"{}") != before


def test_moving_bytes_across_a_field_boundary_changes_the_key() -> None:
    assert cache_key("POST", "ab", "/c", "n", b"") != cache_key("POST", "a", "b/c", "n", b"")
    assert cache_key("POST", "r", "/t", "ns", b"{}") != cache_key("POST", "r", "/t", "n", b"s{}")


key_text = st.text(alphabet='AB?/=:{}"1 \x00\u00e9\ud800', max_size=6)


@settings(max_examples=500)
@given(st.lists(key_text, min_size=5, max_size=5), st.data())
def test_the_same_bytes_cut_into_different_fields_give_different_keys(
    fields: list[str], data: st.DataObject
) -> None:
    joined = "".join(fields)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(joined)), min_size=4, max_size=4)))
    bounds = [0, *cuts, len(joined)]
    recut = [joined[start:end] for start, end in itertools.pairwise(bounds)]

    def key(parts: list[str]) -> str:
        method, route, target, namespace, body = parts
        return cache_key(method, route, target, namespace, body.encode("utf-8", "surrogatepass"))

    assert (key(fields) == key(recut)) == (fields == recut)


tuples = st.tuples(st.text(max_size=8).map(str.upper), st.text(), st.text(), st.text(), st.binary())


@settings(max_examples=300)
@given(tuples, tuples)
def test_different_tuples_give_different_keys(
    first: tuple[str, str, str, str, bytes], second: tuple[str, str, str, str, bytes]
) -> None:
    assume(first[0].upper() == first[0] and second[0].upper() == second[0])
    assert (cache_key(*first) == cache_key(*second)) == (first == second)


# --- tenants --------------------------------------------------------------------------------


def test_two_credentials_get_two_namespaces_and_one_credential_gets_one() -> None:
    alice = tenant_namespace([(b"authorization", b"Bearer sk-alice")], shared=False)
    bob = tenant_namespace([(b"authorization", b"Bearer sk-bob")], shared=False)
    assert alice != bob
    assert alice == tenant_namespace(
        [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-alice")], False
    )
    assert HEX.fullmatch(alice)
    assert len(alice) == 32


def test_the_same_secret_under_another_header_is_another_tenant() -> None:
    namespaces = {
        tenant_namespace([(b"authorization", b"A")], shared=False),
        tenant_namespace([(b"api-key", b"A")], shared=False),
        tenant_namespace([(b"x-api-key", b"A")], shared=False),
        tenant_namespace([(b"authorization", b"A"), (b"api-key", b"A")], shared=False),
    }
    assert len(namespaces) == 4


def test_every_credential_header_counts_in_a_fixed_order() -> None:
    both = [(b"x-api-key", b"K"), (b"authorization", b"Bearer A")]
    assert tenant_namespace(both, False) == tenant_namespace(list(reversed(both)), False)
    assert tenant_namespace(both, False) != tenant_namespace(both[1:], False)


def test_no_credential_is_anonymous() -> None:
    assert tenant_namespace([], shared=False) == "anonymous"
    assert tenant_namespace([(b"authorization", b"  ")], shared=False) == "anonymous"
    assert tenant_namespace([(b"cookie", b"session=1")], shared=False) == "anonymous"


def test_header_names_are_matched_whatever_their_case() -> None:
    lower = tenant_namespace([(b"authorization", b"Bearer A")], shared=False)
    assert tenant_namespace([(b"Authorization", b"Bearer A")], shared=False) == lower


def test_shared_puts_every_client_in_one_namespace() -> None:
    assert tenant_namespace([(b"authorization", b"Bearer sk-alice")], shared=True) == "shared"
    assert tenant_namespace([], shared=True) == "shared"
    alice = decide_for(headers=[(b"authorization", b"Bearer sk-alice")], shared=True)
    bob = decide_for(headers=[(b"authorization", b"Bearer sk-bob")], shared=True)
    assert alice.key == bob.key


def test_the_key_takes_the_tenant_the_caller_hashed() -> None:
    """The credential is hashed once per request, by the caller (the exchange's tenant is the
    same hash): the decision keys under the tenant it is handed, never hashing again."""
    alice = [(b"authorization", b"Bearer sk-alice")]
    bob = [(b"authorization", b"Bearer sk-bob")]
    handed_bob = decide_for(headers=alice, tenant=tenant_namespace(bob, shared=False))
    assert handed_bob.key == decide_for(headers=bob).key != decide_for(headers=alice).key


def test_the_credential_never_appears_in_the_namespace_or_the_decision() -> None:
    secret = "sk-proj-0123456789abcdef"
    headers = [(b"authorization", f"Bearer {secret}".encode())]
    namespace = tenant_namespace(headers, shared=False)
    decision = decide_for(headers=headers)
    assert secret not in namespace
    assert "0123456789abcdef" not in repr(decision)
    assert namespace not in repr(decision)


# --- Cache-Control --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([], RequestCacheControl(), id="absent"),
        pytest.param([b"no-store"], RequestCacheControl(no_store=True), id="no-store"),
        pytest.param([b"no-cache"], RequestCacheControl(no_cache=True), id="no-cache"),
        pytest.param(
            [b"only-if-cached"], RequestCacheControl(only_if_cached=True), id="only-if-cached"
        ),
        pytest.param([b"max-age=60"], RequestCacheControl(max_age=60), id="max-age"),
        pytest.param([b"max-age=0"], RequestCacheControl(max_age=0), id="max-age-zero"),
        pytest.param([b'max-age="60"'], RequestCacheControl(max_age=60), id="max-age-quoted"),
        pytest.param(
            [b"NO-CACHE, Max-Age=5"],
            RequestCacheControl(no_cache=True, max_age=5),
            id="case-insensitive",
        ),
        pytest.param(
            [b"no-cache,only-if-cached , max-age=9"],
            RequestCacheControl(no_cache=True, only_if_cached=True, max_age=9),
            id="one-line-list",
        ),
        pytest.param(
            [b"no-cache", b"max-age=3", b"no-store"],
            RequestCacheControl(no_store=True, no_cache=True, max_age=3),
            id="several-lines",
        ),
        pytest.param([b", ,no-cache,,"], RequestCacheControl(no_cache=True), id="empty-members"),
        pytest.param(
            [b'ext="a, no-store \\" no-cache", only-if-cached'],
            RequestCacheControl(only_if_cached=True),
            id="commas-and-escapes-inside-quotes",
        ),
        pytest.param(
            [b"max-stale=10, min-fresh=5, no-transform, stale-if-error=60, private"],
            RequestCacheControl(),
            id="unknown-directives",
        ),
        pytest.param([b"max-age=-1"], RequestCacheControl(), id="negative-max-age"),
        pytest.param([b"max-age=1.5"], RequestCacheControl(), id="fractional-max-age"),
        pytest.param([b"max-age=soon"], RequestCacheControl(), id="word-max-age"),
        pytest.param([b"max-age"], RequestCacheControl(), id="max-age-without-value"),
        pytest.param([b"max-age="], RequestCacheControl(), id="max-age-empty"),
        pytest.param([b'max-age="5'], RequestCacheControl(), id="max-age-unterminated"),
        pytest.param([b"max-age=\xd9\xa3"], RequestCacheControl(), id="non-ascii-digit"),
        pytest.param([b"max-age=7, max-age=3"], RequestCacheControl(max_age=7), id="first-wins"),
        pytest.param([b"max-age=x, max-age=3"], RequestCacheControl(max_age=3), id="first-valid"),
        pytest.param(
            [b"max-age=99999999999"], RequestCacheControl(max_age=2**31), id="huge-is-2**31"
        ),
        pytest.param([b"max-age=" + b"9" * 5000], RequestCacheControl(max_age=2**31), id="5000"),
        pytest.param([b"no-cache=foo"], RequestCacheControl(no_cache=True), id="argument-ignored"),
        pytest.param(
            [b"no-cache junk, no-store"],
            RequestCacheControl(no_store=True),
            id="malformed-member-skipped",
        ),
    ],
)
def test_cache_control_request_directives(
    values: list[bytes], expected: RequestCacheControl
) -> None:
    assert parse_cache_control(values) == expected


def test_pragma_no_cache_is_not_cache_control() -> None:
    decision = decide_for(headers=[(b"pragma", b"no-cache")])
    assert decision.verdict is Verdict.CACHEABLE
    assert decision.lookup


@settings(max_examples=300)
@given(st.lists(st.binary() | st.text(alphabet='max-age=no-cache,"\\ \t5').map(str.encode)))
def test_parse_cache_control_never_raises(values: list[bytes]) -> None:
    assert isinstance(parse_cache_control(values), RequestCacheControl)


# --- response Cache-Control ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "refusal"),
    [
        ([b"no-store"], "no-store"),
        ([b"No-Store"], "no-store"),
        ([b"private"], "private"),
        ([b'private="Set-Cookie, X-Trace"'], "private"),
        ([b"max-age=0", b"must-revalidate, no-store"], "no-store"),
        ([b'no-cache="x, private"'], None),  # inside a quoted argument: not a directive
        ([b"public, max-age=600"], None),
        ([b"no-cache"], None),
        ([b"s-maxage=0"], None),
        ([], None),
    ],
)
def test_a_shared_cache_refuses_what_the_upstream_marks_no_store_or_private(
    lines: list[bytes], refusal: str | None
) -> None:
    headers = [(b"Cache-Control", line) for line in lines]
    expected = None if refusal is None else f"upstream Cache-Control: {refusal}"
    assert response_store_refusal([(b"Content-Type", b"application/json"), *headers]) == expected


def test_no_store_in_another_header_is_not_cache_control() -> None:
    assert response_store_refusal([(b"x-cache-control", b"no-store")]) is None


@settings(max_examples=300)
@given(st.lists(st.binary() | st.text(alphabet='no-store,private="\\ \t').map(str.encode)))
def test_response_store_refusal_never_raises(values: list[bytes]) -> None:
    refusal = response_store_refusal([(b"cache-control", value) for value in values])
    assert refusal in (None, "upstream Cache-Control: no-store", "upstream Cache-Control: private")


# --- verdicts and decisions -----------------------------------------------------------------

VERDICT_CASES: dict[Verdict, dict[str, Any]] = {
    Verdict.CACHEABLE: {},
    Verdict.DISABLED: {"enabled": False},
    Verdict.METHOD: {"method": "PUT"},
    Verdict.PATH: {"path": "/v1/completions"},
    Verdict.NO_STORE: {"headers": [(b"cache-control", b"no-store")]},
    Verdict.NOT_JSON: {"body": b"model=llama"},
}


def test_every_verdict_has_a_case() -> None:
    assert set(VERDICT_CASES) == set(Verdict)


@pytest.mark.parametrize("verdict", list(Verdict), ids=lambda verdict: verdict.value)
def test_each_verdict_and_a_key_only_when_cacheable(verdict: Verdict) -> None:
    decision = decide_for(**VERDICT_CASES[verdict])
    assert decision.verdict is verdict
    assert (decision.key is not None) == (verdict is Verdict.CACHEABLE)
    assert decision.store == (verdict is Verdict.CACHEABLE)


def test_verdict_values_are_short_tokens_for_logs_and_cache_status() -> None:
    assert [verdict.value for verdict in Verdict] == [
        "cacheable",
        "disabled",
        "method",
        "path",
        "no-store",
        "not-json",
    ]


def test_a_cacheable_request_may_be_looked_up_and_stored() -> None:
    decision = decide_for()
    assert decision == CacheDecision(
        verdict=Verdict.CACHEABLE,
        key=decision.key,
        lookup=True,
        store=True,
        max_age=None,
        only_if_cached=False,
        streamed=False,
        model="llama-3-8b",
    )


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_only_post_and_get_are_cacheable(method: str) -> None:
    assert decide_for(method=method).verdict is Verdict.METHOD


def test_the_method_is_matched_whatever_its_case() -> None:
    assert decide_for(method="post").key == decide_for(method="POST").key


@pytest.mark.parametrize("path", [f"{CHAT}/", f"{CHAT}/x", "/v1/chat", "/V1/chat/completions"])
def test_a_path_must_match_exactly(path: str) -> None:
    assert decide_for(path=path).verdict is Verdict.PATH


def test_a_get_with_an_empty_body_is_keyed_on_its_target() -> None:
    first = decide_for(method="GET", path="/v1/models", body=b"")
    assert first.verdict is Verdict.CACHEABLE
    assert first.key == cache_key("GET", "local", "/v1/models", first_namespace(), b"")
    assert first.model is None
    assert not first.streamed
    assert decide_for(method="GET", path="/v1/models", query="page=2", body=b"").key != first.key
    assert decide_for(method="GET", path="/v1/files", body=b"").verdict is Verdict.PATH


def first_namespace() -> str:
    return tenant_namespace([(b"authorization", b"Bearer sk-alice")], shared=False)


def test_a_get_with_a_body_needs_json_like_a_post() -> None:
    assert decide_for(method="GET", body=body_of(REQUEST)).verdict is Verdict.CACHEABLE
    assert decide_for(method="GET", body=b"hello").verdict is Verdict.NOT_JSON


def test_a_post_with_an_empty_body_is_not_json() -> None:
    assert decide_for(body=b"").verdict is Verdict.NOT_JSON


def test_any_json_body_is_cacheable_but_model_and_stream_come_from_an_object() -> None:
    array = decide_for(body=b'[{"model": "a", "stream": true}]')
    assert array.verdict is Verdict.CACHEABLE
    assert array.model is None
    assert not array.streamed
    odd = decide_for(body=b'{"model": 3, "stream": "yes"}')
    assert odd.model is None
    assert not odd.streamed


def test_a_model_in_ignore_fields_still_names_the_model() -> None:
    decision = decide_for(ignore_fields=("model",))
    assert decision.model == "llama-3-8b"
    assert (
        decision.key
        == decide_for(body=body_of({**REQUEST, "model": "x"}), ignore_fields=("model",)).key
    )


def padded(spacing: str, *, user: str = "alice") -> bytes:
    """One request over CANONICAL_BODY_LIMIT, written with the given spacing."""
    request = {**REQUEST, "user": user, "padding": "x" * CANONICAL_BODY_LIMIT}
    return json.dumps(request, separators=(",", spacing)).encode()


def test_a_body_over_the_limit_is_keyed_by_its_bytes_and_never_parsed() -> None:
    body = padded(":")
    decision = decide_for(body=body)
    assert decision.verdict is Verdict.CACHEABLE
    assert decision.key == cache_key("POST", "local", CHAT, first_namespace(), body, raw_body=True)
    assert decision.key == decide_for(body=padded(":")).key
    # Written differently, or differing only in an ignored field: another key, never a wrong hit.
    assert decision.key != decide_for(body=padded(": ")).key
    assert decision.key != decide_for(body=padded(":", user="bob")).key
    assert (decision.model, decision.streamed) == (None, False)  # not read from the bytes
    # Bytes no JSON parser reads one way are still one request, byte for byte.
    assert decide_for(body=body + b"{").verdict is Verdict.CACHEABLE


def test_a_body_at_the_limit_is_still_canonicalized() -> None:
    body = body_of(REQUEST)
    at_limit = body[:-1] + b" " * (CANONICAL_BODY_LIMIT - len(body)) + b"}"
    assert len(at_limit) == CANONICAL_BODY_LIMIT
    assert decide_for(body=at_limit).key == decide_for(body=body).key


def test_raw_and_canonical_bodies_never_share_a_key() -> None:
    canonical = canonical_json(body_of(REQUEST))
    assert canonical is not None
    assert cache_key("POST", "r", CHAT, "ns", canonical) != cache_key(
        "POST", "r", CHAT, "ns", canonical, raw_body=True
    )


def test_checks_run_in_order_and_the_first_refusal_wins() -> None:
    everything_wrong: dict[str, Any] = {
        "method": "PUT",
        "path": "/nope",
        "headers": [(b"cache-control", b"no-store")],
        "body": b"not json",
    }
    assert decide_for(enabled=False, **everything_wrong).verdict is Verdict.DISABLED
    assert decide_for(**everything_wrong).verdict is Verdict.METHOD
    del everything_wrong["method"]
    assert decide_for(**everything_wrong).verdict is Verdict.PATH
    del everything_wrong["path"]
    assert decide_for(**everything_wrong).verdict is Verdict.NO_STORE
    del everything_wrong["headers"]
    assert decide_for(**everything_wrong).verdict is Verdict.NOT_JSON


def test_no_cache_skips_the_lookup_but_stores_the_fresh_answer() -> None:
    decision = decide_for(headers=[(b"cache-control", b"no-cache")])
    assert decision.verdict is Verdict.CACHEABLE
    assert not decision.lookup
    assert decision.store
    assert decision.key == decide_for(headers=[]).key


def test_max_age_and_only_if_cached_are_passed_on() -> None:
    headers = [(b"Cache-Control", b"max-age=30"), (b"cache-control", b"only-if-cached")]
    decision = decide_for(headers=headers)
    assert decision.verdict is Verdict.CACHEABLE
    assert decision.lookup
    assert decision.only_if_cached
    assert decision.max_age == 30


def test_max_age_and_only_if_cached_are_reported_even_when_not_cacheable() -> None:
    headers = [(b"cache-control", b"no-store, only-if-cached, max-age=1")]
    decision = decide_for(headers=headers)
    assert decision.verdict is Verdict.NO_STORE
    assert decision.only_if_cached
    assert decision.max_age == 1
    assert not decision.lookup
    assert not decision.store


def test_decide_reads_headers_given_as_a_one_shot_iterator() -> None:
    listed = decide_for(headers=[(b"cache-control", b"no-cache"), (b"api-key", b"k")])
    once = decide(
        enabled=True,
        method="POST",
        route="local",
        path=CHAT,
        query="",
        cacheable_paths=PATHS,
        headers=iter([(b"cache-control", b"no-cache"), (b"api-key", b"k")]),
        body=RequestBody(CHAT, body_of(REQUEST), ("user",)),
        tenant=tenant_namespace([(b"api-key", b"k")], shared=False),
        shared=False,
    )
    assert once == listed
