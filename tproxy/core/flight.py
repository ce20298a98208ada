"""Flights: one upstream call shared by every identical request in flight, as a state machine.

Theory of operation: a *flight* is one upstream call and the clients attached to it. The first
cacheable request for a key opens a flight and joins it; an identical request that arrives while
the flight is joinable joins it too (a *follower*) instead of calling the upstream again. The flight
belongs to nobody in particular: a client leaving does not end it while others remain. When the
last client leaves, the disconnect policy decides: ``CANCEL`` ends the flight at once (closing the
upstream connection stops generation and saves tokens); ``FINISH`` lets it read to the end in the
background, so the answer is stored for the retry that is about to come, unless too many flights
already finish in the background, in which case it is cancelled after all. Once the answer is
*whole* (its end marker, or every byte its ``Content-Length`` announced, has arrived) the last
client leaving cancels nothing: the flight reads the upstream's end of body under a short deadline
and the answer is stored, whatever the policy.

A flight stays in the registry after it completed, until its answer is in the store: a request
that arrives in that gap is served the answer on its way into the store, as a cache hit (the
pipeline's ``landed_answer``), so a burst of identical requests costs exactly one upstream call. A
completed flight stays joinable too, for the moments while its answer is judged for the store. A
failed or abandoned flight leaves the registry at once, so the next request tries the upstream
afresh.

:class:`Flight` holds the states and a transition table like :mod:`tproxy.core.exchange`;
:class:`FlightRegistry` maps keys to live flights and counts background completions. Neither
does I/O: the pipeline reports facts and acts on the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from tproxy.core.errors import IllegalTransition


class Policy(Enum):
    """What happens when the last client of a running flight leaves."""

    CANCEL = "cancel"
    FINISH = "finish"


class FlightState(Enum):
    """Where a flight is. ``RUNNING`` and ``BACKGROUND`` read the upstream; the rest are final,
    but a ``COMPLETED`` flight still serves joiners until its answer is stored."""

    RUNNING = "running"
    BACKGROUND = "background"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def reading(self) -> bool:
        return self in (FlightState.RUNNING, FlightState.BACKGROUND)


_JOINABLE = frozenset({FlightState.RUNNING, FlightState.BACKGROUND, FlightState.COMPLETED})


class Verdict(Enum):
    """What the pipeline must do after a client left."""

    CONTINUE = "continue"  # other clients remain, or the flight is already over
    CANCEL = "cancel"  # close the upstream now
    FINISH_IN_BACKGROUND = "finish_in_background"  # keep reading, with the background deadline
    READ_END = "read_end"  # the answer is whole: read the upstream's end, with a short deadline


@dataclass(slots=True)
class Flight:
    """The bookkeeping of one flight. Illegal facts raise :class:`IllegalTransition`."""

    key: str
    policy: Policy
    state: FlightState = FlightState.RUNNING
    clients: int = 0
    joined: int = 0
    joinable: bool = True
    whole: bool = False
    reason: str | None = None
    history: list[FlightState] = field(default_factory=list)

    @property
    def followers(self) -> int:
        """Clients that joined after the first, in total."""
        return max(0, self.joined - 1)

    def can_join(self) -> bool:
        return self.joinable and self.state in _JOINABLE

    def join(self) -> None:
        """A client attaches: while the flight reads (a background flight has a client again),
        and after it completed until its answer is stored."""
        if not self.can_join():
            raise IllegalTransition(
                f"flight {self.key[:12]}: cannot join in state {self.state.value}"
                + ("" if self.joinable else " (closed to joiners)")
            )
        if self.state is FlightState.BACKGROUND:
            self._move(FlightState.RUNNING)
        self.clients += 1
        self.joined += 1

    def close_to_joiners(self, reason: str) -> None:
        """The flight can no longer replay everything to a newcomer (it grew too large)."""
        self.joinable = False
        self.reason = self.reason or reason

    def answer_whole(self) -> None:
        """The answer's end has arrived, though the upstream's body may not have ended yet."""
        self.whole = True

    def leave(self, *, background_allowed: bool) -> Verdict:
        """A client detaches; decide what happens to the upstream call."""
        if self.clients <= 0:
            raise IllegalTransition(f"flight {self.key[:12]}: leave without a client")
        self.clients -= 1
        if self.clients > 0 or self.state is not FlightState.RUNNING:
            return Verdict.CONTINUE
        if self.whole:
            return Verdict.READ_END
        if self.policy is Policy.FINISH and background_allowed:
            self._move(FlightState.BACKGROUND)
            return Verdict.FINISH_IN_BACKGROUND
        self._move(FlightState.ABANDONED)
        self.reason = self.reason or "last client left"
        return Verdict.CANCEL

    def finish(self, *, clean: bool, reason: str | None = None) -> None:
        """The upstream call ended: completely, or not."""
        if not self.state.reading:
            raise IllegalTransition(f"flight {self.key[:12]}: ended twice ({self.state.value})")
        self._move(FlightState.COMPLETED if clean else FlightState.FAILED)
        if reason is not None:
            self.reason = reason

    def _move(self, state: FlightState) -> None:
        self.history.append(self.state)
        self.state = state


@dataclass(slots=True)
class FlightRegistry:
    """The flights in the air, by cache key, and how many finish in the background."""

    max_background: int
    flights: dict[str, Flight] = field(default_factory=dict)
    # Counted, not derived from ``flights``: a flight replaced by a newer one for its key still
    # reads, unregistered, and must count against the cap if it finishes in the background.
    _background: int = 0

    def background(self) -> int:
        return self._background

    def join(self, key: str, policy: Policy) -> tuple[Flight, bool]:
        """Join the joinable flight for ``key``, or open a new one; True when it is new."""
        flight = self.flights.get(key)
        if flight is not None and flight.can_join():
            if flight.state is FlightState.BACKGROUND:
                self._background -= 1
            flight.join()
            return flight, False
        flight = Flight(key, policy)
        flight.join()
        # A flight that can no longer be joined keeps running for its clients, unregistered.
        self.flights[key] = flight
        return flight, True

    def leave(self, flight: Flight) -> Verdict:
        """A client of ``flight`` detaches; an abandoned flight leaves the registry."""
        verdict = flight.leave(background_allowed=self._background < self.max_background)
        if verdict is Verdict.CANCEL:
            self.discard(flight)
        elif verdict is Verdict.FINISH_IN_BACKGROUND:
            self._background += 1
        return verdict

    def finish(self, flight: Flight, *, clean: bool, reason: str | None = None) -> None:
        """The upstream call of ``flight`` ended; a failed flight leaves the registry at once."""
        was_background = flight.state is FlightState.BACKGROUND
        flight.finish(clean=clean, reason=reason)
        if was_background:
            self._background -= 1
        if not clean:
            self.discard(flight)

    def discard(self, flight: Flight) -> None:
        """Forget ``flight`` (its answer is stored, or it failed): new requests start afresh."""
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
