"""The lifecycle of one request, as a table-driven state machine.

Theory of operation: an :class:`Exchange` starts in ``RECEIVED`` once the request has been read.
The I/O layer reports facts (:mod:`tproxy.core.events`); :meth:`Exchange.handle` looks the pair
``(state, type of fact)`` up in :data:`TRANSITIONS` and moves to the state it names. A pair that is
not in the table raises :class:`~tproxy.core.errors.IllegalTransition` and changes nothing.

Terminal states have no way out, so every exchange ends exactly once. The end of the upstream's
body moves ``STREAMING`` (or ``DELIVERED``) to ``UPSTREAM_DONE``, where a second ``UpstreamEnded``
is not in the table: processing a body twice after its end is impossible by construction, not by
care.

A client may have its whole answer before the upstream's body has ended: the openai SDK stops
reading at ``data: [DONE]`` and closes, curl closes once it has every byte a ``Content-Length``
announced. ``AnswerDelivered`` moves ``STREAMING`` to ``DELIVERED``, and there the client leaving
(``ClientGone``) completes the exchange: it did not leave early.

``FollowerJoined`` is accounting that arrives as a fact (another request joined the flight this
exchange opened): it leaves the state where it is, and counts in ``followers``. So are
``Identified`` (whose request: the tenant) and ``Classified`` (the model, the Cache-Status), told
before any answer starts and legal only in ``received``: nothing outside this module sets a field.
``JoinedFlight`` marks its Cache-Status ``collapsed``, which is where ``collapsed`` is read.

Counters (bytes, chunks, events) are accounting, not lifecycle: they are plain methods that do not
touch the state. Times are passed in by the caller (any monotonic clock), keeping this module pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from tproxy.core.cachestatus import CacheStatus
from tproxy.core.errors import IllegalTransition
from tproxy.core.events import (
    AnswerDelivered,
    CacheHit,
    Classified,
    ClientGone,
    Fact,
    FellBehind,
    FollowerJoined,
    HeadersReceived,
    Identified,
    InternalError,
    JoinedFlight,
    Rejected,
    ResponseFinished,
    ShutDown,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)


class State(Enum):
    """Where an exchange is. The last eight are terminal."""

    RECEIVED = "received"
    REPLAYING = "replaying"
    CONNECTING = "upstream_connecting"
    STREAMING = "streaming"
    DELIVERED = "delivered"
    UPSTREAM_DONE = "upstream_done"
    COMPLETED = "completed"
    REJECTED = "rejected"
    CLIENT_GONE = "client_gone"
    UPSTREAM_FAILED = "upstream_failed"
    TIMED_OUT = "timed_out"
    SHUT_DOWN = "shut_down"
    FELL_BEHIND = "fell_behind"
    INTERNAL_ERROR = "internal_error"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        State.COMPLETED,
        State.REJECTED,
        State.CLIENT_GONE,
        State.UPSTREAM_FAILED,
        State.TIMED_OUT,
        State.SHUT_DOWN,
        State.FELL_BEHIND,
        State.INTERNAL_ERROR,
    }
)

_LIVE = (
    State.RECEIVED,
    State.REPLAYING,
    State.CONNECTING,
    State.STREAMING,
    State.DELIVERED,
    State.UPSTREAM_DONE,
)
# Where the exchange that opened a flight can be when another request joins that flight.
_OPENING = (State.RECEIVED, State.CONNECTING, State.STREAMING, State.DELIVERED, State.UPSTREAM_DONE)

TRANSITIONS: dict[tuple[State, type[Fact]], State] = {
    (State.RECEIVED, Rejected): State.REJECTED,
    # Who asked, for which model, and what the cache does: known before any answer starts.
    (State.RECEIVED, Identified): State.RECEIVED,
    (State.RECEIVED, Classified): State.RECEIVED,
    (State.RECEIVED, CacheHit): State.REPLAYING,
    (State.RECEIVED, UpstreamRequested): State.CONNECTING,
    # A follower waits for the flight it joined exactly as a leader waits for its upstream.
    (State.RECEIVED, JoinedFlight): State.CONNECTING,
    # A retry on the next upstream of the route, before any response arrived.
    (State.CONNECTING, UpstreamRequested): State.CONNECTING,
    (State.CONNECTING, HeadersReceived): State.STREAMING,
    (State.CONNECTING, UpstreamFailed): State.UPSTREAM_FAILED,
    (State.CONNECTING, TimedOut): State.TIMED_OUT,
    (State.STREAMING, UpstreamEnded): State.UPSTREAM_DONE,
    (State.STREAMING, UpstreamFailed): State.UPSTREAM_FAILED,
    (State.STREAMING, TimedOut): State.TIMED_OUT,
    (State.STREAMING, AnswerDelivered): State.DELIVERED,
    (State.DELIVERED, UpstreamEnded): State.UPSTREAM_DONE,
    (State.DELIVERED, UpstreamFailed): State.UPSTREAM_FAILED,
    (State.DELIVERED, TimedOut): State.TIMED_OUT,
    (State.UPSTREAM_DONE, ResponseFinished): State.COMPLETED,
    (State.CONNECTING, FellBehind): State.FELL_BEHIND,
    (State.STREAMING, FellBehind): State.FELL_BEHIND,
    (State.DELIVERED, FellBehind): State.FELL_BEHIND,
    (State.UPSTREAM_DONE, FellBehind): State.FELL_BEHIND,
    (State.REPLAYING, ResponseFinished): State.COMPLETED,
    **{(state, ClientGone): State.CLIENT_GONE for state in _LIVE if state is not State.DELIVERED},
    # The client had its whole answer: leaving now is the end of a finished exchange.
    (State.DELIVERED, ClientGone): State.COMPLETED,
    **{(state, FollowerJoined): state for state in _OPENING},
    **{(state, ShutDown): State.SHUT_DOWN for state in _LIVE},
    **{(state, InternalError): State.INTERNAL_ERROR for state in _LIVE},
}


@dataclass(slots=True)
class Exchange:
    """One request's life: its state, what happened when, and how much flowed.

    Raises :class:`IllegalTransition` from :meth:`handle` when a fact does not fit the state.
    """

    request_id: str
    started_at: float
    method: str = ""
    path: str = ""
    client: str | None = None
    state: State = State.RECEIVED
    model: str | None = None
    tenant: str | None = None  # a short hash of the client's credential, never the credential
    cache_status: CacheStatus | None = None
    followers: int = 0  # requests that joined the flight this one opened, in total
    upstream: str | None = None
    attempts: int = 0
    status: int | None = None
    reason: str | None = None
    headers_at: float | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    upstream_bytes: int = 0
    upstream_chunks: int = 0
    delivered_bytes: int = 0
    events: int = 0
    history: list[State] = field(default_factory=list)  # the states it left, in order

    @property
    def finished(self) -> bool:
        return self.state.terminal

    @property
    def collapsed(self) -> bool:
        """Whether it joined an identical request in flight, as its Cache-Status says."""
        return self.cache_status is not None and self.cache_status.collapsed

    def handle(self, fact: Fact, now: float) -> State:
        """Apply ``fact``; return the new state. Illegal facts raise and change nothing."""
        try:
            new_state = TRANSITIONS[self.state, type(fact)]
        except KeyError:
            raise IllegalTransition(
                f"exchange {self.request_id}: {type(fact).__name__} is not allowed in state "
                f"{self.state.value}"
            ) from None
        self._record(fact, now)
        if new_state is not self.state:
            self.history.append(self.state)
        self.state = new_state
        if new_state.terminal:
            self.ended_at = now
        return new_state

    def _record(self, fact: Fact, now: float) -> None:
        match fact:
            case UpstreamRequested(upstream=upstream, attempt=attempt):
                self.upstream = upstream
                self.attempts = attempt
            case HeadersReceived(status=status):
                self.status = status
                self.headers_at = now
            case Rejected(status=status, code=code):
                self.status = status
                self.reason = code
            case UpstreamFailed(reason=reason, answered=answered):
                self.reason = reason
                self._answered(answered)
            case InternalError(reason=reason):
                self.reason = reason
            case TimedOut(phase=phase, answered=answered):
                self.reason = f"timeout:{phase}"
                self._answered(answered)
            case Identified(tenant=tenant):
                self.tenant = tenant
            case Classified(model=model, cache_status=cache_status):
                self.model = model
                self.cache_status = cache_status
            case CacheHit():
                self.status = 200
                self.headers_at = now
            case JoinedFlight():
                if self.cache_status is not None:
                    self.cache_status = self.cache_status.joined()
            case FollowerJoined():
                self.followers += 1
            case _:
                pass

    def _answered(self, status: int | None) -> None:
        """The proxy answered with ``status`` in place of the upstream: that is what the client
        received, so that is the exchange's status."""
        if status is not None:
            self.status = status

    def note_upstream_chunk(self, size: int, now: float) -> None:
        """Count a chunk of the upstream's body (accounting only)."""
        if self.first_byte_at is None:
            self.first_byte_at = now
        self.upstream_chunks += 1
        self.upstream_bytes += size

    def note_delivered(self, size: int) -> None:
        """Count bytes handed to the client (accounting only)."""
        self.delivered_bytes += size

    def note_events(self, count: int) -> None:
        """Count server-sent events parsed from the upstream's body (accounting only)."""
        self.events += count


def describe_transitions() -> str:
    """The transition table as a Mermaid state diagram, for docs/architecture.md."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.RECEIVED.value}"]
    for (source, fact_type), target in TRANSITIONS.items():
        lines.append(f"    {source.value} --> {target.value}: {fact_type.__name__}")
    lines.extend(f"    {state.value} --> [*]" for state in State if state.terminal)
    return "\n".join(lines)
