"""A request body is parsed at most once, whoever asks first: routing (the model) or the cache
decision (canonical bytes, model, stream flag); with a memo, a repeated body not at all.

The parse is counted with a spy on the one function that parses. Routing reads the model as
``json.loads`` reads bytes (what an upstream sees), also where the cache finds no canonical form.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import StartProxy
from tproxy import app
from tproxy.core import body as request_body
from tproxy.core.body import CANONICAL_BODY_LIMIT, BodyMemo, RequestBody
from tproxy.core.cachekey import CacheDecision, Verdict, decide, tenant_namespace

CHAT = "/v1/chat/completions"
IGNORED = ("user",)
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every body parsed while the test runs, in order."""
    seen: list[bytes] = []
    parse = request_body._parse

    def counting(data: bytes) -> Any:
        seen.append(data)
        return parse(data)

    monkeypatch.setattr(request_body, "_parse", counting)
    return seen


def decision(body: RequestBody, method: str = "POST") -> CacheDecision:
    return decide(
        enabled=True,
        method=method,
        route="r",
        path=body.path,
        query="",
        cacheable_paths={CHAT},
        headers=[],
        body=body,
        tenant="anonymous",
        shared=False,
    )


def test_routing_then_the_cache_decision_parse_the_body_once(parsed: list[bytes]) -> None:
    body = RequestBody(CHAT, BODY, IGNORED)
    assert body.model == "m"
    decided = decision(body)
    assert (decided.verdict, decided.model, decided.streamed) == (Verdict.CACHEABLE, "m", True)
    assert parsed == [BODY]


def test_a_repeated_body_is_not_parsed_again_for_routing_or_the_cache(
    parsed: list[bytes],
) -> None:
    memo = BodyMemo()
    first = RequestBody(CHAT, BODY, IGNORED, memo)
    assert first.model == "m"
    decided = decision(first)
    again = RequestBody(CHAT, bytes(bytearray(BODY)), IGNORED, memo)  # equal bytes, new object
    assert again.model == "m"
    assert decision(again) == decided
    assert parsed == [BODY]


def test_a_body_over_the_limit_is_parsed_for_routing_only(parsed: list[bytes]) -> None:
    data = json.dumps({"model": "m", "padding": "x" * CANONICAL_BODY_LIMIT}).encode()
    body = RequestBody(CHAT, data, IGNORED)
    assert body.model == "m"
    decided = decision(body)
    assert decided.verdict is Verdict.CACHEABLE  # keyed by its bytes
    assert (decided.model, len(parsed)) == (None, 1)
    assert decision(RequestBody(CHAT, data, IGNORED)).key == decided.key
    assert len(parsed) == 1  # without routing by model, such a body is never parsed


def test_a_body_that_is_not_an_object_is_not_parsed_for_its_model(parsed: list[bytes]) -> None:
    body = RequestBody(CHAT, b'["model"]')
    assert body.model is None
    assert parsed == []
    assert decision(body).verdict is Verdict.CACHEABLE  # any JSON body may be cached
    assert parsed == [b'["model"]']


def test_a_get_without_a_body_is_never_parsed(parsed: list[bytes]) -> None:
    body = RequestBody(CHAT, b"")
    assert body.model is None
    assert decision(body, method="GET").verdict is Verdict.CACHEABLE
    assert parsed == []


@pytest.mark.parametrize(
    ("data", "model"),
    [
        pytest.param(b'{"model": "a", "model": "b"}', "b", id="duplicate-name: the last one"),
        pytest.param(b'{"model": "m", "t": NaN}', "m", id="nan"),
        pytest.param(b'{"model": "m", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "m", id="65-levels"),
        pytest.param('{"model": "m"}'.encode("utf-16-le"), "m", id="utf-16 without a bom"),
        pytest.param(b'{"model": "m\xed\xa0\x80"}', "m\ud800", id="an encoded surrogate"),
    ],
)
def test_routing_reads_the_model_where_the_cache_finds_no_canonical_form(
    data: bytes, model: str
) -> None:
    body = RequestBody(CHAT, data)
    assert body.model == model
    assert decision(body).verdict is Verdict.NOT_JSON
    assert decision(body).model is None


def model_as_json_loads_reads_it(data: bytes) -> str | None:
    """The oracle: ``json.loads`` on the bytes, as an upstream reads them."""
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "stream", "a"]), children, max_size=3)
    ),
    max_leaves=10,
)
objects = st.dictionaries(st.sampled_from(["model", "stream", "user"]), json_values, max_size=3)
encodings = st.sampled_from(["utf-8", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
bodies = st.one_of(
    st.tuples(objects, encodings).map(lambda pair: json.dumps(pair[0]).encode(pair[1])),
    objects.map(lambda value: json.dumps(value).replace("}", ', "model": "late"}', 1).encode()),
    st.binary(max_size=40).map(lambda tail: b'{"model": "' + tail),
    st.binary(max_size=40),
)


@settings(max_examples=400)
@given(bodies)
def test_routing_reads_the_model_as_json_loads_reads_the_bytes(data: bytes) -> None:
    assert RequestBody(CHAT, data).model == model_as_json_loads_reads_it(data)


# --- through the app ---------------------------------------------------------------------------

MODEL_ROUTES = """
[upstreams.local]
url = "{upstream}"

[[routes]]
path_prefix = "/v1/"
models = ["m*"]
upstreams = ["local"]
"""


async def test_the_app_parses_a_body_once_and_hashes_the_credential_once(
    start_proxy: StartProxy, parsed: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing by model and the cache decision share one parse; a repeat (a cache hit) is not
    parsed at all; the credential is hashed once per request (its tenant and its cache key)."""
    hashed: list[object] = []

    def counting(headers: Any, shared: bool) -> str:
        hashed.append(headers)
        return tenant_namespace(headers, shared)

    monkeypatch.setattr(app, "tenant_namespace", counting)
    proxy = await start_proxy(MODEL_ROUTES, upstream_flag=False)
    request = {"model": "m1", "messages": [{"role": "user", "content": "once"}]}
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        auth = {"authorization": "Bearer sk-test"}
        first = await http.post(CHAT, json=request, headers=auth)
        await proxy.flush()
        second = await http.post(CHAT, json=request, headers=auth)
    assert first.headers["cache-status"] == "tproxy; fwd=miss"
    assert second.headers["cache-status"].startswith("tproxy; hit; ttl=")
    assert len(parsed) == 1
    assert len(hashed) == 2
