"""Assembling answers: streamed chunks become one answer per choice, whatever the upstream sends."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.assemble import (
    MAX_CHOICES,
    Answer,
    StreamAssembler,
    ToolCall,
    assemble_events,
    assemble_json,
    json_usage,
    normalise_usage,
)
from tproxy.core.sse import ServerSentEvent

DONE = ServerSentEvent("[DONE]")


def chunk(**payload: object) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"id": "c1", "model": "m", **payload}))


def delta(index: int = 0, finish: str | None = None, **fields: object) -> ServerSentEvent:
    choice = {"index": index, "delta": fields, "finish_reason": finish}
    return chunk(object="chat.completion.chunk", choices=[choice])


def call(index: int, **fields: object) -> dict[str, object]:
    return {"index": index, **fields}


# --- chat streams ----------------------------------------------------------------------------


def test_a_chat_stream_becomes_its_text_role_finish_reason_and_usage() -> None:
    answer = assemble_events(
        [
            delta(role="assistant", content=""),
            delta(content="Hel"),
            delta(content="lo"),
            delta(finish="stop"),
            chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 2}),
            DONE,
        ]
    )
    assert answer.id == "c1"
    assert answer.model == "m"
    assert answer.done
    assert answer.events == 6
    assert answer.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    [choice] = answer.choices
    assert (choice.role, choice.text, choice.finish_reason) == ("assistant", "Hello", "stop")
    assert not answer.truncated


def test_tool_calls_are_merged_by_index_with_their_arguments_concatenated() -> None:
    first = {"name": "weather", "arguments": ""}
    second = {"name": "time", "arguments": '{"tz"'}
    answer = assemble_events(
        [
            delta(tool_calls=[call(0, id="a", type="function", function=first)]),
            delta(tool_calls=[call(0, function={"arguments": '{"city"'})]),
            delta(tool_calls=[call(1, id="b", type="function", function=second)]),
            delta(tool_calls=[call(0, function={"arguments": ': "Oslo"}'})]),
            delta(tool_calls=[call(1, function={"arguments": ': "UTC"}'})]),
            delta(finish="tool_calls"),
            DONE,
        ]
    )
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.tool_calls == (
        ToolCall(0, "a", "function", "weather", '{"city": "Oslo"}'),
        ToolCall(1, "b", "function", "time", '{"tz": "UTC"}'),
    )


def test_several_choices_are_kept_apart_and_in_index_order() -> None:
    answer = assemble_events(
        [delta(1, content="B1"), delta(0, content="A1"), delta(1, content="B2", finish="length")]
    )
    assert [(c.index, c.text, c.finish_reason) for c in answer.choices] == [
        (0, "A1", None),
        (1, "B1B2", "length"),
    ]
    assert not answer.done


def test_reasoning_text_is_kept_apart_from_the_answer() -> None:
    answer = assemble_events(
        [delta(reasoning_content="think "), delta(reasoning="more"), delta(content="42")]
    )
    [choice] = answer.choices
    assert (choice.reasoning, choice.text) == ("think more", "42")


def test_a_completions_stream_concatenates_text() -> None:
    answer = assemble_events(
        [
            chunk(object="text_completion", choices=[{"index": 0, "text": "Once"}]),
            chunk(choices=[{"index": 0, "text": " upon", "finish_reason": "length"}]),
            chunk(choices=[], usage={"prompt_tokens": 1, "completion_tokens": 2}),
            DONE,
        ]
    )
    assert [(c.text, c.finish_reason) for c in answer.choices] == [("Once upon", "length")]
    assert answer.usage == {"prompt_tokens": 1, "completion_tokens": 2}


def test_an_error_reported_in_band_is_kept() -> None:
    event = ServerSentEvent(json.dumps({"error": {"message": "overloaded"}}), event="error")
    assert assemble_events([delta(content="x"), event]).error == "error event: overloaded"
    in_data = chunk(error={"message": "bad"})
    assert assemble_events([in_data]).error == "error in data: bad"


def test_text_beyond_max_chars_is_dropped_and_the_answer_says_truncated() -> None:
    answer = assemble_events([delta(content="abcd"), delta(content="efgh")], max_chars=6)
    assert answer.choices[0].text == "abcdef"
    assert answer.truncated


def test_choices_beyond_the_limit_are_not_kept() -> None:
    answer = assemble_events([delta(i, content="x") for i in range(MAX_CHOICES + 5)])
    assert len(answer.choices) == MAX_CHOICES
    assert answer.truncated


def test_the_answer_has_a_json_form() -> None:
    answer = assemble_events(
        [delta(tool_calls=[call(0, function={"name": "f", "arguments": "{}"})], finish="stop")]
    )
    document = json.loads(json.dumps(answer.to_json()))
    assert document["choices"][0]["tool_calls"][0]["name"] == "f"
    assert document["done"] is False


# --- JSON answers ----------------------------------------------------------------------------


def test_a_json_chat_answer_gives_its_message_and_tool_calls() -> None:
    tool_call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {
        "id": "x",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "tool_calls": [tool_call],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    answer = assemble_json(json.dumps(body).encode())
    [choice] = answer.choices
    assert (choice.role, choice.text, choice.finish_reason) == ("assistant", "hi", "stop")
    assert choice.tool_calls == (ToolCall(0, "t", "function", "f", "{}"),)
    assert answer.usage == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert answer.done
    assert answer.events == 0


def test_content_parts_keep_their_text() -> None:
    message = {"content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text"}]}
    answer = assemble_json(json.dumps({"choices": [{"message": message}]}).encode())
    assert answer.choices[0].text == "a"


def test_a_json_completions_answer_and_an_embeddings_answer() -> None:
    completion = assemble_json(b'{"choices":[{"index":0,"text":"yes","finish_reason":"stop"}]}')
    assert completion.choices[0].text == "yes"
    embeddings = assemble_json(b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":4}}')
    assert embeddings.choices == ()
    assert embeddings.usage == {"prompt_tokens": 4}


def test_a_body_that_is_not_a_json_object_gives_an_empty_answer() -> None:
    for body in (b"", b"not json", b"[1, 2]", b"\xff\xfe"):
        answer = assemble_json(body)
        assert answer == Answer(None, None, (), None, None, False, 0, False)


# --- usage -----------------------------------------------------------------------------------


def test_usage_keeps_only_its_top_level_counts() -> None:
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
        "cost": 0.5,
        "flag": True,
        "negative": -1,
    }
    assert normalise_usage(usage) == {"prompt_tokens": 5, "completion_tokens": 7}
    assert normalise_usage({"cost": 0.5}) is None
    assert normalise_usage(None) is None
    assert normalise_usage({f"k{i}": i for i in range(100)}) == {f"k{i}": i for i in range(16)}


def test_json_usage_reads_a_non_streamed_answer() -> None:
    assert json_usage(b'{"usage":{"total_tokens":3}}') == {"total_tokens": 3}
    assert json_usage(b"[]") is None


# --- untrusted input -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "choices",
                    "delta",
                    "message",
                    "content",
                    "text",
                    "index",
                    "tool_calls",
                    "function",
                    "arguments",
                    "name",
                    "id",
                    "type",
                    "usage",
                    "finish_reason",
                    "error",
                    "role",
                    "model",
                    "reasoning_content",
                ]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)
event_data = json_values.map(json.dumps) | st.text(max_size=40) | st.just("[DONE]")
events = st.builds(
    ServerSentEvent, data=event_data, event=st.sampled_from(["message", "error", "x"])
)


@settings(max_examples=300)
@given(st.lists(events, max_size=12), st.integers(min_value=0, max_value=64))
def test_assembling_never_raises_and_keeps_within_max_chars(
    stream: list[ServerSentEvent], max_chars: int
) -> None:
    answer = assemble_events(stream, max_chars=max_chars)
    kept = sum(
        len(c.text) + len(c.reasoning) + sum(len(t.arguments) for t in c.tool_calls)
        for c in answer.choices
    )
    assert kept <= max_chars
    assert answer.events == len(stream)
    json.dumps(answer.to_json())


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_assembling_a_json_body_never_raises(body: bytes) -> None:
    json.dumps(assemble_json(body).to_json())
    json_usage(body)


@settings(max_examples=200)
@given(st.lists(st.text(max_size=6), max_size=10))
def test_text_split_across_chunks_in_any_way_is_concatenated(pieces: list[str]) -> None:
    assembler = StreamAssembler()
    for piece in pieces:
        assembler.feed(delta(content=piece))
    answer = assembler.result()
    assert "".join(c.text for c in answer.choices) == "".join(pieces)
