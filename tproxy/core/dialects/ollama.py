"""Ollama's native API: NDJSON streams from ``/api/chat`` and ``/api/generate``.

Requests stream unless they say ``"stream": false``. A streamed answer is
``application/x-ndjson``, one JSON object per line; the last line has ``"done": true`` (with
``done_reason`` and the counts). A line with an ``error`` member (Ollama reports a failure met
mid-stream that way) is never stored, nor is a stream without its ``done`` line, with lines after
it, or with a line that is not a JSON object. A whole answer is one object with ``"done": true``.

``/api/embed`` and ``/api/embeddings`` answer JSON only: a second dialect, same module.

Usage: ``prompt_eval_count`` (input) and ``eval_count`` (output); Ollama reports no cached count.
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

__all__ = ["OLLAMA", "OLLAMA_EMBEDDINGS", "OllamaAssembler", "OllamaCompletion", "ollama_usage"]


def ollama_usage(document: dict[str, object]) -> dict[str, int] | None:
    return usage_counts(document.get("prompt_eval_count"), document.get("eval_count"))


class OllamaCompletion(EndMarkerCompletion):
    """Ended by the line with ``"done": true``; see the module."""

    __slots__ = ()
    marker = '"done": true'

    def _take(self, name: str, payload: dict[str, object]) -> None:
        if payload.get("error") is not None:
            self._fail("error in line", payload)
        elif payload.get("done") is True:
            reason = payload.get("done_reason")
            self._count(ollama_usage(payload))
            self._end("done" + (f" ({reason[:40]})" if isinstance(reason, str) else ""))


def judge_ollama_json(status: int, body: bytes) -> JsonVerdict:
    outcome, reason, usage, document = judge_json_object(status, body, ollama_usage)
    if document is not None and document.get("done") is False:
        return StreamOutcome.INCOMPLETE, '"done": false', usage
    return outcome, reason, usage


class OllamaAssembler(TextAssembler):
    """The text (``message.content`` or ``response``), tool calls, done reason and counts."""

    __slots__ = ()

    def _take(self, name: str, payload: dict[str, object]) -> None:
        self._take_whole(payload)

    def _take_whole(self, payload: dict[str, object]) -> None:
        if payload.get("error") is not None:
            self._note_error("error in line", payload)
        self._note(model=payload.get("model"), reason=payload.get("done_reason"))
        message = payload.get("message")
        self._append_text(member(message, "content"))
        self._append_text(payload.get("response"))
        calls = member(message, "tool_calls")
        for call in calls if isinstance(calls, list) else []:
            function = member(call, "function")
            arguments = member(function, "arguments")
            self._append_call(
                len(self._calls), member(call, "id"), member(function, "name"), str(arguments)
            )
        if payload.get("done") is True:
            self._note_usage(ollama_usage(payload))
            self._finish()


OLLAMA = Dialect(
    name="ollama",
    paths=("/api/chat", "/api/generate"),
    endings=("/api/chat", "/api/generate"),
    framing=Framing.NDJSON,
    completion=OllamaCompletion,
    judge_json=judge_ollama_json,
    assembler=OllamaAssembler,
    whole_answer=OllamaAssembler.whole,
    stream_by_default=True,
)

OLLAMA_EMBEDDINGS = Dialect(
    name="ollama-embeddings",
    paths=("/api/embed", "/api/embeddings"),
    endings=("/api/embed", "/api/embeddings"),
    framing=None,
    completion=None,
    judge_json=judge_ollama_json,
)
