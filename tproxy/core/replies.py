"""Answers the proxy writes itself, in the shape OpenAI-compatible clients understand."""

from __future__ import annotations

import json

from tproxy.core.errors import (
    RequestRejected,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, code: str, message: str) -> bytes:
    """``{"error": {"message", "type", "code"}}`` as the ``openai`` SDK expects to parse it."""
    error = {"message": message, "type": _ERROR_TYPES.get(status, "proxy_error"), "code": code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


# What a client is told when the upstream gave no answer, by the deadline that passed.
_TIMEOUT_MESSAGES = {
    "connect": "The proxy could not connect to the upstream server in time.",
    "first_byte": "The upstream server did not start its answer in time.",
    "idle": "The upstream server stopped sending its answer.",
    "total": "The upstream server did not finish its answer in time.",
}


def rejection_for(error: UpstreamError) -> RequestRejected:
    """The error answer for an upstream failure that happened before any response started.

    The message is a sentence for people, the same for every failure of a kind: the detail (an
    address, a library's exception) belongs in the access log's ``reason``, not in the body.
    """
    if isinstance(error, UpstreamTimeout):
        message = _TIMEOUT_MESSAGES.get(error.phase, "The upstream server did not answer in time.")
        return RequestRejected(504, f"upstream_timeout_{error.phase}", message)
    if isinstance(error, UpstreamConnectError):
        message = "The proxy could not connect to the upstream server."
    else:
        message = "The upstream server closed the connection without a complete answer."
    return RequestRejected(502, "upstream_unavailable", message)
