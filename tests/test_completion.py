"""Completion verdicts: which OpenAI-style answers ended cleanly enough to be cached."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.completion import StreamCompletion, StreamOutcome, json_answer_verdict
from tproxy.core.sse import ServerSentEvent

COMPLETE, INCOMPLETE, ERROR = StreamOutcome.COMPLETE, StreamOutcome.INCOMPLETE, StreamOutcome.ERROR
DONE = ServerSentEvent("[DONE]")
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def chunk(
    content: str | None = "x", finish: str | None = None, index: int = 0, **extra: object
) -> ServerSentEvent:
    """One ``chat.completion.chunk`` as OpenAI-compatible servers send it."""
    choice = {"index": index, "delta": {"content": content}, "finish_reason": finish}
    body = {"object": "chat.completion.chunk", "model": "m", "choices": [choice], **extra}
    return ServerSentEvent(json.dumps(body))


def judge(*events: ServerSentEvent, clean_end: bool = True) -> tuple[StreamOutcome, str]:
    completion = StreamCompletion()
    for event in events:
        completion.observe(event)
    return completion.verdict(clean_end)


def test_done_completes_the_stream() -> None:
    assert judge(chunk("Hi"), chunk(None, "stop"), DONE) == (COMPLETE, "[DONE]")


def test_finish_reason_without_done_completes_the_stream_like_llama_cpp() -> None:
    assert judge(chunk("Hi"), chunk("", "length")) == (COMPLETE, "finish_reason without [DONE]")


def test_neither_done_nor_finish_reason_is_incomplete() -> None:
    assert judge(chunk("Hi"), chunk("there")) == (INCOMPLETE, "no [DONE] and no finish_reason")
    assert judge() == (INCOMPLETE, "no [DONE] and no finish_reason")


def test_a_trailing_usage_chunk_does_not_hide_the_finish() -> None:
    usage_only = ServerSentEvent(json.dumps({"choices": [], "usage": USAGE}))
    assert judge(chunk(None, "stop"), usage_only)[0] is COMPLETE


def test_non_json_data_after_the_finish_means_no_finish_was_seen_from_it() -> None:
    assert judge(chunk(None, "stop"), ServerSentEvent("bye")) == (
        INCOMPLETE,
        "no [DONE] and no finish_reason",
    )


def test_non_json_data_is_not_an_error_by_itself() -> None:
    assert judge(ServerSentEvent("hello"), ServerSentEvent("[1, 2]"), DONE) == (COMPLETE, "[DONE]")


def test_every_choice_must_finish_when_there_is_no_done() -> None:
    opened = [chunk("a", index=0), chunk("b", index=1)]
    assert judge(*opened, chunk(None, "stop", index=0)) == (
        INCOMPLETE,
        "no [DONE] and a choice without finish_reason",
    )
    assert judge(*opened, chunk(None, "stop", index=1), chunk(None, "stop", index=0))[0] is COMPLETE


def test_malformed_choices_are_skipped_and_a_finished_choice_stays_finished() -> None:
    odd = ServerSentEvent(json.dumps({"choices": ["junk", None, {"finish_reason": "stop"}]}))
    late = ServerSentEvent(json.dumps({"choices": [{"index": 2, "finish_reason": None}]}))
    assert judge(odd)[0] is COMPLETE
    assert judge(odd, late, chunk(None, "stop", index=2))[0] is COMPLETE


def test_usage_and_model_are_taken_from_the_last_chunk_that_has_them() -> None:
    completion = StreamCompletion()
    completion.observe(chunk("Hi", usage=None))
    assert completion.usage is None
    final = {"model": "llama-3", "choices": [], "usage": USAGE}
    for event in (chunk(None, "stop", usage=None), ServerSentEvent(json.dumps(final)), DONE):
        completion.observe(event)
    assert completion.usage == USAGE
    assert completion.model == "llama-3"
    assert completion.verdict(clean_end=True) == (COMPLETE, "[DONE]")


def test_an_error_event_is_an_error() -> None:
    error = ServerSentEvent('{"error": {"message": "model overloaded"}}', event="error")
    assert judge(chunk("Hi"), error, DONE) == (ERROR, "error event: model overloaded")
    assert judge(ServerSentEvent("oops", event="error")) == (ERROR, "error event")


def test_an_error_object_in_the_data_is_an_error() -> None:
    error = ServerSentEvent(json.dumps({"error": {"message": "context too long", "code": 400}}))
    assert judge(chunk("Hi"), error, DONE) == (ERROR, "error in data: context too long")
    assert judge(ServerSentEvent('{"error": "boom"}')) == (ERROR, "error in data: boom")


def test_a_null_error_member_is_not_an_error() -> None:
    assert judge(chunk("Hi", error=None), DONE) == (COMPLETE, "[DONE]")


def test_an_unclean_end_is_incomplete_even_after_done() -> None:
    assert judge(chunk("Hi"), DONE, clean_end=False) == (INCOMPLETE, "upstream ended uncleanly")


def test_an_error_outranks_an_unclean_end() -> None:
    assert judge(ServerSentEvent("{}", event="error"), clean_end=False)[0] is ERROR


def test_events_after_done_are_suspicious() -> None:
    assert judge(chunk("Hi"), DONE, chunk("more")) == (INCOMPLETE, "1 event(s) after [DONE]")
    assert judge(DONE, DONE) == (INCOMPLETE, "1 event(s) after [DONE]")


def test_the_verdict_can_be_asked_again() -> None:
    completion = StreamCompletion()
    completion.observe(DONE)
    assert completion.verdict(True) == completion.verdict(True) == (COMPLETE, "[DONE]")


# --- non-streamed answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(
            200,
            b'{"choices": [], "usage": {"total_tokens": 3}}',
            (COMPLETE, "JSON object"),
            id="ok",
        ),
        pytest.param(
            200, b'{"data": [], "error": null}', (COMPLETE, "JSON object"), id="null-error"
        ),
        pytest.param(
            200, b'{"error": {"message": "bad"}}', (ERROR, "error in body: bad"), id="error"
        ),
        pytest.param(
            400,
            b'{"error": {"message": "no such model"}}',
            (ERROR, "status 400: no such model"),
            id="4xx",
        ),
        pytest.param(503, b"upstream down", (ERROR, "status 503"), id="5xx-text"),
        pytest.param(
            200, b'{"choices": [', (INCOMPLETE, "body is not a JSON object"), id="truncated"
        ),
        pytest.param(200, b"[1, 2]", (INCOMPLETE, "body is not a JSON object"), id="array"),
        pytest.param(200, b"", (INCOMPLETE, "body is not a JSON object"), id="empty"),
        pytest.param(200, b"\xff\xfe{", (INCOMPLETE, "body is not a JSON object"), id="not-utf8"),
    ],
)
def test_json_answer_verdicts(
    status: int, body: bytes, expected: tuple[StreamOutcome, str]
) -> None:
    assert json_answer_verdict(status, body)[:2] == expected


def test_json_answer_returns_its_usage() -> None:
    body = json.dumps({"object": "chat.completion", "usage": USAGE}).encode()
    assert json_answer_verdict(200, body) == (COMPLETE, "JSON object", USAGE)
    assert json_answer_verdict(200, b'{"usage": 3}')[2] is None


def test_deeply_nested_json_does_not_raise() -> None:
    deep = "[" * 100_000
    assert judge(ServerSentEvent(deep))[0] is INCOMPLETE
    assert json_answer_verdict(200, deep.encode())[0] is INCOMPLETE


# --- nothing raises ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["choices", "finish_reason", "index", "usage", "model", "error", "message"]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)
datas = st.one_of(st.text(max_size=20), json_values.map(json.dumps), st.just("[DONE]"))
events = st.builds(
    ServerSentEvent,
    data=datas,
    event=st.sampled_from(["message", "error", "completion"]) | st.text(max_size=5),
)


@settings(max_examples=300)
@given(stream=st.lists(events, max_size=8), clean_end=st.booleans())
def test_arbitrary_events_never_raise(stream: list[ServerSentEvent], clean_end: bool) -> None:
    completion = StreamCompletion()
    for event in stream:
        completion.observe(event)
    outcome, reason = completion.verdict(clean_end)
    assert reason
    if outcome is COMPLETE:
        assert clean_end
        assert not any(event.event == "error" for event in stream)
    assert completion.usage is None or isinstance(completion.usage, dict)
    assert completion.model is None or isinstance(completion.model, str)


@settings(max_examples=300)
@given(status=st.integers(-1000, 1000), body=st.binary(max_size=40) | datas.map(str.encode))
def test_arbitrary_json_answers_never_raise(status: int, body: bytes) -> None:
    outcome, reason, usage = json_answer_verdict(status, body)
    assert reason
    assert outcome is not COMPLETE or status == 200
    assert usage is None or isinstance(usage, dict)
