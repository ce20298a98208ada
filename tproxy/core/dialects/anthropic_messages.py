"""Anthropic Messages (``/v1/messages``): named SSE events ending with ``message_stop``.

A streamed answer runs ``message_start``, then for each content block ``content_block_start``,
``content_block_delta``\\* and ``content_block_stop``, then ``message_delta`` (the stop reason and
the final output count) and ``message_stop``. ``ping`` events may come anywhere and are ignored.
An ``error`` event (``overloaded_error`` and the like) may arrive mid-stream: such an answer is
never stored, nor is one without ``message_stop`` or with events after it.

A whole answer (``"type": "message"``) is stored like a chat JSON answer; an error body
(``"type": "error"``) never is. Credentials come in ``x-api-key`` (or ``Authorization``).

Usage: ``input_tokens`` counts only the input read afresh, so the input in the one shape adds
``cache_read_input_tokens`` and ``cache_creation_input_tokens``; the cached count is the tokens
read from the prompt cache. ``message_delta`` carries the cumulative ``output_tokens``.
"""

from __future__ import annotations

import json

from tproxy.core.assemble import DEFAULT_MAX_CHARS
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

__all__ = ["ANTHROPIC_MESSAGES", "MessagesAssembler", "MessagesCompletion", "messages_usage"]


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _Counts:
    """The running token counts of one answer; later reports replace earlier ones."""

    __slots__ = ("cache_creation", "cache_read", "input", "output")

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_creation: int | None = None

    def take(self, usage: object) -> dict[str, int] | None:
        if not isinstance(usage, dict):
            return None
        for name, field in (
            ("input_tokens", "input"),
            ("output_tokens", "output"),
            ("cache_read_input_tokens", "cache_read"),
            ("cache_creation_input_tokens", "cache_creation"),
        ):
            value = _count(usage.get(name))
            if value is not None:
                setattr(self, field, value)
        total_input = None
        if self.input is not None:
            total_input = self.input + (self.cache_read or 0) + (self.cache_creation or 0)
        return usage_counts(total_input, self.output, self.cache_read)


def messages_usage(document: object) -> dict[str, int] | None:
    """The counts of a whole message's ``usage``."""
    return _Counts().take(member(document, "usage"))


def _kind(name: str, payload: dict[str, object]) -> str:
    kind = payload.get("type")
    return kind if isinstance(kind, str) else name


class MessagesCompletion(EndMarkerCompletion):
    """Ended by ``message_stop``; see the module."""

    __slots__ = ("_counts",)
    marker = "message_stop"

    def __init__(self) -> None:
        super().__init__()
        self._counts = _Counts()

    def _take(self, name: str, payload: dict[str, object]) -> None:
        kind = _kind(name, payload)
        if name == "error" or kind == "error":
            self._fail("error event", payload)
        elif kind == "message_start":
            self._count(self._counts.take(member(payload, "message", "usage")))
        elif kind == "message_delta":
            self._count(self._counts.take(payload.get("usage")))
        elif kind == "message_stop":
            self._end("message_stop")


def judge_messages_json(status: int, body: bytes) -> JsonVerdict:
    outcome, reason, usage, document = judge_json_object(status, body, messages_usage)
    if document is not None and document.get("type") not in (None, "message"):
        return StreamOutcome.INCOMPLETE, f"type {str(document.get('type'))[:40]}", usage
    return outcome, reason, usage


class MessagesAssembler(TextAssembler):
    """Text blocks, tool_use blocks, the stop reason and usage of a Messages answer."""

    __slots__ = ("_counts",)

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        super().__init__(max_chars)
        self._counts = _Counts()

    def _take(self, name: str, payload: dict[str, object]) -> None:
        kind = _kind(name, payload)
        index = payload.get("index")
        if kind == "message_start":
            message = payload.get("message")
            self._note(model=member(message, "model"), id=member(message, "id"))
            self._note_usage(self._counts.take(member(message, "usage")))
        elif kind == "content_block_start":
            block = payload.get("content_block")
            if member(block, "type") == "tool_use":
                self._append_call(index, member(block, "id"), member(block, "name"), None)
            else:
                self._append_text(member(block, "text"))
        elif kind == "content_block_delta":
            delta = payload.get("delta")
            if member(delta, "type") == "input_json_delta":
                self._append_call(index, None, None, member(delta, "partial_json"))
            else:
                self._append_text(member(delta, "text"))
        elif kind == "message_delta":
            self._note(reason=member(payload, "delta", "stop_reason"))
            self._note_usage(self._counts.take(payload.get("usage")))
        elif kind == "message_stop":
            self._finish()
        elif kind == "error" or name == "error":
            self._note_error("error event", payload)

    def _take_whole(self, payload: dict[str, object]) -> None:
        self._note(model=payload.get("model"), id=payload.get("id"))
        self._note(reason=payload.get("stop_reason"))
        self._note_usage(messages_usage(payload))
        content = payload.get("content")
        for position, block in enumerate(content if isinstance(content, list) else []):
            if member(block, "type") == "tool_use":
                arguments = json.dumps(member(block, "input"))
                self._append_call(position, member(block, "id"), member(block, "name"), arguments)
            elif member(block, "type") == "text":
                self._append_text(member(block, "text"))


ANTHROPIC_MESSAGES = Dialect(
    name="anthropic-messages",
    paths=("/v1/messages",),
    endings=("/messages",),
    framing=Framing.SSE,
    completion=MessagesCompletion,
    judge_json=judge_messages_json,
    assembler=MessagesAssembler,
    whole_answer=MessagesAssembler.whole,
    credential_headers=(b"x-api-key", b"authorization"),
)
