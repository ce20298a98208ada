"""API families ("dialects"): what tproxy knows of each, and which request path belongs to which.

Each module describes one family with a :class:`~tproxy.core.dialects.base.Dialect` value:
OpenAI chat/completions/embeddings, OpenAI Responses, Anthropic Messages, Ollama (and its
embeddings), llama.cpp's native ``/completion``, rerank. Adding a family is adding a module and
listing its dialect in :data:`DIALECTS`. The families' paths, in this order, are the default
``cache.paths``.

A path a user adds to ``cache.paths`` belongs to the family whose path ending it has, the longest
first (``/openai/deployments/NAME/chat/completions`` is OpenAI chat, ``/ollama/api/chat`` is
Ollama). A path no family claims gets :data:`JSON_ONLY`: its answers are cached only when they are
one whole JSON object (status 200, no ``error``); a streamed answer there is passed through and
never stored, since nothing says how it ends.

:data:`CREDENTIAL_HEADERS` are every request header that carries a client's credential for one
of the families (and Gemini's ``x-goog-api-key``): the cache's tenant is derived from all of them
on every path, so a client never receives an answer stored for another key, whichever header
carried it.
"""

from __future__ import annotations

from types import MappingProxyType

from tproxy.core.dialects.anthropic_messages import ANTHROPIC_MESSAGES
from tproxy.core.dialects.base import Dialect, Framing
from tproxy.core.dialects.llamacpp import LLAMACPP_COMPLETION
from tproxy.core.dialects.ollama import OLLAMA, OLLAMA_EMBEDDINGS
from tproxy.core.dialects.openai_chat import OPENAI_CHAT, judge_chat_json
from tproxy.core.dialects.openai_responses import OPENAI_RESPONSES
from tproxy.core.dialects.rerank import RERANK

__all__ = [
    "CREDENTIAL_HEADERS",
    "DEFAULT_PATHS",
    "DIALECTS",
    "JSON_ONLY",
    "Dialect",
    "Framing",
    "dialect_for",
]

DIALECTS: tuple[Dialect, ...] = (
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    ANTHROPIC_MESSAGES,
    OLLAMA,
    OLLAMA_EMBEDDINGS,
    LLAMACPP_COMPLETION,
    RERANK,
)

JSON_ONLY = Dialect(
    name="json",
    paths=(),
    endings=(),
    framing=None,
    completion=None,
    judge_json=judge_chat_json,
)

DEFAULT_PATHS: tuple[str, ...] = tuple(path for dialect in DIALECTS for path in dialect.paths)

# The order is part of the tenant namespace's hash: append, never reorder.
CREDENTIAL_HEADERS: tuple[bytes, ...] = (
    b"authorization",
    b"api-key",
    b"x-api-key",
    b"x-goog-api-key",
)

_BY_PATH = MappingProxyType({path: dialect for dialect in DIALECTS for path in dialect.paths})
_BY_ENDING = tuple(
    sorted(
        ((ending, dialect) for dialect in DIALECTS for ending in dialect.endings),
        key=lambda pair: -len(pair[0]),
    )
)


def dialect_for(path: str) -> Dialect:
    """The dialect of a request path (without its query): the family that lists it, else the one
    whose ending it has (the longest), else :data:`JSON_ONLY`."""
    exact = _BY_PATH.get(path)
    if exact is not None:
        return exact
    for ending, dialect in _BY_ENDING:
        if path.endswith(ending):
            return dialect
    return JSON_ONLY
