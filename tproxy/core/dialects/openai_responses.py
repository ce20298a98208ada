"""OpenAI Responses (``/v1/responses``): named SSE events, no ``[DONE]``.

A streamed answer is a run of events, each with an ``event:`` line and a JSON object whose
``type`` repeats the name: ``response.created``, ``response.in_progress``, the output's
``response.output_item.*``, ``response.content_part.*``, ``response.output_text.delta``,
``response.function_call_arguments.delta``... and exactly one terminal event.

- ``response.completed`` ends a storable answer.
- ``response.incomplete`` also ends a storable answer: the model stopped at
  ``max_output_tokens`` (or a content filter) and the same request stops there again, as a chat
  answer with ``finish_reason: "length"`` is stored today. Its reason names the cause.
- ``response.failed`` and an ``error`` event are never stored, nor is a stream without a terminal
  event, nor one with events after it.

A whole answer (``stream`` not true) is stored when its ``status`` is ``completed`` or
``incomplete``; ``failed``, and the ``queued`` or ``in_progress`` of a background response, are
not. Usage: ``response.usage``'s ``input_tokens``, ``output_tokens`` and
``input_tokens_details.cached_tokens``.
"""

from __future__ import annotations

from tproxy.core.completion import StreamOutcome
from tproxy.core.dialects.base import (
    Dialect,
    EndMarkerCompletion,
    Framing,
    JsonVerdict,
    TextAssembler,
    judge_json_object,
    member,
    usage_counts,
)

__all__ = ["OPENAI_RESPONSES", "ResponsesAssembler", "ResponsesCompletion", "responses_usage"]

_STORABLE_STATUS = ("completed", "incomplete")


def responses_usage(response: object) -> dict[str, int] | None:
    """The counts of a Response object's ``usage``."""
    usage = member(response, "usage")
    return usage_counts(
        member(usage, "input_tokens"),
        member(usage, "output_tokens"),
        member(usage, "input_tokens_details", "cached_tokens"),
    )


def _kind(name: str, payload: dict[str, object]) -> str:
    kind = payload.get("type")
    return kind if isinstance(kind, str) else name


def _error_body(error: object) -> dict[str, object]:
    """An error event or a failed response's ``error`` in the shape error messages are read from."""
    return {"error": {"message": member(error, "message"), "type": member(error, "code")}}


class ResponsesCompletion(EndMarkerCompletion):
    """Ended by ``response.completed`` (or ``response.incomplete``); see the module."""

    __slots__ = ()
    marker = "response.completed"

    def _take(self, name: str, payload: dict[str, object]) -> None:
        kind = _kind(name, payload)
        response = payload.get("response")
        if isinstance(response, dict):
            self._count(responses_usage(response))
        if name == "error" or kind == "error":
            self._fail("error event", _error_body(payload))
        elif kind == "response.failed":
            self._fail("response.failed", _error_body(member(response, "error")))
        elif kind == "response.completed":
            self._end("response.completed")
        elif kind == "response.incomplete":
            reason = member(response, "incomplete_details", "reason")
            self._end("response.incomplete" + (f" ({reason})" if isinstance(reason, str) else ""))


def judge_responses_json(status: int, body: bytes) -> JsonVerdict:
    outcome, reason, usage, document = judge_json_object(status, body, responses_usage)
    if document is None:
        return outcome, reason, usage
    state = document.get("status")
    if state == "failed":
        return StreamOutcome.ERROR, "status failed", usage
    if state is not None and state not in _STORABLE_STATUS:
        return StreamOutcome.INCOMPLETE, f"status {str(state)[:40]}", usage
    return outcome, reason, usage


class ResponsesAssembler(TextAssembler):
    """Output text, function calls, the final status and usage of a Responses answer."""

    __slots__ = ()

    def _take(self, name: str, payload: dict[str, object]) -> None:
        kind = _kind(name, payload)
        index = payload.get("output_index")
        if kind == "response.output_text.delta":
            self._append_text(payload.get("delta"))
        elif kind == "response.output_item.added":
            item = payload.get("item")
            if member(item, "type") == "function_call":
                self._append_call(index, member(item, "call_id"), member(item, "name"), None)
        elif kind == "response.function_call_arguments.delta":
            self._append_call(index, None, None, payload.get("delta"))
        elif kind == "error":
            self._note_error("error event", _error_body(payload))
        response = payload.get("response")
        if not isinstance(response, dict):
            return
        self._note(model=response.get("model"), id=response.get("id"))
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self._end_with(response)
            self._finish()

    def _take_whole(self, payload: dict[str, object]) -> None:
        self._note(model=payload.get("model"), id=payload.get("id"))
        output = payload.get("output")
        for position, item in enumerate(output if isinstance(output, list) else []):
            if member(item, "type") == "function_call":
                arguments = member(item, "arguments")
                self._append_call(
                    position, member(item, "call_id"), member(item, "name"), arguments
                )
                continue
            content = member(item, "content")
            for part in content if isinstance(content, list) else []:
                if member(part, "type") == "output_text":
                    self._append_text(member(part, "text"))
        self._end_with(payload)

    def _end_with(self, response: dict[str, object]) -> None:
        detail = member(response, "incomplete_details", "reason")
        self._note(reason=detail if isinstance(detail, str) else response.get("status"))
        self._note_usage(responses_usage(response))
        if response.get("status") == "failed":
            self._note_error("response.failed", _error_body(response.get("error")))


OPENAI_RESPONSES = Dialect(
    name="openai-responses",
    paths=("/v1/responses",),
    endings=("/responses",),
    framing=Framing.SSE,
    completion=ResponsesCompletion,
    judge_json=judge_responses_json,
    assembler=ResponsesAssembler,
    whole_answer=ResponsesAssembler.whole,
    credential_headers=(b"authorization", b"api-key"),
)
