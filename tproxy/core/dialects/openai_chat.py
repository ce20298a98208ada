"""OpenAI chat completions, completions and embeddings: the family tproxy cached first.

Paths ``/v1/chat/completions``, ``/v1/completions`` (SSE with ``stream: true``) and
``/v1/embeddings`` (JSON only). The completion check is
:class:`~tproxy.core.completion.StreamCompletion`, unchanged: ``data: [DONE]``, or a final
``finish_reason`` for upstreams that send no ``[DONE]``; an ``error`` event or an ``error`` member
is never stored. The payload log's answer is :class:`~tproxy.core.assemble.StreamAssembler`'s.
Usage is the upstream's own ``usage`` (already in the one shape), plus ``cached_tokens`` from
``prompt_tokens_details`` when it is reported.
"""

from __future__ import annotations

from tproxy.core.assemble import normalise_usage
from tproxy.core.completion import StreamCompletion, StreamOutcome, json_answer_verdict
from tproxy.core.dialects.base import Dialect, Framing, JsonVerdict, member
from tproxy.core.sse import ServerSentEvent

__all__ = ["OPENAI_CHAT", "ChatCompletion", "chat_usage"]


def chat_usage(usage: object) -> dict[str, int] | None:
    """An OpenAI ``usage`` object's counts, with the cached prompt tokens when reported."""
    counts = normalise_usage(usage)
    cached = member(usage, "prompt_tokens_details", "cached_tokens")
    if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
        counts = {**(counts or {}), "cached_tokens": cached}
    return counts


class ChatCompletion:
    """:class:`~tproxy.core.completion.StreamCompletion` behind the dialects' interface."""

    __slots__ = ("_stream",)

    def __init__(self) -> None:
        self._stream = StreamCompletion()

    @property
    def ended(self) -> bool:
        return self._stream.ended

    @property
    def usage(self) -> dict[str, int] | None:
        return chat_usage(self._stream.usage)

    def observe(self, event: ServerSentEvent) -> None:
        self._stream.observe(event)

    def verdict(self, clean_end: bool) -> tuple[StreamOutcome, str]:
        return self._stream.verdict(clean_end)


def judge_chat_json(status: int, body: bytes) -> JsonVerdict:
    outcome, reason, usage = json_answer_verdict(status, body)
    return outcome, reason, chat_usage(usage)


OPENAI_CHAT = Dialect(
    name="openai-chat",
    paths=("/v1/chat/completions", "/v1/completions", "/v1/embeddings"),
    endings=("/chat/completions", "/completions", "/embeddings"),
    framing=Framing.SSE,
    completion=ChatCompletion,
    judge_json=judge_chat_json,
    credential_headers=(b"authorization", b"api-key"),
)
