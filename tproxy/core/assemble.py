"""Put an OpenAI-style answer back together for the payload log and the access log.

Theory of operation. A streamed chat or completions answer arrives as many small chunks: each
carries a piece of one choice's text (``delta.content`` for chat, ``text`` for completions), a
piece of a tool call's arguments, a ``finish_reason``, or the ``usage`` object. A person auditing
an exchange wants the answer as a whole. :class:`StreamAssembler` is fed each dispatched
:class:`~tproxy.core.sse.ServerSentEvent` in order and keeps, per choice index, the concatenated
text (and reasoning text, as vLLM and DeepSeek send it), the role, the finish reason, and the
tool calls merged by their own index with their argument pieces concatenated; plus the last
``usage``, ``model`` and ``id`` seen, whether ``[DONE]`` arrived, and the first error reported in
band. :func:`assemble_json` gives the same :class:`Answer` for a non-streamed body.

Upstream bodies are untrusted: nothing here raises on any input, and memory is bounded. Text,
reasoning and arguments together keep at most ``max_chars`` characters (the rest is dropped and
``truncated`` says so); at most :data:`MAX_CHOICES` choices and :data:`MAX_TOOL_CALLS` tool calls
per choice are kept. ``usage`` is reduced to its top-level integer members (``prompt_tokens``,
``completion_tokens``, ``total_tokens``, ...), so a log line stays small whatever the upstream
sends.

The access log's usage of a stream is read by each API family's completion check
(:mod:`tproxy.core.dialects`), which the upstream reader feeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tproxy.core.completion import error_message, parse_json
from tproxy.core.sse import ServerSentEvent

__all__ = [
    "Answer",
    "Choice",
    "StreamAssembler",
    "ToolCall",
    "assemble_events",
    "assemble_json",
    "json_usage",
    "normalise_usage",
]

MAX_CHOICES = 128
MAX_TOOL_CALLS = 128
DEFAULT_MAX_CHARS = 1 << 20
_MAX_USAGE_MEMBERS = 16
_MAX_NAME_CHARS = 256  # ids, names, roles, finish reasons, models: never long in a real answer


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of a choice; ``arguments`` is every piece of it, concatenated."""

    index: int
    id: str | None
    type: str | None
    name: str | None
    arguments: str

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "arguments": self.arguments,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of an answer, whole."""

    index: int
    role: str | None
    text: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str | None

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {
            "index": self.index,
            "role": self.role,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }
        if self.reasoning:
            document["reasoning"] = self.reasoning
        if self.tool_calls:
            document["tool_calls"] = [call.to_json() for call in self.tool_calls]
        return document


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer as a whole. ``events`` counts the events seen (0 for a JSON answer)."""

    id: str | None
    model: str | None
    choices: tuple[Choice, ...]
    usage: dict[str, int] | None
    error: str | None
    done: bool
    events: int
    truncated: bool

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form, the one the payload log writes."""
        return {
            "id": self.id,
            "model": self.model,
            "choices": [choice.to_json() for choice in self.choices],
            "usage": self.usage,
            "error": self.error,
            "done": self.done,
            "events": self.events,
            "truncated": self.truncated,
        }


class _ToolCallParts:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class _ChoiceParts:
    __slots__ = ("finish_reason", "reasoning", "role", "text", "tool_calls")

    def __init__(self) -> None:
        self.role: str | None = None
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, _ToolCallParts] = {}
        self.finish_reason: str | None = None


class StreamAssembler:
    """Fed each event of one stream in order; :meth:`result` is the answer so far. Never raises."""

    __slots__ = ("_budget", "_choices", "_done", "_error", "_events", "_id", "_model", "_usage")

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self._budget = _Budget(max_chars)
        self._choices: dict[int, _ChoiceParts] = {}
        self._usage: dict[str, int] | None = None
        self._model: str | None = None
        self._id: str | None = None
        self._error: str | None = None
        self._done = False
        self._events = 0

    def feed(self, event: ServerSentEvent) -> None:
        """Take the next event of the stream."""
        self._events += 1
        if event.event == "error":
            self._note_error(parse_json(event.data), "error event")
            return
        if event.data.strip() == "[DONE]":
            self._done = True
            return
        payload = parse_json(event.data)
        if isinstance(payload, dict):
            self._take(payload, streamed=True)

    def result(self) -> Answer:
        """The answer assembled from what was fed so far."""
        return Answer(
            id=self._id,
            model=self._model,
            choices=tuple(_choice(index, parts) for index, parts in sorted(self._choices.items())),
            usage=self._usage,
            error=self._error,
            done=self._done,
            events=self._events,
            truncated=self._budget.exhausted,
        )

    def _take(self, payload: dict[str, Any], *, streamed: bool) -> None:
        if payload.get("error") is not None:
            self._note_error(payload, "error in data")
        usage = normalise_usage(payload.get("usage"))
        if usage is not None:
            self._usage = usage
        self._model = _short(payload.get("model")) or self._model
        self._id = _short(payload.get("id")) or self._id
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            parts = self._choice(_index(choice.get("index"), position))
            if parts is None:
                continue
            reason = _short(choice.get("finish_reason"))
            if reason is not None:
                parts.finish_reason = reason
            message = choice.get("delta" if streamed else "message")
            if isinstance(message, dict):
                self._take_message(parts, message)
            self._append(parts.text, choice.get("text"))

    def _take_message(self, parts: _ChoiceParts, message: dict[str, Any]) -> None:
        parts.role = _short(message.get("role")) or parts.role
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    self._append(parts.text, part.get("text"))
        else:
            self._append(parts.text, content)
        self._append(parts.reasoning, message.get("reasoning_content"))
        self._append(parts.reasoning, message.get("reasoning"))
        calls = message.get("tool_calls")
        if not isinstance(calls, list):
            return
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            index = _index(call.get("index"), position)
            merged = parts.tool_calls.get(index)
            if merged is None:
                if len(parts.tool_calls) >= MAX_TOOL_CALLS:
                    self._budget.exhausted = True
                    continue
                merged = parts.tool_calls[index] = _ToolCallParts()
            merged.id = merged.id or _short(call.get("id"))
            merged.type = merged.type or _short(call.get("type"))
            function = call.get("function")
            if isinstance(function, dict):
                merged.name = merged.name or _short(function.get("name"))
                self._append(merged.arguments, function.get("arguments"))

    def _choice(self, index: int) -> _ChoiceParts | None:
        parts = self._choices.get(index)
        if parts is None:
            if len(self._choices) >= MAX_CHOICES:
                self._budget.exhausted = True
                return None
            parts = self._choices[index] = _ChoiceParts()
        return parts

    def _append(self, pieces: list[str], value: object) -> None:
        if isinstance(value, str) and value:
            kept = self._budget.take(value)
            if kept:
                pieces.append(kept)

    def _note_error(self, payload: object, what: str) -> None:
        if self._error is None:
            message = error_message(payload)
            self._error = f"{what}: {message}" if message else what


class _Budget:
    """How many more characters may be kept."""

    __slots__ = ("exhausted", "left")

    def __init__(self, max_chars: int) -> None:
        self.left = max(0, max_chars)
        self.exhausted = False

    def take(self, text: str) -> str:
        if len(text) > self.left:
            self.exhausted = True
            text = text[: self.left]
        self.left -= len(text)
        return text


def assemble_events(
    events: Iterable[ServerSentEvent], max_chars: int = DEFAULT_MAX_CHARS
) -> Answer:
    """The answer of a whole stream of events."""
    assembler = StreamAssembler(max_chars)
    for event in events:
        assembler.feed(event)
    return assembler.result()


def assemble_json(body: bytes, max_chars: int = DEFAULT_MAX_CHARS) -> Answer:
    """The answer of a non-streamed body (chat ``message``, completions ``text``). Never raises.

    A body that is not a JSON object gives an answer without choices; ``done`` is true when the
    body is a JSON object.
    """
    assembler = StreamAssembler(max_chars)
    payload = parse_json(body)
    if isinstance(payload, dict):
        assembler._take(payload, streamed=False)
    answer = assembler.result()
    return Answer(
        id=answer.id,
        model=answer.model,
        choices=answer.choices,
        usage=answer.usage,
        error=answer.error,
        done=isinstance(payload, dict),
        events=0,
        truncated=answer.truncated,
    )


def json_usage(body: bytes) -> dict[str, int] | None:
    """The ``usage`` of a non-streamed answer, reduced by :func:`normalise_usage`."""
    payload = parse_json(body)
    return normalise_usage(payload.get("usage")) if isinstance(payload, dict) else None


def normalise_usage(usage: object) -> dict[str, int] | None:
    """The top-level non-negative integer members of a ``usage`` object; None if there are none.

    Nested details (``prompt_tokens_details``) and anything that is not a count are left out.
    """
    if not isinstance(usage, Mapping):  # a dict parsed now, or a stored entry's read-only usage
        return None
    counts: dict[str, int] = {}
    for name, value in usage.items():
        if len(counts) >= _MAX_USAGE_MEMBERS:
            break
        if (
            isinstance(name, str)
            and len(name) <= 64
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value >= 0
        ):
            counts[name] = value
    return counts or None


def _choice(index: int, parts: _ChoiceParts) -> Choice:
    return Choice(
        index=index,
        role=parts.role,
        text="".join(parts.text),
        reasoning="".join(parts.reasoning),
        tool_calls=tuple(
            ToolCall(
                index=call_index,
                id=call.id,
                type=call.type,
                name=call.name,
                arguments="".join(call.arguments),
            )
            for call_index, call in sorted(parts.tool_calls.items())
        ),
        finish_reason=parts.finish_reason,
    )


def _index(value: object, position: int) -> int:
    """A choice's or tool call's index: the one it states, or its position in the list."""
    return value if isinstance(value, int) and not isinstance(value, bool) else position


def _short(value: object) -> str | None:
    """A non-empty string, cut to a sane length; None for anything else."""
    if isinstance(value, str) and value:
        return value[:_MAX_NAME_CHARS]
    return None
