"""Every API family through real Hypercorn, with real clients, against an upstream that speaks it.

The fake upstream (tests/familyupstreams.py) writes each family's bytes as its documentation
shows them, with Title-Case header names as llama.cpp and Ollama write them. For each family:
a whole answer is stored and the next identical request is a hit with the very same bytes and
Content-Type; an answer cut before its end marker (the HTTP body still ends cleanly) and an
answer with an error in band are never stored. The official SDKs (``openai``, ``anthropic``,
``ollama``) read live and replayed answers alike.
"""

from __future__ import annotations

import json
from contextlib import aclosing

import anthropic
import httpx2
import ollama
import openai
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, access_lines, tolerate_sdk_generators
from tests.familyupstreams import FamilyUpstream
from tproxy.core.clientauth import hash_key
from tproxy.core.dialects import dialect_for
from tproxy.core.entry import StoredEntry
from tproxy.telemetry import PayloadCapture

WORDS = "one two three"
STREAMS = [
    pytest.param("/v1/responses", {"model": "m", "input": WORDS, "stream": True}, id="responses"),
    pytest.param(
        "/v1/messages",
        {
            "model": "c",
            "max_tokens": 9,
            "messages": [{"role": "user", "content": WORDS}],
            "stream": True,
        },
        id="anthropic-messages",
    ),
    pytest.param(
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": WORDS}]},
        id="ollama-chat",
    ),
    pytest.param("/api/generate", {"model": "llama3.2", "prompt": WORDS}, id="ollama-generate"),
    pytest.param("/completion", {"prompt": WORDS, "stream": True}, id="llamacpp-completion"),
]
WHOLE = [
    pytest.param("/v1/responses", {"model": "m", "input": WORDS}, id="responses"),
    pytest.param(
        "/v1/messages",
        {"model": "c", "max_tokens": 9, "messages": [{"role": "user", "content": WORDS}]},
        id="anthropic-messages",
    ),
    pytest.param(
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": WORDS}], "stream": False},
        id="ollama-chat",
    ),
    pytest.param("/api/embed", {"model": "all-minilm", "input": ["a", "b"]}, id="ollama-embed"),
    pytest.param("/v1/rerank", {"model": "r", "query": "q", "documents": ["a", "b"]}, id="rerank"),
]
MEDIA = {
    "/v1/responses": b"text/event-stream",
    "/v1/messages": b"text/event-stream",
    "/api/chat": b"application/x-ndjson",
    "/api/generate": b"application/x-ndjson",
    "/completion": b"text/event-stream",
}


@pytest.fixture
async def family(nursery: trio.Nursery) -> FamilyUpstream:
    fake = FamilyUpstream()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def proxy(start_proxy: StartProxy, family: FamilyUpstream) -> RunningProxy:
    return await start_proxy(upstream_url=family.url)


async def post(
    proxy: RunningProxy, path: str, body: dict[str, object], **headers: str
) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10.0) as http:
        response = await http.post(path, json=body, headers=headers)
    await proxy.flush()
    return response


ANSWERS = [
    pytest.param(*param.values, MEDIA[str(param.values[0])], id=param.id) for param in STREAMS
] + [
    pytest.param(*param.values, b"application/json; charset=utf-8", id=f"{param.id}-json")
    for param in WHOLE
]


@pytest.mark.parametrize(("path", "body", "media"), ANSWERS)
async def test_a_whole_answer_is_stored_and_replayed_byte_for_byte(
    proxy: RunningProxy, family: FamilyUpstream, path: str, body: dict[str, object], media: bytes
) -> None:
    first = await post(proxy, path, body)
    second = await post(proxy, path, body)
    assert first.headers["cache-status"] == "tproxy; fwd=miss"
    assert second.headers["cache-status"].startswith("tproxy; hit")
    assert second.content == first.content
    assert second.headers["content-type"].encode() == media
    assert first.headers["content-type"] == second.headers["content-type"]
    assert "transfer-encoding" not in second.headers
    assert family.calls[path] == 1


@pytest.mark.parametrize("fault", ["x-fake-cut", "x-fake-error"])
@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_a_stream_cut_before_its_end_or_with_an_error_in_band_is_never_stored(
    proxy: RunningProxy, family: FamilyUpstream, path: str, body: dict[str, object], fault: str
) -> None:
    faulty = await post(proxy, path, body, **{fault: "1"})
    assert faulty.status_code == 200  # the HTTP body itself ended cleanly
    assert faulty.headers["cache-status"] == "tproxy; fwd=miss"
    again = await post(proxy, path, body)
    assert again.headers["cache-status"] == "tproxy; fwd=miss"
    assert again.content != faulty.content
    assert family.calls[path] == 2


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_a_follower_joining_mid_stream_gets_the_whole_answer_from_one_upstream_call(
    proxy: RunningProxy, family: FamilyUpstream, path: str, body: dict[str, object]
) -> None:
    knobs = {"x-fake-delay": "0.1"}
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http,
        http.stream("POST", path, json=body, headers=knobs) as leader,
        aclosing(leader.aiter_raw()) as chunks,
    ):
        first = await anext(chunks)
        follower = await http.post(path, json=body, headers=knobs)
        rest = b"".join([chunk async for chunk in chunks])
    assert follower.headers["cache-status"] == "tproxy; fwd=miss; collapsed"
    assert follower.content == first + rest
    assert family.calls[path] == 1


async def test_a_path_of_no_known_family_is_cached_only_as_json(
    start_proxy: StartProxy, family: FamilyUpstream
) -> None:
    proxy = await start_proxy('[cache]\npaths = ["/v1/messages-beta"]\n', upstream_url=family.url)
    body: dict[str, object] = {
        "model": "c",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": WORDS}],
    }
    first = await post(proxy, "/v1/messages-beta", body)
    second = await post(proxy, "/v1/messages-beta", body)
    assert second.headers["cache-status"].startswith("tproxy; hit")
    assert second.content == first.content
    streamed = {**body, "stream": True}
    live = await post(proxy, "/v1/messages-beta", streamed)
    again = await post(proxy, "/v1/messages-beta", streamed)
    assert live.content == again.content  # passed through whole, twice
    assert again.headers["cache-status"] == "tproxy; fwd=miss"
    assert family.calls["/v1/messages-beta"] == 3


async def test_an_answer_stored_for_one_key_never_reaches_another_whichever_header_carries_it(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    body: dict[str, object] = {
        "model": "c",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": WORDS}],
    }
    keys = [
        {"x-api-key": "sk-ant-a"},
        {"x-api-key": "sk-ant-b"},
        {"x-goog-api-key": "g-a"},
        {"x-goog-api-key": "g-b"},
        {"api-key": "azure-a"},
        {},
    ]
    for key in keys:
        answer = await post(proxy, "/v1/messages", body, **key)
        assert answer.headers["cache-status"] == "tproxy; fwd=miss", key
    for key in keys:
        answer = await post(proxy, "/v1/messages", body, **key)
        assert answer.headers["cache-status"].startswith("tproxy; hit"), key
    assert family.calls["/v1/messages"] == len(keys)


@pytest.mark.parametrize("header", ["x-api-key", "x-goog-api-key"])
async def test_a_client_key_in_any_credential_header_is_checked_and_never_passed_upstream(
    start_proxy: StartProxy, family: FamilyUpstream, header: str
) -> None:
    proxy = await start_proxy(
        f'[auth]\nclient_keys = ["{hash_key("sk-good")}"]\n', upstream_url=family.url
    )
    body: dict[str, object] = {
        "model": "c",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": WORDS}],
    }
    refused = await post(
        proxy, "/v1/messages", body, authorization="Bearer sk-good", **{header: "wrong"}
    )
    assert refused.status_code == 401
    served = await post(proxy, "/v1/messages", body, **{header: "sk-good"})
    assert served.status_code == 200
    (seen,) = family.requests
    assert header not in seen.headers


async def test_title_case_response_headers_change_nothing(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    """llama.cpp's Title-Case ``Content-Type`` once hid its streams (never cached, replayed
    without a Content-Type) and its ``Transfer-Encoding`` once crossed the proxy."""
    body = {"prompt": WORDS, "stream": True}
    first = await post(proxy, "/completion", body)
    second = await post(proxy, "/completion", body)
    assert second.headers["cache-status"].startswith("tproxy; hit")
    for answer in (first, second):
        assert answer.headers.get_list("content-type") == ["text/event-stream"]
        assert len(answer.headers.get_list("transfer-encoding")) <= 1


# --- the official SDKs --------------------------------------------------------------------------


@tolerate_sdk_generators
async def test_the_openai_sdk_streams_responses_live_and_from_the_cache(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)

    async def ask() -> list[dict[str, object]]:
        stream = await client.responses.create(model="m", input=WORDS, stream=True)
        async with stream:
            events = [event.model_dump() async for event in stream]
        await proxy.flush()
        return events

    async with client:
        live = await ask()
        replayed = await ask()
    assert replayed == live
    assert live[-1]["type"] == "response.completed"
    deltas = [event["delta"] for event in live if event["type"] == "response.output_text.delta"]
    assert "".join(deltas) == WORDS  # type: ignore[arg-type]
    assert family.calls["/v1/responses"] == 1


@tolerate_sdk_generators
async def test_the_openai_sdk_streams_chat_live_and_from_the_cache_beside_the_other_families(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)

    async def ask() -> str:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": WORDS}], stream=True
        )
        async with stream:
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        await proxy.flush()
        return text

    async with client:
        assert await ask() == WORDS
        assert await ask() == WORDS
    assert family.calls["/v1/chat/completions"] == 1


@tolerate_sdk_generators
async def test_the_openai_sdk_reads_a_whole_response_from_the_cache(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        live = await client.responses.create(model="m", input=WORDS)
        await proxy.flush()
        replayed = await client.responses.create(model="m", input=WORDS)
    assert replayed.output_text == live.output_text == WORDS
    assert family.calls["/v1/responses"] == 1


@tolerate_sdk_generators
async def test_the_anthropic_sdk_streams_messages_live_and_from_the_cache(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-test", max_retries=0)

    async def ask() -> tuple[str, str | None, str]:
        async with client.messages.stream(
            model="claude-fake", max_tokens=9, messages=[{"role": "user", "content": WORDS}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
            status = stream.response.headers["cache-status"]
        await proxy.flush()
        return text, final.stop_reason, status

    async with client:
        live = await ask()
        replayed = await ask()
    assert live == (WORDS, "end_turn", "tproxy; fwd=miss")
    assert replayed[:2] == live[:2]
    assert replayed[2].startswith("tproxy; hit")
    assert family.calls["/v1/messages"] == 1


@tolerate_sdk_generators
async def test_the_anthropic_sdk_raises_on_an_overloaded_error_and_nothing_is_stored(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-test", max_retries=0)

    async def read_overloaded() -> None:
        async with client.messages.stream(
            model="claude-fake",
            max_tokens=9,
            messages=[{"role": "user", "content": WORDS}],
            extra_headers={"x-fake-error": "1"},
        ) as stream:
            async for _piece in stream.text_stream:
                pass

    async with client:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            await read_overloaded()
        await proxy.flush()
        message = await client.messages.create(
            model="claude-fake", max_tokens=9, messages=[{"role": "user", "content": WORDS}]
        )
    assert message.content[0].text == WORDS  # type: ignore[union-attr]
    assert family.calls["/v1/messages"] == 2


@tolerate_sdk_generators
@pytest.mark.parametrize("stream", [True, False])
async def test_the_ollama_client_chats_live_and_from_the_cache(
    proxy: RunningProxy, family: FamilyUpstream, stream: bool
) -> None:
    client = ollama.AsyncClient(host=proxy.url)

    async def ask() -> str:
        messages = [{"role": "user", "content": WORDS}]
        if stream:
            parts = await client.chat(model="llama3.2", messages=messages, stream=True)
            text = "".join([part.message.content or "" async for part in parts])
        else:
            answer = await client.chat(model="llama3.2", messages=messages, stream=False)
            text = answer.message.content or ""
        await proxy.flush()
        return text

    async with client:
        assert await ask() == WORDS
        assert await ask() == WORDS
    assert family.calls["/api/chat"] == 1


@tolerate_sdk_generators
async def test_the_ollama_client_raises_on_an_error_line_and_nothing_is_stored(
    proxy: RunningProxy, family: FamilyUpstream
) -> None:

    async def read_failing() -> None:
        async with ollama.AsyncClient(host=proxy.url, headers={"x-fake-error": "1"}) as client:
            async for _part in await client.generate(model="llama3.2", prompt=WORDS, stream=True):
                pass

    with pytest.raises(ollama.ResponseError, match="an error was encountered"):
        await read_failing()
    await proxy.flush()
    async with ollama.AsyncClient(host=proxy.url) as client:
        parts = await client.generate(model="llama3.2", prompt=WORDS, stream=True)
        text = "".join([part.response async for part in parts])
    assert text == WORDS
    assert family.calls["/api/generate"] == 2


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_the_payload_log_assembles_each_familys_answer_live_and_replayed(
    proxy: RunningProxy, path: str, body: dict[str, object]
) -> None:
    dialect = dialect_for(path)
    live = await post(proxy, path, body)
    capture = PayloadCapture(b"{}", raw_events=False, max_bytes=1 << 20, dialect=dialect)
    decoder = dialect.decoder(list(live.headers.raw), 1 << 20)
    assert decoder is not None
    for frame in decoder.feed(live.content) + decoder.close():
        if frame.event is not None:
            capture.observe_event(frame.event)
    entry = StoredEntry(
        status=200,
        headers=((b"content-type", MEDIA[path]),),
        chunks=(live.content,),
        offsets=(0.0,),
        streamed=True,
        created_at=0.0,
        expires_at=1.0,
        model=None,
    )
    replayed = PayloadCapture(b"{}", raw_events=False, max_bytes=1 << 20, dialect=dialect)
    replayed.observe_entry(entry)
    for payload in (capture.finish(), replayed.finish()):
        assert payload.answer is not None
        assert payload.answer.choices[0].text == WORDS
        assert payload.answer.done


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_an_uncached_stream_reports_its_usage_in_one_shape(
    start_proxy: StartProxy,
    family: FamilyUpstream,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, object],
) -> None:
    caplog.set_level("INFO", logger="tproxy.access")
    proxy = await start_proxy("[cache]\nenabled = false\n", upstream_url=family.url)
    await post(proxy, path, body)
    (line,) = access_lines(caplog)
    assert line["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6} | (
        {"cached_tokens": 0} if path in ("/v1/responses", "/completion") else {}
    )


async def test_a_stored_stream_reports_its_usage_in_one_shape(
    proxy: RunningProxy, family: FamilyUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tproxy.access")
    body = {
        "model": "c",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": WORDS}],
        "stream": True,
    }
    await post(proxy, "/v1/messages", body)
    (line,) = access_lines(caplog)
    assert json.loads(json.dumps(line["usage"])) == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }
