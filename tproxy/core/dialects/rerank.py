"""Rerank endpoints (``/v1/rerank``, ``/rerank``: llama.cpp, vLLM, TEI, Jina, Cohere's shape).

JSON only: a whole answer is stored when its status is 200 and it is a JSON object without an
``error`` member. Usage: ``usage.prompt_tokens`` (or ``usage.total_tokens``, all input) when the
server reports it.
"""

from __future__ import annotations

from tproxy.core.dialects.base import Dialect, json_judge, member, usage_counts

__all__ = ["RERANK", "rerank_usage"]


def rerank_usage(document: dict[str, object]) -> dict[str, int] | None:
    usage = document.get("usage")
    prompt = member(usage, "prompt_tokens")
    return usage_counts(prompt if prompt is not None else member(usage, "total_tokens"), None)


RERANK = Dialect(
    name="rerank",
    paths=("/v1/rerank", "/rerank"),
    endings=("/rerank",),
    framing=None,
    completion=None,
    judge_json=json_judge(rerank_usage),
)
