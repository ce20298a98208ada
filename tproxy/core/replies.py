"""Answers the proxy writes itself, in the shape OpenAI-compatible clients understand."""

from __future__ import annotations

import json

from tproxy.core.errors import RequestRejected, UpstreamError, UpstreamTimeout

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


def rejection_for(error: UpstreamError) -> RequestRejected:
    """The error answer for an upstream failure that happened before any response started."""
    if isinstance(error, UpstreamTimeout):
        return RequestRejected(504, f"upstream_timeout_{error.phase}", str(error))
    return RequestRejected(502, "upstream_unavailable", str(error))
