"""The exchange lifecycle: every request ends exactly once, in a known state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.cachestatus import CacheStatus, Forward
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
from tproxy.core.exchange import TERMINAL_STATES, TRANSITIONS, Exchange, State, describe_transitions


def new_exchange() -> Exchange:
    return Exchange("req-1", started_at=100.0)


def test_a_streamed_answer_goes_from_received_to_completed() -> None:
    exchange = new_exchange()
    exchange.handle(UpstreamRequested("local", 1), 100.1)
    exchange.handle(HeadersReceived(200), 100.2)
    exchange.note_upstream_chunk(10, 100.3)
    exchange.note_events(1)
    exchange.handle(UpstreamEnded(), 100.4)
    exchange.handle(ResponseFinished(), 100.5)
    assert exchange.state is State.COMPLETED
    assert exchange.finished
    assert exchange.status == 200
    assert exchange.upstream == "local"
    assert exchange.first_byte_at == 100.3
    assert exchange.ended_at == 100.5
    assert exchange.history == [
        State.RECEIVED,
        State.CONNECTING,
        State.STREAMING,
        State.UPSTREAM_DONE,
    ]


def test_a_second_end_of_stream_is_illegal_and_changes_nothing() -> None:
    exchange = new_exchange()
    exchange.handle(UpstreamRequested("local", 1), 1.0)
    exchange.handle(HeadersReceived(200), 1.0)
    exchange.handle(UpstreamEnded(), 2.0)
    with pytest.raises(IllegalTransition, match="UpstreamEnded is not allowed"):
        exchange.handle(UpstreamEnded(), 3.0)
    assert exchange.state is State.UPSTREAM_DONE


def test_end_of_stream_after_completion_is_illegal() -> None:
    exchange = new_exchange()
    for fact in (
        UpstreamRequested("u", 1),
        HeadersReceived(200),
        UpstreamEnded(),
        ResponseFinished(),
    ):
        exchange.handle(fact, 1.0)
    with pytest.raises(IllegalTransition):
        exchange.handle(UpstreamEnded(), 2.0)
    assert exchange.state is State.COMPLETED


def test_a_client_that_leaves_after_its_whole_answer_completed_before_the_upstream_ended() -> None:
    exchange = new_exchange()
    exchange.handle(UpstreamRequested("local", 1), 100.1)
    exchange.handle(HeadersReceived(200), 100.2)
    exchange.handle(AnswerDelivered(), 100.3)  # data: [DONE] is on its way to the client
    assert exchange.handle(ClientGone(), 100.4) is State.COMPLETED
    assert exchange.ended_at == 100.4
    assert exchange.history == [
        State.RECEIVED,
        State.CONNECTING,
        State.STREAMING,
        State.DELIVERED,
    ]


def test_a_whole_answer_still_ends_through_the_upstreams_end_when_the_client_stays() -> None:
    exchange = new_exchange()
    for fact in (UpstreamRequested("u", 1), HeadersReceived(200), AnswerDelivered()):
        exchange.handle(fact, 1.0)
    exchange.handle(UpstreamEnded(), 2.0)
    with pytest.raises(IllegalTransition):
        exchange.handle(UpstreamEnded(), 2.5)
    exchange.handle(ResponseFinished(), 3.0)
    assert exchange.state is State.COMPLETED


def test_followers_are_counted_by_facts_that_leave_the_state_alone() -> None:
    exchange = new_exchange()
    exchange.handle(FollowerJoined(), 1.0)  # a follower may join before the first item arrives
    exchange.handle(UpstreamRequested("u", 1), 1.1)
    exchange.handle(HeadersReceived(200), 1.2)
    exchange.handle(FollowerJoined(), 1.3)
    exchange.handle(FollowerJoined(), 1.4)
    assert (exchange.state, exchange.followers) == (State.STREAMING, 3)
    assert exchange.history == [State.RECEIVED, State.CONNECTING]
    exchange.handle(ClientGone(), 1.5)
    with pytest.raises(IllegalTransition):
        exchange.handle(FollowerJoined(), 1.6)
    assert exchange.followers == 3


def test_a_replay_has_no_followers() -> None:
    exchange = new_exchange()
    exchange.handle(CacheHit(1.0), 1.0)
    with pytest.raises(IllegalTransition):
        exchange.handle(FollowerJoined(), 1.1)


MISS = CacheStatus.forwarded(Forward.MISS)


def test_who_asked_for_what_arrives_as_facts_before_the_answer_starts() -> None:
    exchange = new_exchange()
    exchange.handle(Identified("tenant-hash"), 1.0)
    exchange.handle(Classified("m1", MISS), 1.1)
    assert (exchange.state, exchange.history) == (State.RECEIVED, [])
    assert (exchange.tenant, exchange.model, exchange.cache_status) == ("tenant-hash", "m1", MISS)
    exchange.handle(UpstreamRequested("u", 1), 1.2)
    for late in (Identified("other"), Classified("m2", CacheStatus.hit())):
        with pytest.raises(IllegalTransition):
            exchange.handle(late, 1.3)
    assert (exchange.tenant, exchange.model, exchange.cache_status) == ("tenant-hash", "m1", MISS)


def test_a_follower_is_collapsed_in_its_cache_status_too() -> None:
    exchange = new_exchange()
    exchange.handle(Classified(None, MISS), 1.0)
    exchange.handle(JoinedFlight(), 1.1)
    assert exchange.collapsed
    assert exchange.cache_status == MISS.joined()
    assert exchange.cache_status.text == "tproxy; fwd=miss; collapsed"


def test_a_retry_stays_connecting_and_counts_attempts() -> None:
    exchange = new_exchange()
    exchange.handle(UpstreamRequested("a", 1), 1.0)
    exchange.handle(UpstreamRequested("b", 2), 1.1)
    assert exchange.state is State.CONNECTING
    assert (exchange.upstream, exchange.attempts) == ("b", 2)


@pytest.mark.parametrize(
    ("facts", "final"),
    [
        ([Rejected(413, "request_too_large")], State.REJECTED),
        ([CacheHit(3.0), ResponseFinished()], State.COMPLETED),
        ([UpstreamRequested("u", 1), UpstreamFailed("refused")], State.UPSTREAM_FAILED),
        ([UpstreamRequested("u", 1), TimedOut("first_byte")], State.TIMED_OUT),
        ([UpstreamRequested("u", 1), HeadersReceived(200), TimedOut("idle")], State.TIMED_OUT),
        ([UpstreamRequested("u", 1), HeadersReceived(200), ClientGone()], State.CLIENT_GONE),
        ([UpstreamRequested("u", 1), HeadersReceived(200), ShutDown()], State.SHUT_DOWN),
        ([CacheHit(1.0), InternalError("RuntimeError")], State.INTERNAL_ERROR),
        ([JoinedFlight(), HeadersReceived(200), FellBehind()], State.FELL_BEHIND),
        (
            [JoinedFlight(), HeadersReceived(200), UpstreamEnded(), ResponseFinished()],
            State.COMPLETED,
        ),
        (
            [UpstreamRequested("u", 1), HeadersReceived(200), UpstreamEnded(), ClientGone()],
            State.CLIENT_GONE,
        ),
        (
            [UpstreamRequested("u", 1), HeadersReceived(200), AnswerDelivered(), ClientGone()],
            State.COMPLETED,
        ),
        (
            [UpstreamRequested("u", 1), HeadersReceived(200), AnswerDelivered(), TimedOut("idle")],
            State.TIMED_OUT,
        ),
    ],
)
def test_each_terminal_state_is_reachable(facts: list[Fact], final: State) -> None:
    exchange = new_exchange()
    for fact in facts:
        exchange.handle(fact, 1.0)
    assert exchange.state is final
    assert exchange.finished


def test_terminal_states_have_no_way_out() -> None:
    assert set(ENDS) == TERMINAL_STATES
    assert all(source not in TERMINAL_STATES for source, _ in TRANSITIONS)


def test_the_diagram_names_every_transition() -> None:
    diagram = describe_transitions()
    assert diagram.count("-->") == len(TRANSITIONS) + 1 + len(TERMINAL_STATES)


ALL_FACTS: list[Fact] = [
    Rejected(400, "bad"),
    Identified("t"),
    Classified("m", MISS),
    JoinedFlight(),
    FollowerJoined(),
    FellBehind(),
    CacheHit(1.0),
    UpstreamRequested("u", 1),
    HeadersReceived(200),
    AnswerDelivered(),
    UpstreamEnded(),
    ResponseFinished(),
    UpstreamFailed("reset"),
    TimedOut("idle"),
    ClientGone(),
    ShutDown(),
    InternalError("RuntimeError"),
]

S = State
ENDS = (
    S.COMPLETED,
    S.REJECTED,
    S.CLIENT_GONE,
    S.UPSTREAM_FAILED,
    S.TIMED_OUT,
    S.SHUT_DOWN,
    S.FELL_BEHIND,
    S.INTERNAL_ERROR,
)


def lifecycle(state: State, fact: Fact) -> State | None:
    """The lifecycle as the docs tell it, written out by hand: where ``fact`` takes an exchange
    in ``state``, or None where it may not happen. The oracle for the table, never derived
    from it."""
    if state in ENDS:
        return None  # an exchange ends once
    upstream_side = state in (S.CONNECTING, S.STREAMING, S.DELIVERED)
    match fact:
        case ShutDown():
            return S.SHUT_DOWN
        case InternalError():
            return S.INTERNAL_ERROR
        case ClientGone():
            return S.COMPLETED if state is S.DELIVERED else S.CLIENT_GONE
        case Rejected():
            return S.REJECTED if state is S.RECEIVED else None
        case Identified() | Classified():
            return S.RECEIVED if state is S.RECEIVED else None
        case CacheHit():
            return S.REPLAYING if state is S.RECEIVED else None
        case JoinedFlight():
            return S.CONNECTING if state is S.RECEIVED else None
        case UpstreamRequested():
            return S.CONNECTING if state in (S.RECEIVED, S.CONNECTING) else None
        case FollowerJoined():
            return None if state is S.REPLAYING else state
        case HeadersReceived():
            return S.STREAMING if state is S.CONNECTING else None
        case AnswerDelivered():
            return S.DELIVERED if state is S.STREAMING else None
        case UpstreamEnded():
            return S.UPSTREAM_DONE if state in (S.STREAMING, S.DELIVERED) else None
        case UpstreamFailed():
            return S.UPSTREAM_FAILED if upstream_side else None
        case TimedOut():
            return S.TIMED_OUT if upstream_side else None
        case FellBehind():
            return S.FELL_BEHIND if upstream_side or state is S.UPSTREAM_DONE else None
        case ResponseFinished():
            return S.COMPLETED if state in (S.UPSTREAM_DONE, S.REPLAYING) else None
    raise AssertionError(fact)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("fact", ALL_FACTS, ids=lambda fact: type(fact).__name__)
def test_the_table_is_the_lifecycle_written_out(state: State, fact: Fact) -> None:
    assert TRANSITIONS.get((state, type(fact))) is lifecycle(state, fact)


@given(st.lists(st.sampled_from(ALL_FACTS), max_size=30))
def test_any_sequence_of_facts_ends_at_most_once(facts: list[Fact]) -> None:
    """Oracle: the hand-written lifecycle. Legal facts move as it says; illegal ones raise and
    change nothing."""
    exchange = new_exchange()
    terminal_transitions = 0
    for moment, fact in enumerate(facts):
        before = exchange.state
        expected = lifecycle(before, fact)
        if expected is None:
            with pytest.raises(IllegalTransition):
                exchange.handle(fact, float(moment))
            assert exchange.state is before
        else:
            assert exchange.handle(fact, float(moment)) is expected
            terminal_transitions += expected.terminal
    assert terminal_transitions <= 1
    assert terminal_transitions == int(exchange.finished)


def test_the_architecture_page_shows_the_current_diagram() -> None:
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
    assert describe_transitions() in page.read_text()
