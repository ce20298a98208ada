"""llama.cpp's native ``/completion``: SSE ``data:`` lines, the last with ``"stop": true``.

``llama-server`` streams its native completion (``"stream": true``) as unnamed SSE events, each a
JSON object with a piece of ``content``; the last has ``"stop": true`` and the counts. An event
with an ``error`` member is never stored, nor is a stream without its ``stop`` event, with events
after it, or with data that is not a JSON object. A whole answer is one JSON object.

Usage: ``tokens_evaluated`` (input), ``tokens_predicted`` (output), ``tokens_cached`` (cached).
"""

from __future__ import annotations

from tproxy.core.dialects.base import (
    Dialect,
    EndMarkerCompletion,
    Framing,
    TextAssembler,
    json_judge,
    usage_counts,
)

__all__ = ["LLAMACPP_COMPLETION", "LlamaCppAssembler", "LlamaCppCompletion", "llamacpp_usage"]


def llamacpp_usage(document: dict[str, object]) -> dict[str, int] | None:
    return usage_counts(
        document.get("tokens_evaluated"),
        document.get("tokens_predicted"),
        document.get("tokens_cached"),
    )


class LlamaCppCompletion(EndMarkerCompletion):
    """Ended by the event with ``"stop": true``; see the module."""

    __slots__ = ()
    marker = '"stop": true'

    def _take(self, name: str, payload: dict[str, object]) -> None:
        if name == "error" or payload.get("error") is not None:
            self._fail("error in data", payload)
        elif payload.get("stop") is True:
            self._count(llamacpp_usage(payload))
            reason = payload.get("stop_type")
            self._end("stop" + (f" ({reason[:40]})" if isinstance(reason, str) else ""))


class LlamaCppAssembler(TextAssembler):
    """The ``content`` pieces, the stop type and the counts."""

    __slots__ = ()

    def _take(self, name: str, payload: dict[str, object]) -> None:
        self._take_whole(payload)

    def _take_whole(self, payload: dict[str, object]) -> None:
        if payload.get("error") is not None:
            self._note_error("error in data", payload)
        self._append_text(payload.get("content"))
        self._note(model=payload.get("model"))
        if payload.get("stop") is True:
            self._note(reason=payload.get("stop_type") or "stop")
            self._note_usage(llamacpp_usage(payload))
            self._finish()


LLAMACPP_COMPLETION = Dialect(
    name="llamacpp-completion",
    paths=("/completion",),
    endings=("/completion",),
    framing=Framing.SSE,
    completion=LlamaCppCompletion,
    judge_json=json_judge(llamacpp_usage),
    assembler=LlamaCppAssembler,
    whole_answer=LlamaCppAssembler.whole,
)
