"""API families: which paths each owns, how its streams are framed, when an answer may be stored.

Each family's stream is built as its documentation shows it (see tests/familyupstreams.py), fed
through the decoder its dialect picks from the response headers, and judged by its completion
check: whole → COMPLETE, cut before the end marker → INCOMPLETE, an error in band → ERROR.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import familyupstreams as fam
from tproxy.core.completion import StreamOutcome
from tproxy.core.dialects import (
    CREDENTIAL_HEADERS,
    DEFAULT_PATHS,
    DIALECTS,
    JSON_ONLY,
    Dialect,
    dialect_for,
)
from tproxy.core.dialects.base import Completion, media_type
from tproxy.core.sse import ServerSentEvent

# A family fake's builder: the request body (and cut=, error=) to the bytes of its answer.
Build = Callable[..., list[bytes]]

COMPLETE, INCOMPLETE, ERROR = StreamOutcome.COMPLETE, StreamOutcome.INCOMPLETE, StreamOutcome.ERROR
ASK = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
OLLAMA_ASK = {"model": "llama3.2", "messages": [{"role": "user", "content": "one two three"}]}


def judge(
    path: str, media: bytes, parts: list[bytes], *, clean_end: bool = True
) -> tuple[tuple[StreamOutcome, str], Completion]:
    """Decode ``parts`` as the dialect of ``path`` does for an answer of type ``media``."""
    dialect = dialect_for(path)
    decoder = dialect.decoder([(b"Content-Type", media)], 1 << 20)
    assert decoder is not None
    assert dialect.completion is not None
    completion = dialect.completion()
    frames = [frame for part in parts for frame in decoder.feed(part)] + decoder.close()
    for frame in frames:
        if frame.event is not None:
            completion.observe(frame.event)
    return completion.verdict(clean_end), completion


FAMILIES = [
    pytest.param("/v1/responses", fam.SSE, fam.responses_stream, id="openai-responses"),
    pytest.param("/v1/messages", fam.SSE, fam.messages_stream, id="anthropic-messages"),
    pytest.param(
        "/api/chat",
        fam.NDJSON,
        lambda ask, **k: fam.ollama_stream(ask, "/api/chat", **k),
        id="ollama-chat",
    ),
    pytest.param(
        "/api/generate",
        fam.NDJSON,
        lambda ask, **k: fam.ollama_stream(ask, "/api/generate", **k),
        id="ollama-generate",
    ),
    pytest.param("/completion", fam.SSE, fam.llamacpp_stream, id="llamacpp-completion"),
]


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_a_whole_stream_is_complete_and_has_ended(path: str, media: bytes, build: Build) -> None:
    (outcome, _reason), completion = judge(path, media, build(ASK))
    assert outcome is COMPLETE
    assert completion.ended


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_a_stream_cut_before_its_end_marker_is_never_complete(
    path: str, media: bytes, build: Build
) -> None:
    (outcome, reason), completion = judge(path, media, build(ASK, cut=True))
    assert outcome is INCOMPLETE
    assert reason.startswith("no ")
    assert not completion.ended


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_an_error_in_band_is_an_error(path: str, media: bytes, build: Build) -> None:
    (outcome, _reason), _completion = judge(path, media, build(ASK, error=True))
    assert outcome is ERROR


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_an_unclean_http_end_is_never_complete(path: str, media: bytes, build: Build) -> None:
    (outcome, reason), _completion = judge(path, media, build(ASK), clean_end=False)
    assert (outcome, reason) == (INCOMPLETE, "upstream ended uncleanly")


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_anything_after_the_end_marker_is_suspicious(path: str, media: bytes, build: Build) -> None:
    parts = build(ASK)
    (outcome, reason), completion = judge(path, media, [*parts, parts[-1]])
    assert outcome is INCOMPLETE
    assert "after" in reason
    assert completion.ended


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_usage_comes_out_in_one_shape(path: str, media: bytes, build: Build) -> None:
    _verdict, completion = judge(path, media, build(ASK))
    usage = completion.usage
    assert usage is not None
    assert usage["prompt_tokens"] == 3
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == 6


def test_anthropic_usage_counts_cached_input_and_the_last_output_count() -> None:
    start: dict[str, Any] = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 5, "output_tokens": 1}},
    }
    start["message"]["usage"] |= {"cache_read_input_tokens": 100, "cache_creation_input_tokens": 7}
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 9},
    }
    parts = [fam.sse_event(start, "message_start"), fam.sse_event(delta, "message_delta")]
    _verdict, completion = judge("/v1/messages", fam.SSE, parts)
    assert completion.usage == {
        "prompt_tokens": 112,
        "completion_tokens": 9,
        "cached_tokens": 100,
        "total_tokens": 121,
    }


def test_anthropic_overloaded_error_names_its_type_and_pings_change_nothing() -> None:
    (outcome, reason), _ = judge("/v1/messages", fam.SSE, fam.messages_stream(ASK, error=True))
    assert (outcome, reason) == (ERROR, "error event: overloaded_error: Overloaded")
    pings = [fam.sse_event({"type": "ping"}, "ping")] * 3
    assert judge("/v1/messages", fam.SSE, [*pings, *fam.messages_stream(ASK)])[0][0] is COMPLETE


def test_responses_incomplete_is_a_storable_end_and_says_why() -> None:
    parts = fam.responses_stream(ASK, cut=True)
    incomplete = fam.response_object(ASK, "incomplete", "one")
    incomplete["incomplete_details"] = {"reason": "max_output_tokens"}
    parts.append(
        fam.sse_event(
            {"type": "response.incomplete", "response": incomplete}, "response.incomplete"
        )
    )
    (outcome, reason), completion = judge("/v1/responses", fam.SSE, parts)
    assert (outcome, reason) == (COMPLETE, "response.incomplete (max_output_tokens)")
    assert completion.ended


def test_responses_error_event_is_an_error() -> None:
    error = {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None}
    parts = [*fam.responses_stream(ASK, cut=True), fam.sse_event(error, "error")]
    assert judge("/v1/responses", fam.SSE, parts)[0] == (
        ERROR,
        "error event: rate_limit_exceeded: slow down",
    )


def test_an_ndjson_line_that_is_not_json_is_never_stored() -> None:
    parts = [b"not json\n", *fam.ollama_stream(OLLAMA_ASK, "/api/chat")]
    assert judge("/api/chat", fam.NDJSON, parts)[0] == (
        INCOMPLETE,
        "1 message(s) not a JSON object",
    )


def test_the_chat_dialect_is_todays_check_with_an_ended_property() -> None:
    chunk: dict[str, object] = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    chunk["usage"] = {
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    (outcome, reason), completion = judge("/v1/chat/completions", fam.SSE, [fam.sse_event(chunk)])
    assert (outcome, reason) == (COMPLETE, "finish_reason without [DONE]")
    assert completion.ended
    assert completion.usage == {"prompt_tokens": 2, "completion_tokens": 1, "cached_tokens": 1}


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_every_familys_completion_reads_its_counts(path: str, media: bytes, build: Build) -> None:
    dialect = dialect_for(path)
    decoder = dialect.decoder([(b"Content-Type", media)], 1 << 20)
    assert decoder is not None
    assert dialect.completion is not None
    completion = dialect.completion()
    for part in build(ASK):
        for frame in decoder.feed(part):
            if frame.event is not None:
                completion.observe(frame.event)
    assert completion.usage is not None
    assert (completion.usage["prompt_tokens"], completion.usage["completion_tokens"]) == (3, 3)


# --- requests, framing, paths, credentials ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "streams"),
    [
        ("/api/chat", {}, True),
        ("/api/chat", {"stream": None}, True),
        ("/api/generate", {"stream": False}, False),
        ("/v1/messages", {}, False),
        ("/v1/messages", {"stream": True}, True),
        ("/v1/responses", {"stream": "yes"}, False),
        ("/v1/chat/completions", {"stream": True}, True),
        ("/api/embed", {}, False),
        ("/v1/rerank", {"stream": True}, False),
        ("/unknown", {"stream": True}, False),
    ],
)
def test_whether_a_request_asks_for_a_stream(
    path: str, body: dict[str, object], streams: bool
) -> None:
    assert dialect_for(path).asks_for_stream(body) is streams


@pytest.mark.parametrize(
    ("path", "content_type", "decoded"),
    [
        ("/v1/messages", b"text/event-stream; charset=utf-8", True),
        ("/v1/messages", b"application/json", False),
        ("/api/chat", b"application/x-ndjson", True),
        ("/api/chat", b"text/event-stream", False),
        ("/api/chat", b"application/json; charset=utf-8", False),
        ("/v1/rerank", b"text/event-stream", False),
        ("/a/path/a/user/added", b"text/event-stream", False),
    ],
)
def test_the_framing_follows_the_content_type_of_the_family(
    path: str, content_type: bytes, decoded: bool
) -> None:
    for name in (b"Content-Type", b"content-type", b"CONTENT-TYPE"):
        assert (dialect_for(path).decoder([(name, content_type)], 1024) is not None) is decoded


def test_media_type_is_case_blind_and_drops_parameters() -> None:
    assert media_type([(b"Content-Type", b"Application/X-NDJSON ; charset=utf-8")]) == fam.NDJSON
    assert media_type([]) == b""


def test_every_default_path_belongs_to_exactly_one_family() -> None:
    """The list itself is pinned by test_config's documented defaults."""
    assert len(DEFAULT_PATHS) == len(set(DEFAULT_PATHS))
    for path in DEFAULT_PATHS:
        assert dialect_for(path) is not JSON_ONLY
    assert dialect_for("/v1/unknown") is JSON_ONLY


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/openai/deployments/gpt-4o/chat/completions", "openai-chat"),
        ("/ollama/api/chat", "ollama"),
        ("/ollama/api/embeddings", "ollama-embeddings"),
        ("/anthropic/v1/messages", "anthropic-messages"),
        ("/gateway/v1/responses", "openai-responses"),
        ("/llama/completion", "llamacpp-completion"),
        ("/jina/v1/rerank", "rerank"),
        ("/v1/messages-beta", "json"),
        ("/v2/generate", "json"),
    ],
)
def test_a_path_a_user_adds_belongs_to_the_family_whose_ending_it_has(
    path: str, family: str
) -> None:
    assert dialect_for(path).name == family


def test_every_familys_credential_headers_make_the_tenant() -> None:
    for dialect in DIALECTS:
        assert set(dialect.credential_headers) <= set(CREDENTIAL_HEADERS)
    assert set(CREDENTIAL_HEADERS) == {
        b"authorization",
        b"api-key",
        b"x-api-key",
        b"x-goog-api-key",
    }


# --- whole (JSON) answers -----------------------------------------------------------------------


def _body(value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("path", "status", "body", "outcome"),
    [
        ("/v1/messages", 200, _body(fam.message_object(ASK)), COMPLETE),
        (
            "/v1/messages",
            529,
            _body({"type": "error", "error": {"type": "overloaded_error"}}),
            ERROR,
        ),
        ("/v1/messages", 200, _body({"type": "error", "error": {"type": "api_error"}}), ERROR),
        ("/v1/messages", 200, _body({"type": "message_batch"}), INCOMPLETE),
        ("/v1/responses", 200, _body(fam.response_object(ASK, "completed", "x")), COMPLETE),
        ("/v1/responses", 200, _body(fam.response_object(ASK, "incomplete", "x")), COMPLETE),
        ("/v1/responses", 200, _body(fam.response_object(ASK, "failed", None)), ERROR),
        ("/v1/responses", 200, _body(fam.response_object(ASK, "queued", None)), INCOMPLETE),
        ("/api/chat", 200, _body(fam.ollama_whole(OLLAMA_ASK, "/api/chat")), COMPLETE),
        ("/api/chat", 200, _body({"done": False}), INCOMPLETE),
        ("/api/chat", 404, _body({"error": "model 'x' not found"}), ERROR),
        ("/api/embed", 200, _body({"embeddings": [[0.1]], "prompt_eval_count": 1}), COMPLETE),
        ("/v1/rerank", 200, _body(fam.rerank_answer({"documents": ["a"]})), COMPLETE),
        ("/v1/rerank", 200, b"[1]", INCOMPLETE),
        ("/completion", 200, _body({"content": "x", "stop": True}), COMPLETE),
        ("/v1/a-path-a-user-added", 200, b'{"a": 1}', COMPLETE),
        ("/v1/a-path-a-user-added", 200, b"data: {}\n\n", INCOMPLETE),
    ],
)
def test_whole_answers(path: str, status: int, body: bytes, outcome: StreamOutcome) -> None:
    assert dialect_for(path).judge_json(status, body)[0] is outcome


def test_whole_answers_report_usage_in_one_shape() -> None:
    assert dialect_for("/v1/messages").judge_json(200, _body(fam.message_object(ASK)))[2] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }
    ollama = dialect_for("/api/chat").judge_json(
        200, _body(fam.ollama_whole(OLLAMA_ASK, "/api/chat"))
    )
    assert ollama[2] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    rerank = dialect_for("/v1/rerank").judge_json(
        200, _body(fam.rerank_answer({"documents": [1, 2]}))
    )
    assert rerank[2] == {"prompt_tokens": 2}


# --- the payload log's answer -------------------------------------------------------------------


@pytest.mark.parametrize(("path", "media", "build"), FAMILIES)
def test_the_assembled_answer_holds_the_text_the_stop_and_the_usage(
    path: str, media: bytes, build: Build
) -> None:
    dialect = dialect_for(path)
    assert dialect.assembler is not None
    assembler = dialect.assembler(1 << 20)
    decoder = dialect.decoder([(b"Content-Type", media)], 1 << 20)
    assert decoder is not None
    for part in build(ASK):
        for frame in decoder.feed(part):
            if frame.event is not None:
                assembler.feed(frame.event)
    answer = assembler.result()
    assert answer.choices[0].text == "one two three"
    assert answer.choices[0].finish_reason is not None
    assert answer.usage is not None
    assert answer.done


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/v1/messages", fam.message_object(ASK), "end_turn"),
        ("/v1/responses", fam.response_object(ASK, "completed", "one two three"), "completed"),
        ("/api/chat", fam.ollama_whole(OLLAMA_ASK, "/api/chat"), "stop"),
        ("/api/generate", fam.ollama_whole(OLLAMA_ASK, "/api/generate"), "stop"),
        ("/completion", {"content": "one two three", "stop": True, "stop_type": "eos"}, "eos"),
    ],
)
def test_the_assembled_answer_of_a_whole_body(path: str, body: object, reason: str) -> None:
    answer = dialect_for(path).whole_answer(_body(body), 1 << 20)
    assert answer.done
    (choice,) = answer.choices
    assert (choice.text, choice.finish_reason) == ("one two three", reason)


def test_whole_tool_calls_are_assembled() -> None:
    message = {
        "type": "message",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
    }
    (call,) = (
        dialect_for("/v1/messages").whole_answer(_body(message), 1 << 20).choices[0].tool_calls
    )
    assert (call.id, call.name, call.arguments) == ("toolu_1", "f", '{"a": 1}')
    response = {
        "output": [{"type": "function_call", "call_id": "c1", "name": "g", "arguments": "{}"}]
    }
    (call,) = (
        dialect_for("/v1/responses").whole_answer(_body(response), 1 << 20).choices[0].tool_calls
    )
    assert (call.id, call.name, call.arguments) == ("c1", "g", "{}")


def test_anthropic_tool_use_blocks_are_assembled() -> None:
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    events = [
        (
            {"type": "content_block_start", "index": 1, "content_block": block},
            "content_block_start",
        ),
        (
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
            "content_block_delta",
        ),
        (
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
            },
            "content_block_delta",
        ),
    ]
    assembler = dialect_for("/v1/messages").assembler(1 << 20)
    for data, name in events:
        assembler.feed(ServerSentEvent(json.dumps(data), name))
    (call,) = assembler.result().choices[0].tool_calls
    assert (call.id, call.name, call.arguments) == ("toolu_1", "get_weather", '{"city": "Paris"}')


# --- nothing raises on anything -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
family_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            [
                "message_stop",
                "error",
                "response.completed",
                "response.failed",
                "response.incomplete",
                "message_start",
                "message_delta",
            ]
        ),
        "done": st.booleans() | json_values,
        "stop": st.booleans() | json_values,
        "error": json_values,
        "response": json_values,
        "message": json_values,
        "usage": json_values,
        "delta": json_values,
        "index": json_values,
        "prompt_eval_count": json_values,
    },
)
events = st.builds(
    ServerSentEvent,
    data=st.one_of(
        family_objects.map(json.dumps), json_values.map(json.dumps), st.text(max_size=20)
    ),
    event=st.sampled_from(["message", "error", "message_stop", "response.completed", "ping"]),
)
streaming_dialects = [dialect for dialect in DIALECTS if dialect.completion is not None]


def _judge_events(dialect: Dialect, stream: list[ServerSentEvent]) -> None:
    assert dialect.completion is not None
    assert dialect.assembler is not None
    completion = dialect.completion()
    assembler = dialect.assembler(64)
    for event in stream:
        completion.observe(event)
        assembler.feed(event)
    for clean_end in (True, False):
        outcome, reason = completion.verdict(clean_end)
        assert isinstance(reason, str)
        if outcome is COMPLETE:
            assert completion.ended
    assert completion.usage is None or all(v >= 0 for v in completion.usage.values())
    assembler.result().to_json()


@settings(max_examples=300)
@given(dialect=st.sampled_from(streaming_dialects), stream=st.lists(events, max_size=8))
def test_no_verdict_raises_on_any_events(dialect: Dialect, stream: list[ServerSentEvent]) -> None:
    _judge_events(dialect, stream)


@settings(max_examples=300)
@given(
    dialect=st.sampled_from(streaming_dialects),
    media=st.sampled_from([fam.SSE, fam.NDJSON]),
    chunks=st.lists(
        st.binary(max_size=40) | family_objects.map(lambda o: json.dumps(o).encode() + b"\n"),
        max_size=8,
    ),
)
def test_no_verdict_raises_on_any_bytes(
    dialect: Dialect, media: bytes, chunks: list[bytes]
) -> None:
    decoder = dialect.decoder([(b"Content-Type", media)], 64)
    if decoder is None:
        return
    frames = [frame for chunk in chunks for frame in decoder.feed(chunk)] + decoder.close()
    _judge_events(dialect, [frame.event for frame in frames if frame.event is not None])


@settings(max_examples=300)
@given(
    dialect=st.sampled_from([*DIALECTS, JSON_ONLY]),
    status=st.sampled_from([200, 400, 500]),
    body=st.binary(max_size=40) | family_objects.map(lambda o: json.dumps(o).encode()),
)
def test_no_json_verdict_raises_on_any_body(dialect: Dialect, status: int, body: bytes) -> None:
    outcome, reason, _usage = dialect.judge_json(status, body)
    assert outcome is not COMPLETE or status == 200
    assert isinstance(reason, str)
