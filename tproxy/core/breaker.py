"""A circuit breaker: stop asking a failing dependency, and probe it again later.

Theory of operation: the shared cache tier is an optimisation, so a request must never pay for
it failing more than once in a while. The breaker is told what each call did (a fact:
:class:`Outcome`) and says whether the next call may go out (:meth:`CircuitBreaker.admit`).

- ``CLOSED``: every call goes out. ``threshold`` failures in a row open the breaker; a
  dependency that cannot even be reached (connection refused) opens it at once.
- ``OPEN``: no call goes out until ``reset_after`` seconds have passed; then the next
  :meth:`~CircuitBreaker.admit` lets one call through as a probe and the breaker is ``PROBING``.
- ``PROBING``: one call is out. Its success closes the breaker, its failure opens it again for
  another ``reset_after``. A probe whose outcome never arrives (its caller was cancelled) is given
  up after ``reset_after``, and the next call probes instead, so the breaker cannot stay stuck.

Any success closes the breaker, even one reported late by a call that started before it opened:
the dependency answered. Times are a monotonic clock's seconds, handed in by the caller.
"""

from __future__ import annotations

from enum import Enum


class BreakerState(Enum):
    """Where the breaker is; values are metric labels."""

    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class Outcome(Enum):
    """What one call to the dependency did."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # an error or a timeout: counts toward the threshold
    UNREACHABLE = "unreachable"  # no connection could be made: opens at once


class CircuitBreaker:
    """The breaker of one dependency. ``threshold`` ≥ 1 failures in a row open it."""

    def __init__(self, *, threshold: int, reset_after: float) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if reset_after <= 0:
            raise ValueError(f"reset_after must be positive, got {reset_after}")
        self._threshold = threshold
        self._reset_after = reset_after
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._until = 0.0  # OPEN: when a probe may go; PROBING: when the probe is given up

    @property
    def state(self) -> BreakerState:
        return self._state

    def admit(self, now: float) -> bool:
        """Whether a call may go out now. Past the wait, the admitted call is the probe."""
        if self._state is BreakerState.CLOSED:
            return True
        if now < self._until:
            return False
        self._state = BreakerState.PROBING
        self._until = now + self._reset_after
        return True

    def handle(self, outcome: Outcome, now: float) -> BreakerState | None:
        """Record what a call did; the new state when this changed it, else None."""
        before = self._state
        if outcome is Outcome.SUCCEEDED:
            self._state = BreakerState.CLOSED
            self._failures = 0
        elif before is BreakerState.CLOSED:
            self._failures += 1
            if outcome is Outcome.UNREACHABLE or self._failures >= self._threshold:
                self._open(now)
        elif before is BreakerState.PROBING:
            self._open(now)
        # OPEN: a late failure from a call admitted before it opened changes nothing.
        return self._state if self._state is not before else None

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._failures = 0
        self._until = now + self._reset_after
