"""The fan-out of a flight, without sockets: who gets each item, who is cut off, what a joiner
receives, and the byte accounting that bounds memory per client and per flight.

A hypothesis state machine drives :class:`~tproxy.core.fanout.Fanout` with joins, items,
writers taking and sending, departures and ends, and checks every answer against a model written
from the rules in docs/architecture.md, in the plainest way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tproxy.core.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from tproxy.core.events import (
    HeadersReceived,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.fanout import Chunk, Fanout, FlightFailed, Item


def plain(item: Item | None) -> object:
    """An item as a comparable value (exceptions compare by identity)."""
    if isinstance(item, FlightFailed):
        return (FlightFailed, type(item.error), str(item.error))
    return item


def size_of(item: Item) -> int:
    return len(item.data) if isinstance(item, Chunk) else 0


@dataclass
class ModelClient:
    """What one client was given, and what it holds, by the rules."""

    max_items: int
    received: list[Item] = field(default_factory=list)
    queued: list[Item] = field(default_factory=list)  # not yet taken by its writer
    in_hand: int = 0  # bytes taken, not yet sent
    attached: bool = True
    cut_off: bool = False

    @property
    def held(self) -> int:
        return sum(size_of(item) for item in self.queued) + self.in_hand


class FanoutMachine(RuleBasedStateMachine):
    """A shared flight against its model."""

    def __init__(self) -> None:
        super().__init__()
        self.fanout: Fanout[int] = Fanout(shared=True)
        self.clients: dict[int, ModelClient] = {}
        self.history: list[Item] = []  # the last attempt, the start, the chunks, the end
        self.joinable = True
        self.ended = False
        self.max_lag = self.max_history = self.max_items = 0

    @initialize(
        max_lag=st.integers(0, 40),
        max_history=st.integers(0, 40),
        max_items=st.integers(1, 6),
    )
    def bounds(self, max_lag: int, max_history: int, max_items: int) -> None:
        self.max_lag, self.max_history, self.max_items = max_lag, max_history, max_items
        self.fanout = Fanout(
            shared=True,
            max_lag_bytes=max_lag,
            max_history_bytes=max_history,
            max_items=max_items,
        )

    # --- the model ---------------------------------------------------------------------------

    def admit(self, client: ModelClient, item: Item) -> bool:
        if client.held + size_of(item) > self.max_lag or len(client.queued) >= client.max_items:
            return False
        client.queued.append(item)
        client.received.append(item)
        return True

    def remember(self, item: Item) -> bool:
        if not self.joinable:
            return False
        chunks = sum(size_of(old) for old in self.history)
        if chunks + size_of(item) > self.max_history:
            self.joinable = False
            self.history = []
            return True
        if isinstance(item, UpstreamRequested | HeadersReceived):
            self.history = [old for old in self.history if type(old) is not type(item)]
        self.history.append(item)
        order = {UpstreamRequested: 0, HeadersReceived: 1, Chunk: 2}
        self.history.sort(key=lambda old: order.get(type(old), 3))  # stable: chunks in order
        return False

    def offer(self, item: Item) -> tuple[list[int], list[int]]:
        to, cut = [], []
        for name, client in self.clients.items():
            if not client.attached:
                continue
            if self.admit(client, item):
                to.append(name)
            else:
                client.attached, client.cut_off = False, True
                cut.append(name)
        return to, cut

    # --- the rules ---------------------------------------------------------------------------

    @rule()
    def join(self) -> None:
        name = len(self.clients)
        client = ModelClient(self.max_items + len(self.history))
        self.clients[name] = client
        joined = self.fanout.join(name)
        expected = list(self.history)
        if not all(self.admit(client, item) for item in expected):
            client.received, client.queued = [], []
            client.attached, client.cut_off = False, True
            assert joined.cut_off
            assert not joined.attached
            return
        assert [plain(item) for item in joined.history] == [plain(item) for item in expected]
        assert not joined.cut_off
        assert joined.attached is not self.ended
        client.attached = not self.ended

    @precondition(lambda self: not self.ended)
    @rule(
        item=st.one_of(
            st.builds(UpstreamRequested, st.just("u"), st.integers(1, 3)),
            st.builds(HeadersReceived, st.sampled_from([200, 429])),
            st.builds(Chunk, st.binary(max_size=12), st.integers(0, 2), st.booleans()),
        )
    )
    def publish(self, item: Item) -> None:
        closed = self.remember(item)
        to, cut = self.offer(item)
        delivery = self.fanout.publish(item)
        assert (delivery.to, delivery.cut_off, delivery.closed_to_joiners) == (to, cut, closed)

    @precondition(lambda self: not self.ended)
    @rule(
        end=st.sampled_from([UpstreamEnded(), FlightFailed(UpstreamConnectError("refused")), None])
    )
    def end(self, end: UpstreamEnded | FlightFailed | None) -> None:
        """The flight's last item (then its end), or an interruption (None)."""
        if end is not None:
            self.publish(end)
        failure = None
        to: list[int] = []
        cut: list[int] = []
        if end is None:
            failure = FlightFailed(UpstreamBroken("the answer was cancelled"))
            self.remember(failure)
            to, cut = self.offer(failure)
        closing = [name for name, client in self.clients.items() if client.attached]
        ending = self.fanout.end(interrupted=end is None)
        assert plain(ending.item) == plain(failure)
        assert (ending.to, ending.cut_off, ending.closing) == (to, cut, closing)
        for name in closing:
            self.clients[name].attached = False
        self.ended = True

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def writer_takes(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[name]
        count = data.draw(st.integers(0, len(client.queued)))
        taken, client.queued = client.queued[:count], client.queued[count:]
        client.in_hand += sum(size_of(item) for item in taken)
        self.fanout.taken(name, count)

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def writer_sends(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[name]
        self.fanout.sent(name, client.in_hand)
        client.in_hand = 0

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[name]
        assert self.fanout.leave(name) is client.attached
        client.attached = False

    # --- what always holds -------------------------------------------------------------------

    @invariant()
    def each_client_holds_at_most_its_bound(self) -> None:
        attached = [name for name, client in self.clients.items() if client.attached]
        assert self.fanout.clients == attached
        for name in attached:
            held = self.fanout.held_bytes(name)
            assert held == self.clients[name].held <= self.max_lag

    @invariant()
    def the_history_holds_at_most_its_bound(self) -> None:
        assert self.fanout.history_bytes == sum(size_of(item) for item in self.history)
        assert self.fanout.history_bytes <= self.max_history
        assert self.fanout.joinable is self.joinable


TestFanout = FanoutMachine.TestCase
TestFanout.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


# --- the same rules, as stories ----------------------------------------------------------------


def test_a_joiner_mid_stream_gets_the_last_attempt_the_start_and_every_chunk() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=100, max_items=8)
    fanout.join("leader")
    for item in (UpstreamRequested("a", 1), UpstreamRequested("b", 2), HeadersReceived(200)):
        fanout.publish(item)
    first, second = Chunk(b"data: 1\n\n", 1), Chunk(b"data: 2\n\n", 1)
    fanout.publish(first)
    fanout.publish(second)
    joined = fanout.join("follower")
    assert joined.attached
    assert joined.history == [UpstreamRequested("b", 2), HeadersReceived(200), first, second]
    assert joined.history[2] is first  # the flight's own chunk, not a copy
    assert fanout.publish(UpstreamEnded()).to == ["leader", "follower"]


def test_the_first_client_leaving_leaves_the_others_their_answer() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=100, max_items=8)
    for name in ("leader", "a", "b"):
        fanout.join(name)
    assert fanout.leave("leader")
    assert fanout.publish(Chunk(b"data: 1\n\n", 1)).to == ["a", "b"]
    assert not fanout.leave("leader")  # a departure is counted once


def test_an_upstream_failure_reaches_every_client() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=100, max_items=8)
    fanout.join("a")
    fanout.publish(HeadersReceived(200))
    fanout.join("b")
    failure = FlightFailed(UpstreamBroken("reset"))
    assert fanout.publish(failure).to == ["a", "b"]
    assert fanout.end(interrupted=False).closing == ["a", "b"]
    assert fanout.join("late").history == [HeadersReceived(200), failure]


def test_a_slow_follower_is_cut_off_and_the_others_go_on() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=10, max_history_bytes=10, max_items=8)
    fanout.join("fast")
    fanout.join("slow")
    for _ in range(2):
        fanout.taken("fast", 1)
        fanout.sent("fast", 4)
        delivery = fanout.publish(Chunk(b"four"))
    assert delivery.to == ["fast", "slow"]
    delivery = fanout.publish(Chunk(b"four"))  # slow would hold 12 bytes
    assert (delivery.to, delivery.cut_off) == (["fast"], ["slow"])
    assert fanout.clients == ["fast"]
    assert not fanout.leave("slow")  # already detached


def test_a_client_is_cut_off_at_its_item_bound_even_with_bytes_to_spare() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=1000, max_history_bytes=0, max_items=2)
    fanout.join("reader")
    assert fanout.publish(Chunk(b"")).to == ["reader"]
    assert fanout.publish(Chunk(b"")).to == ["reader"]
    assert fanout.publish(Chunk(b"")).cut_off == ["reader"]


def test_an_answer_larger_than_the_history_bound_closes_the_flight_to_joiners() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=6, max_items=8)
    fanout.join("leader")
    assert not fanout.publish(Chunk(b"1234")).closed_to_joiners
    assert fanout.publish(Chunk(b"5678")).closed_to_joiners
    assert (fanout.joinable, fanout.history_bytes) == (False, 0)
    assert not fanout.publish(Chunk(b"9")).closed_to_joiners  # said once


def test_an_interrupted_flight_tells_its_clients_then_closes_them() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=100, max_items=8)
    fanout.join("a")
    fanout.join("b")
    fanout.leave("a")
    ending = fanout.end(interrupted=True)
    assert isinstance(ending.item, FlightFailed)
    assert (ending.to, ending.closing) == (["b"], ["b"])
    late = fanout.join("late")  # the book may still hand out a completed flight
    assert not late.attached
    assert late.history == [ending.item]


def test_a_clean_end_closes_every_client_without_a_failure() -> None:
    fanout: Fanout[str] = Fanout(shared=True, max_lag_bytes=100, max_history_bytes=100, max_items=8)
    fanout.join("a")
    fanout.publish(UpstreamEnded())
    ending = fanout.end(interrupted=False)
    assert (ending.item, ending.to, ending.closing) == (None, [], ["a"])


def test_a_private_flight_names_its_client_and_keeps_nothing() -> None:
    fanout: Fanout[str] = Fanout(shared=False)
    assert fanout.join("only").attached
    for _ in range(3):
        assert fanout.publish(Chunk(b"x" * 1000)).to == ["only"]
    assert (fanout.history_bytes, fanout.joinable) == (0, False)
    assert fanout.end(interrupted=True).item is None


def test_a_failure_becomes_the_exchange_fact_of_its_kind() -> None:
    assert FlightFailed(UpstreamTimeout("idle")).fact(None) == TimedOut("idle", None)
    assert FlightFailed(UpstreamConnectError("refused")).fact(502) == UpstreamFailed("refused", 502)
