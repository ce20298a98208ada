"""Did an OpenAI-style answer end cleanly? The cache stores only answers that did.

Theory of operation. ``StreamCompletion`` watches the dispatched events of one stream, in order,
and keeps a few facts: whether ``data: [DONE]`` arrived, whether anything came after it, whether
the upstream reported an error in band, which choices are still open, and the last ``usage`` and
``model`` seen (for logs). ``verdict()`` turns those facts into a ``StreamOutcome`` and a reason
a person can read. ``json_answer_verdict()`` does the same for a non-streamed answer.

A stream is COMPLETE when the HTTP body ended cleanly, no error was reported, and either
``[DONE]`` arrived or, for upstreams that send no ``[DONE]``, the last chunk with choices carried
a ``finish_reason`` and every choice seen has finished. A trailing chunk without choices (the
``usage`` chunk OpenAI sends with ``stream_options.include_usage``) does not hide that finish.

Upstream bodies are untrusted: nothing here raises on any input.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from tproxy.core.sse import ServerSentEvent

__all__ = ["StreamCompletion", "StreamOutcome", "json_answer_verdict"]

_MAX_REASON_CHARS = 200


class StreamOutcome(Enum):
    """How an answer ended. Only COMPLETE answers may be cached."""

    COMPLETE = "complete"  # ended cleanly with an end marker; safe to replay
    INCOMPLETE = "incomplete"  # cut short, no end marker, or suspicious data after the end
    ERROR = "error"  # the upstream reported an error (in band, or by status for JSON answers)


class StreamCompletion:
    """Fed with each dispatched ServerSentEvent of an OpenAI-compatible stream, in order."""

    __slots__ = (
        "_after_done",
        "_done",
        "_error",
        "_finished",
        "_last_finished",
        "_open",
        "model",
        "usage",
    )

    def __init__(self) -> None:
        self.usage: dict[str, object] | None = None  # the last ``usage`` object seen
        self.model: str | None = None  # the last ``model`` string seen
        self._done = False
        self._after_done = 0  # events that arrived after [DONE]
        self._error: str | None = None  # reason for the first error seen
        self._last_finished = False  # the last chunk with choices carried a finish_reason
        self._open: set[object] = set()  # choice indexes seen without a finish_reason yet
        self._finished: set[object] = set()

    def observe(self, event: ServerSentEvent) -> None:
        """Take the next event of the stream. Never raises."""
        if self._done:
            self._after_done += 1
        if event.event == "error":
            self._note_error("error event", parse_json(event.data))
            return
        if event.data.strip() == "[DONE]":
            self._done = True
            return
        payload = parse_json(event.data)
        if not isinstance(payload, dict):
            self._last_finished = False  # opaque data: no finish_reason seen from it
            return
        if payload.get("error") is not None:
            self._note_error("error in data", payload)
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        model = payload.get("model")
        if isinstance(model, str):
            self.model = model
        choices = payload.get("choices")
        if isinstance(choices, list) and choices:
            self._observe_choices(choices)

    @property
    def ended(self) -> bool:
        """Whether the answer is whole: ``[DONE]`` arrived, or a last ``finish_reason`` closed
        every choice (upstreams that send no ``[DONE]``). From then on a client that leaves has
        its answer, whatever the upstream's body still has to end."""
        return self._done or (self._last_finished and not self._open)

    def verdict(self, clean_end: bool) -> tuple[StreamOutcome, str]:
        """Judge the stream so far; ``clean_end`` says whether the HTTP body ended cleanly.

        The order matters: an error outranks everything, then an unclean end, then data after
        ``[DONE]``; only then does an end marker make the stream COMPLETE.
        """
        if self._error is not None:
            return StreamOutcome.ERROR, self._error
        if not clean_end:
            return StreamOutcome.INCOMPLETE, "upstream ended uncleanly"
        if self._after_done:
            return StreamOutcome.INCOMPLETE, f"{self._after_done} event(s) after [DONE]"
        if self._done:
            return StreamOutcome.COMPLETE, "[DONE]"
        if self._last_finished and not self._open:
            return StreamOutcome.COMPLETE, "finish_reason without [DONE]"
        if self._last_finished:
            return StreamOutcome.INCOMPLETE, "no [DONE] and a choice without finish_reason"
        return StreamOutcome.INCOMPLETE, "no [DONE] and no finish_reason"

    def _observe_choices(self, choices: list[Any]) -> None:
        finished_here = False
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)
            key: object = index if isinstance(index, int | str) else position
            if choice.get("finish_reason") is not None:
                finished_here = True
                self._open.discard(key)
                self._finished.add(key)
            elif key not in self._finished:
                self._open.add(key)
        self._last_finished = finished_here

    def _note_error(self, what: str, payload: object) -> None:
        if self._error is None:
            message = error_message(payload)
            self._error = f"{what}: {message}" if message else what


def json_answer_verdict(
    status: int, body: bytes
) -> tuple[StreamOutcome, str, dict[str, object] | None]:
    """Judge a non-streamed answer: COMPLETE iff status 200 and a JSON object without an error.

    Returns the outcome, a reason, and the answer's ``usage`` object when it has one. An
    ``"error": null`` member is not an error. Never raises.
    """
    payload = parse_json(body)
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else None
    if status != 200:
        message = error_message(payload)
        return StreamOutcome.ERROR, f"status {status}" + (f": {message}" if message else ""), usage
    if not isinstance(payload, dict):
        return StreamOutcome.INCOMPLETE, "body is not a JSON object", usage
    if payload.get("error") is not None:
        message = error_message(payload)
        return StreamOutcome.ERROR, "error in body" + (f": {message}" if message else ""), usage
    return StreamOutcome.COMPLETE, "JSON object", usage


def parse_json(text: str | bytes) -> object:
    """The JSON value of ``text``, or None when it is not JSON (or too deep to parse).

    Shared with :mod:`tproxy.core.assemble`: both read upstream JSON that may be anything.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def error_message(payload: object) -> str:
    """A short human message from an OpenAI-style error body, or "" if it has none."""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    if not isinstance(error, str):
        return ""
    return error[:_MAX_REASON_CHARS]
