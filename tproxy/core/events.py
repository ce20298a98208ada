"""The facts the I/O layer reports about one exchange.

The I/O code never decides what state a request is in: it observes something ("the upstream sent
its headers", "the client went away") and reports it as one of these frozen values. The exchange
state machine in :mod:`tproxy.core.exchange` decides what the fact means.
"""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.core.cachestatus import CacheStatus


@dataclass(frozen=True, slots=True)
class Rejected:
    """The proxy answered the request itself with an error (bad input, no route, too large)."""

    status: int
    code: str


@dataclass(frozen=True, slots=True)
class Identified:
    """The request was read and routed; ``tenant`` says whose it is: a hash of the client's
    credential, never the credential. Accounting that arrives as a fact: the state stays
    ``received``."""

    tenant: str


@dataclass(frozen=True, slots=True)
class Classified:
    """The cache has said what it does with the request: the model it names, and the
    ``Cache-Status`` its answer carries. Accounting that arrives as a fact: the state stays
    ``received``."""

    model: str | None
    cache_status: CacheStatus


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A stored answer was found and is being replayed; ``age`` is in seconds."""

    age: float


@dataclass(frozen=True, slots=True)
class UpstreamRequested:
    """The request was sent to an upstream; ``attempt`` counts from 1 (retries add one)."""

    upstream: str
    attempt: int


@dataclass(frozen=True, slots=True)
class JoinedFlight:
    """An identical request was already in flight; this one follows it instead of going upstream."""


@dataclass(frozen=True, slots=True)
class FollowerJoined:
    """An identical request joined the flight this exchange opened (accounting: no state moves)."""


@dataclass(frozen=True, slots=True)
class FellBehind:
    """The client read so slowly that the flight could not hold what it had yet to read."""


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """The upstream's response status and headers arrived (the headers as it sent them, for the
    writers that relay them; the exchange records only the status)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class AnswerDelivered:
    """The client is being sent the last byte of a whole answer: its API family's end marker
    (``data: [DONE]``), or every byte its ``Content-Length`` announced. The upstream's own end of
    body may not have been read yet; a client that leaves from here on has not left early."""


@dataclass(frozen=True, slots=True)
class UpstreamEnded:
    """The upstream's body ended cleanly: every byte it meant to send has arrived."""


@dataclass(frozen=True, slots=True)
class ResponseFinished:
    """The last byte of the response was handed to the client and the response closed cleanly."""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The upstream could not be reached, or its response broke; ``reason`` says how.

    ``answered`` is the status of the error answer the proxy sent in its place (502) when the
    failure came before the response started; None when the client had the upstream's status.
    """

    reason: str
    answered: int | None = None


@dataclass(frozen=True, slots=True)
class TimedOut:
    """A deadline passed; ``phase`` is ``connect``, ``first_byte``, ``idle`` or ``total``.

    ``answered`` is the status of the error answer the proxy sent (504) when the deadline passed
    before the response started; None when the client had the upstream's status.
    """

    phase: str
    answered: int | None = None


@dataclass(frozen=True, slots=True)
class ClientGone:
    """The client disconnected (Hypercorn's ``http.disconnect``): early, unless it already had
    its whole answer (:class:`AnswerDelivered`)."""


@dataclass(frozen=True, slots=True)
class ShutDown:
    """The server is stopping and cut this exchange short."""


@dataclass(frozen=True, slots=True)
class InternalError:
    """An unexpected exception ended this exchange (a bug, ours or a library's); ``reason`` is
    its type. It is still an end, reached once, so the request is accounted for."""

    reason: str


Fact = (
    Rejected
    | Identified
    | Classified
    | CacheHit
    | UpstreamRequested
    | JoinedFlight
    | FollowerJoined
    | FellBehind
    | HeadersReceived
    | AnswerDelivered
    | UpstreamEnded
    | ResponseFinished
    | UpstreamFailed
    | TimedOut
    | ClientGone
    | ShutDown
    | InternalError
)
