"""Flights: identical requests in flight share one upstream call, and the last client decides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tproxy.core.errors import IllegalTransition
from tproxy.core.flight import Flight, FlightRegistry, FlightState, Policy, Verdict

KEY = "key-a"
OTHER_KEY = "key-b"
JOINABLE = (FlightState.RUNNING, FlightState.BACKGROUND, FlightState.COMPLETED)


def test_the_first_request_opens_a_flight_and_an_identical_one_joins_it() -> None:
    registry = FlightRegistry(max_background=1)
    leader, opened = registry.join(KEY, Policy.CANCEL)
    follower, opened_again = registry.join(KEY, Policy.CANCEL)
    assert (opened, opened_again) == (True, False)
    assert follower is leader
    assert (leader.state, leader.clients, leader.followers) == (FlightState.RUNNING, 2, 1)
    assert registry.flights == {KEY: leader}


def test_a_different_key_opens_its_own_flight() -> None:
    registry = FlightRegistry(max_background=1)
    first, _ = registry.join(KEY, Policy.CANCEL)
    second, opened = registry.join(OTHER_KEY, Policy.CANCEL)
    assert opened
    assert second is not first
    assert registry.flights == {KEY: first, OTHER_KEY: second}


@pytest.mark.parametrize("policy", list(Policy))
def test_a_client_leaving_while_others_remain_changes_nothing(policy: Policy) -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, policy)
    registry.join(KEY, policy)
    assert registry.leave(flight) is Verdict.CONTINUE
    assert (flight.state, flight.clients) == (FlightState.RUNNING, 1)
    assert registry.flights == {KEY: flight}


@pytest.mark.parametrize(
    ("policy", "max_background", "verdict", "state", "registered"),
    [
        (Policy.CANCEL, 0, Verdict.CANCEL, FlightState.ABANDONED, False),
        (Policy.CANCEL, 4, Verdict.CANCEL, FlightState.ABANDONED, False),
        (Policy.FINISH, 4, Verdict.FINISH_IN_BACKGROUND, FlightState.BACKGROUND, True),
        (Policy.FINISH, 0, Verdict.CANCEL, FlightState.ABANDONED, False),
    ],
)
def test_the_last_client_leaving_decides_by_the_policy(
    policy: Policy,
    max_background: int,
    verdict: Verdict,
    state: FlightState,
    registered: bool,
) -> None:
    registry = FlightRegistry(max_background=max_background)
    flight, _ = registry.join(KEY, policy)
    assert registry.leave(flight) is verdict
    assert flight.state is state
    assert flight.clients == 0
    assert (KEY in registry.flights) is registered
    assert flight.history == [FlightState.RUNNING]


def test_an_abandoned_flight_says_why_and_the_next_request_starts_afresh() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    registry.leave(flight)
    assert flight.reason == "last client left"
    fresh, opened = registry.join(KEY, Policy.CANCEL)
    assert opened
    assert fresh is not flight


def test_under_finish_the_last_client_cancels_once_the_background_is_full() -> None:
    registry = FlightRegistry(max_background=1)
    first, _ = registry.join(KEY, Policy.FINISH)
    second, _ = registry.join(OTHER_KEY, Policy.FINISH)
    assert registry.leave(first) is Verdict.FINISH_IN_BACKGROUND
    assert registry.background() == 1
    assert registry.leave(second) is Verdict.CANCEL
    assert second.state is FlightState.ABANDONED
    assert registry.flights == {KEY: first}
    assert registry.background() == 1


def test_a_background_slot_frees_up_when_its_flight_ends() -> None:
    registry = FlightRegistry(max_background=1)
    first, _ = registry.join(KEY, Policy.FINISH)
    second, _ = registry.join(OTHER_KEY, Policy.FINISH)
    registry.leave(first)
    registry.finish(first, clean=True)
    assert registry.background() == 0
    assert registry.leave(second) is Verdict.FINISH_IN_BACKGROUND


def test_joining_a_background_flight_brings_it_back_to_running() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.FINISH)
    registry.leave(flight)
    again, opened = registry.join(KEY, Policy.FINISH)
    assert again is flight
    assert not opened
    assert (flight.state, flight.clients, flight.followers) == (FlightState.RUNNING, 1, 1)
    assert registry.background() == 0
    assert flight.history == [FlightState.RUNNING, FlightState.BACKGROUND]
    # Back in the running state, its last client decides once more.
    assert registry.leave(flight) is Verdict.FINISH_IN_BACKGROUND


@pytest.mark.parametrize("policy", list(Policy))
def test_once_the_answer_is_whole_the_last_client_leaving_cancels_nothing(policy: Policy) -> None:
    registry = FlightRegistry(max_background=0)
    flight, _ = registry.join(KEY, policy)
    registry.join(KEY, policy)
    flight.answer_whole()  # data: [DONE] arrived; the upstream's end of body has not
    assert registry.leave(flight) is Verdict.CONTINUE
    assert registry.leave(flight) is Verdict.READ_END
    assert (flight.state, flight.clients, registry.background()) == (FlightState.RUNNING, 0, 0)
    assert registry.flights == {KEY: flight}
    registry.finish(flight, clean=True)
    assert flight.state is FlightState.COMPLETED


def test_a_flight_keeps_the_policy_it_was_opened_with() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.FINISH)
    registry.join(KEY, Policy.CANCEL)
    registry.leave(flight)
    assert registry.leave(flight) is Verdict.FINISH_IN_BACKGROUND


def test_a_background_flight_that_completes_stays_joinable_until_discarded() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.FINISH)
    registry.leave(flight)
    registry.finish(flight, clean=True)
    assert flight.state is FlightState.COMPLETED
    assert registry.flights == {KEY: flight}
    assert flight.history == [FlightState.RUNNING, FlightState.BACKGROUND]


def test_a_completed_flight_serves_joiners_until_its_answer_is_stored() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    registry.finish(flight, clean=True)
    late, opened = registry.join(KEY, Policy.CANCEL)
    assert late is flight
    assert not opened
    assert (flight.state, flight.clients) == (FlightState.COMPLETED, 2)
    # Leaving a completed flight has nothing left to cancel.
    assert registry.leave(flight) is Verdict.CONTINUE
    assert registry.leave(flight) is Verdict.CONTINUE
    assert flight.state is FlightState.COMPLETED
    registry.discard(flight)  # the answer is in the store
    assert registry.flights == {}
    fresh, opened = registry.join(KEY, Policy.CANCEL)
    assert opened
    assert fresh is not flight


def test_a_failed_flight_leaves_the_registry_at_once() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    registry.join(KEY, Policy.CANCEL)
    registry.finish(flight, clean=False, reason="upstream reset")
    assert flight.state is FlightState.FAILED
    assert flight.reason == "upstream reset"
    assert registry.flights == {}
    fresh, opened = registry.join(KEY, Policy.CANCEL)
    assert opened
    assert fresh is not flight
    # Its clients still detach one by one; there is nothing left to decide.
    assert registry.leave(flight) is Verdict.CONTINUE
    assert registry.leave(flight) is Verdict.CONTINUE
    assert registry.flights == {KEY: fresh}


def test_a_flight_closed_to_joiners_keeps_its_clients_while_a_new_one_opens() -> None:
    registry = FlightRegistry(max_background=1)
    old, _ = registry.join(KEY, Policy.CANCEL)
    old.close_to_joiners("too large to replay")
    assert not old.can_join()
    new, opened = registry.join(KEY, Policy.CANCEL)
    assert opened
    assert new is not old
    assert registry.flights == {KEY: new}
    assert (old.state, old.clients, old.reason) == (
        FlightState.RUNNING,
        1,
        "too large to replay",
    )
    # The old flight ends on its own without touching the one that replaced it.
    registry.finish(old, clean=True)
    registry.discard(old)
    assert registry.flights == {KEY: new}


def test_abandoning_a_replaced_flight_does_not_remove_its_successor() -> None:
    registry = FlightRegistry(max_background=1)
    old, _ = registry.join(KEY, Policy.CANCEL)
    old.close_to_joiners("too large to replay")
    new, _ = registry.join(KEY, Policy.CANCEL)
    assert registry.leave(old) is Verdict.CANCEL
    registry.finish(new, clean=False)
    assert registry.flights == {}


def test_closing_to_joiners_keeps_the_first_reason() -> None:
    flight = Flight(KEY, Policy.CANCEL)
    flight.close_to_joiners("too large to replay")
    flight.close_to_joiners("second thoughts")
    assert flight.reason == "too large to replay"


@pytest.mark.parametrize("first_clean", [True, False])
@pytest.mark.parametrize("second_clean", [True, False])
def test_finishing_twice_is_illegal_and_changes_nothing(
    first_clean: bool, second_clean: bool
) -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    registry.finish(flight, clean=first_clean)
    state, history = flight.state, list(flight.history)
    with pytest.raises(IllegalTransition, match="ended twice"):
        registry.finish(flight, clean=second_clean)
    assert (flight.state, flight.history) == (state, history)


def test_finishing_an_abandoned_flight_is_illegal() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    registry.leave(flight)
    with pytest.raises(IllegalTransition, match="ended twice"):
        registry.finish(flight, clean=True)
    assert flight.state is FlightState.ABANDONED


def test_leaving_a_flight_without_clients_is_illegal_and_changes_nothing() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.FINISH)
    registry.leave(flight)
    with pytest.raises(IllegalTransition, match="leave without a client"):
        registry.leave(flight)
    assert (flight.state, flight.clients) == (FlightState.BACKGROUND, 0)
    assert registry.flights == {KEY: flight}


@pytest.mark.parametrize("ending", ["failed", "abandoned", "closed"])
def test_a_flight_that_cannot_be_joined_refuses_a_direct_join(ending: str) -> None:
    flight = Flight(KEY, Policy.CANCEL)
    flight.join()
    if ending == "failed":
        flight.finish(clean=False)
    elif ending == "abandoned":
        flight.leave(background_allowed=True)
    else:
        flight.close_to_joiners("too large to replay")
    clients = flight.clients
    with pytest.raises(IllegalTransition, match="cannot join"):
        flight.join()
    assert flight.clients == clients


def test_followers_count_every_client_after_the_first_even_after_they_left() -> None:
    registry = FlightRegistry(max_background=1)
    flight, _ = registry.join(KEY, Policy.CANCEL)
    assert flight.followers == 0
    for _ in range(3):
        registry.join(KEY, Policy.CANCEL)
    registry.leave(flight)
    registry.leave(flight)
    assert (flight.clients, flight.joined, flight.followers) == (2, 4, 3)


def test_only_running_and_background_flights_read_the_upstream() -> None:
    assert {state for state in FlightState if state.reading} == {
        FlightState.RUNNING,
        FlightState.BACKGROUND,
    }


def test_the_background_cap_counts_flights_that_were_replaced() -> None:
    registry = FlightRegistry(max_background=1)
    old, _ = registry.join(KEY, Policy.FINISH)
    old.close_to_joiners("too large to replay")
    new, _ = registry.join(KEY, Policy.FINISH)
    assert registry.leave(old) is Verdict.FINISH_IN_BACKGROUND
    assert registry.leave(new) is Verdict.CANCEL  # the one background slot is taken by old


# -- against a model ------------------------------------------------------------------


@dataclass
class ModelFlight:
    """The oracle's idea of one flight: a handful of plain fields."""

    key: str
    policy: Policy
    state: FlightState = FlightState.RUNNING
    clients: int = 1
    joins: int = 1
    joinable: bool = True
    whole: bool = False
    path: list[FlightState] = field(default_factory=list)

    def move(self, state: FlightState) -> None:
        self.path.append(self.state)
        self.state = state


class RegistryAgainstAModel(RuleBasedStateMachine):
    """The registry must agree with a plain model after every step, illegal steps included.

    Real flight ``n`` and model flight ``n`` are the ``n``-th flight opened. The model keeps,
    per key, the index of the registered flight, and the indices of flights that were replaced
    while still reading the upstream (``loose``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlightRegistry(max_background=0)
        self.real: list[Flight] = []
        self.model: list[ModelFlight] = []
        self.registered: dict[str, int] = {}
        self.loose: set[int] = set()

    @initialize(max_background=st.integers(min_value=0, max_value=2))
    def open_registry(self, max_background: int) -> None:
        self.registry = FlightRegistry(max_background=max_background)

    # -- the model ----------------------------------------------------------------------

    def model_background(self) -> int:
        # Registered flights and replaced ones still reading both count against the cap.
        flights = set(self.registered.values()) | self.loose
        return sum(self.model[index].state is FlightState.BACKGROUND for index in flights)

    def unregister(self, index: int) -> None:
        if self.registered.get(self.model[index].key) == index:
            del self.registered[self.model[index].key]
        if not self.model[index].state.reading:
            self.loose.discard(index)

    def where(self, test: Callable[[ModelFlight], bool]) -> list[int]:
        return [index for index, flight in enumerate(self.model) if test(flight)]

    def with_clients(self) -> list[int]:
        return self.where(lambda flight: flight.clients > 0)

    def without_clients(self) -> list[int]:
        return self.where(lambda flight: flight.clients == 0)

    def reading(self) -> list[int]:
        return self.where(lambda flight: flight.state.reading)

    def over(self) -> list[int]:
        return self.where(lambda flight: not flight.state.reading)

    def completed(self) -> list[int]:
        return self.where(lambda flight: flight.state is FlightState.COMPLETED)

    def snapshot(self) -> object:
        flights = [
            (f.state, f.clients, f.joined, f.joinable, f.reason, list(f.history)) for f in self.real
        ]
        return flights, {key: id(flight) for key, flight in self.registry.flights.items()}

    # -- the steps ----------------------------------------------------------------------

    @rule(key=st.sampled_from([KEY, OTHER_KEY]), policy=st.sampled_from(Policy))
    def join(self, key: str, policy: Policy) -> None:
        index = self.registered.get(key)
        current = None if index is None else self.model[index]
        flight, opened = self.registry.join(key, policy)
        if current is not None and current.joinable and current.state in JOINABLE:
            assert index is not None
            assert not opened
            assert flight is self.real[index]
            if current.state is FlightState.BACKGROUND:
                current.move(FlightState.RUNNING)
            current.clients += 1
            current.joins += 1
            return
        assert opened
        if index is not None and self.model[index].state.reading:
            self.loose.add(index)
        self.registered[key] = len(self.model)
        self.real.append(flight)
        self.model.append(ModelFlight(key, policy))

    @precondition(lambda self: self.with_clients())
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.with_clients()))
        flight = self.model[index]
        verdict = self.registry.leave(self.real[index])
        flight.clients -= 1
        if flight.clients > 0 or flight.state is not FlightState.RUNNING:
            assert verdict is Verdict.CONTINUE
        elif flight.whole:
            assert verdict is Verdict.READ_END
        elif (
            flight.policy is Policy.FINISH
            and self.model_background() < self.registry.max_background
        ):
            assert verdict is Verdict.FINISH_IN_BACKGROUND
            flight.move(FlightState.BACKGROUND)
        else:
            assert verdict is Verdict.CANCEL
            flight.move(FlightState.ABANDONED)
            self.unregister(index)

    @precondition(lambda self: self.without_clients())
    @rule(data=st.data())
    def leave_without_a_client(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.without_clients()))
        before = self.snapshot()
        with pytest.raises(IllegalTransition):
            self.registry.leave(self.real[index])
        assert self.snapshot() == before

    @precondition(lambda self: self.reading())
    @rule(data=st.data(), clean=st.booleans())
    def finish(self, data: st.DataObject, clean: bool) -> None:
        index = data.draw(st.sampled_from(self.reading()))
        self.registry.finish(self.real[index], clean=clean)
        self.model[index].move(FlightState.COMPLETED if clean else FlightState.FAILED)
        self.loose.discard(index)
        if not clean:
            self.unregister(index)

    @precondition(lambda self: self.over())
    @rule(data=st.data(), clean=st.booleans())
    def finish_what_is_over(self, data: st.DataObject, clean: bool) -> None:
        index = data.draw(st.sampled_from(self.over()))
        before = self.snapshot()
        with pytest.raises(IllegalTransition):
            self.registry.finish(self.real[index], clean=clean)
        assert self.snapshot() == before

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def close_to_joiners(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(min_value=0, max_value=len(self.model) - 1))
        self.real[index].close_to_joiners("too large to replay")
        self.model[index].joinable = False

    @precondition(lambda self: self.reading())
    @rule(data=st.data())
    def answer_whole(self, data: st.DataObject) -> None:
        """The answer's end marker arrived (its upstream body has not ended yet)."""
        index = data.draw(st.sampled_from(self.reading()))
        self.real[index].answer_whole()
        self.model[index].whole = True

    @precondition(lambda self: self.completed())
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """The answer of a completed flight is in the store."""
        index = data.draw(st.sampled_from(self.completed()))
        self.registry.discard(self.real[index])
        self.unregister(index)

    # -- after every step ---------------------------------------------------------------

    @invariant()
    def the_registry_holds_what_the_model_holds(self) -> None:
        assert {key: id(f) for key, f in self.registry.flights.items()} == {
            key: id(self.real[index]) for key, index in self.registered.items()
        }
        assert all(flight.key == key for key, flight in self.registry.flights.items())

    @invariant()
    def every_flight_looks_as_modelled(self) -> None:
        for flight, model in zip(self.real, self.model, strict=True):
            assert (flight.state, flight.clients, flight.joinable, flight.policy) == (
                model.state,
                model.clients,
                model.joinable,
                model.policy,
            )
            assert flight.history == model.path
            assert flight.followers == model.joins - 1
            assert flight.clients >= 0

    @invariant()
    def only_live_flights_are_registered(self) -> None:
        for flight in self.registry.flights.values():
            assert flight.state not in (FlightState.FAILED, FlightState.ABANDONED)

    @invariant()
    def replaced_flights_still_reading_are_the_loose_ones(self) -> None:
        registered = {id(flight) for flight in self.registry.flights.values()}
        assert {
            n for n, f in enumerate(self.real) if f.state.reading and id(f) not in registered
        } == self.loose

    @invariant()
    def the_background_stays_within_its_cap(self) -> None:
        assert self.registry.background() == self.model_background()
        assert self.registry.background() <= self.registry.max_background


TestRegistryAgainstAModel = RegistryAgainstAModel.TestCase
TestRegistryAgainstAModel.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
