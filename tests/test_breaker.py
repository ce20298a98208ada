"""The circuit breaker against a model: after every step, the breaker and a few lines of
obviously right bookkeeping agree on the state and on whether a call may go out."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tproxy.core.breaker import BreakerState, CircuitBreaker, Outcome

THRESHOLD = 3
RESET = 5.0


def test_threshold_failures_in_a_row_open_it_and_a_success_in_between_resets_the_count() -> None:
    breaker = CircuitBreaker(threshold=3, reset_after=5.0)
    for outcome in (Outcome.FAILED, Outcome.FAILED, Outcome.SUCCEEDED, Outcome.FAILED):
        assert breaker.handle(outcome, 0.0) is None
    assert breaker.handle(Outcome.FAILED, 0.0) is None
    assert breaker.handle(Outcome.FAILED, 1.0) is BreakerState.OPEN
    assert not breaker.admit(5.9)


def test_an_unreachable_dependency_opens_it_at_once_and_one_probe_goes_after_the_wait() -> None:
    breaker = CircuitBreaker(threshold=3, reset_after=5.0)
    assert breaker.handle(Outcome.UNREACHABLE, 10.0) is BreakerState.OPEN
    assert not breaker.admit(14.9)
    assert breaker.admit(15.0)
    assert breaker.state is BreakerState.PROBING
    assert not breaker.admit(15.1)  # one probe at a time
    assert breaker.handle(Outcome.SUCCEEDED, 15.2) is BreakerState.CLOSED
    assert breaker.admit(15.3)


def test_a_probe_that_never_reports_is_given_up_after_the_wait() -> None:
    breaker = CircuitBreaker(threshold=1, reset_after=5.0)
    breaker.handle(Outcome.FAILED, 0.0)
    assert breaker.admit(5.0)
    assert not breaker.admit(9.9)
    assert breaker.admit(10.0)


@pytest.mark.parametrize(("threshold", "reset_after"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_nonsense_settings_are_refused(threshold: int, reset_after: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(threshold=threshold, reset_after=reset_after)


class BreakerAgainstModel(RuleBasedStateMachine):
    """Random calls, outcomes and time steps; the model says what must happen."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker = CircuitBreaker(threshold=THRESHOLD, reset_after=RESET)
        self.now = 0.0
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.until = 0.0

    @rule(seconds=st.floats(min_value=0, max_value=2 * RESET))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def admit(self) -> None:
        if self.state is BreakerState.CLOSED:
            expected = True
        elif self.now >= self.until:
            expected = True
            self.state = BreakerState.PROBING
            self.until = self.now + RESET
        else:
            expected = False
        assert self.breaker.admit(self.now) is expected

    @rule(outcome=st.sampled_from(Outcome))
    def report(self, outcome: Outcome) -> None:
        before = self.state
        if outcome is Outcome.SUCCEEDED:
            self.state = BreakerState.CLOSED
            self.failures = 0
        elif before is BreakerState.CLOSED:
            self.failures += 1
            if outcome is Outcome.UNREACHABLE or self.failures >= THRESHOLD:
                self.state, self.failures, self.until = BreakerState.OPEN, 0, self.now + RESET
        elif before is BreakerState.PROBING:
            self.state, self.failures, self.until = BreakerState.OPEN, 0, self.now + RESET
        change = self.breaker.handle(outcome, self.now)
        assert change == (self.state if self.state is not before else None)

    @invariant()
    def states_agree(self) -> None:
        assert self.breaker.state is self.state


TestBreakerAgainstModel = BreakerAgainstModel.TestCase
