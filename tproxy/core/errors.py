"""The exception tree of tproxy, drawn once so every layer raises from the same family.

TproxyError
├── ConfigError              a settings file or flag is wrong; carries every problem found
├── IllegalTransition        the exchange lifecycle refused a fact (a bug, never user input)
├── RequestRejected          the client's request cannot be served; maps to a 4xx/5xx answer
├── UpstreamError            the upstream failed us
│   ├── UpstreamConnectError     no connection could be made           -> 502
│   ├── UpstreamTimeout          a deadline passed                      -> 504 before headers
│   └── UpstreamBroken           the response broke after it started    -> truncated body
└── StoreError               the cache store failed
    └── CorruptEntry             a stored entry cannot be decoded
"""

from __future__ import annotations


class TproxyError(Exception):
    """Base of every exception tproxy raises on purpose."""


class ConfigError(TproxyError):
    """Settings are invalid. ``problems`` lists each one as ``file: key.path: what is wrong``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class IllegalTransition(TproxyError):
    """A fact arrived that the exchange's current state does not allow."""


class DecoderClosed(IllegalTransition):
    """An SSE decoder was fed, or closed, after it had been closed."""


class RequestRejected(TproxyError):
    """The request is refused with an OpenAI-style error body.

    ``status`` is the HTTP status, ``code`` a short machine-readable reason.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")


class UpstreamError(TproxyError):
    """The upstream did not give us a whole answer."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream: refused, unresolvable, or reset before any response."""


class UpstreamTimeout(UpstreamError):
    """A deadline passed: ``phase`` is ``connect``, ``first_byte``, ``idle`` or ``total``."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        super().__init__(f"upstream timed out ({phase})")


class UpstreamBroken(UpstreamError):
    """The upstream's response ended abnormally after it had started."""


class StoreError(TproxyError):
    """The cache store could not do what was asked."""


class CorruptEntry(StoreError):
    """A stored entry failed to decode; it is treated as a miss and removed."""


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a (possibly nested) group: Trio's nurseries wrap what they raise."""
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(leaf_errors(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found
