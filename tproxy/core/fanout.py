"""A flight's fan-out as a sans-IO object: who gets each item, who is cut off, what a joiner sees.

A flight reads one upstream answer and hands every item of it to each of its clients. The items
are the core vocabulary: :class:`~tproxy.core.events.UpstreamRequested` (an attempt),
:class:`~tproxy.core.events.HeadersReceived` (the status and headers), :class:`Chunk` (body
bytes, with the events they hold and, for the payload log, the frames the reader decoded from
them: a stream is decoded once per flight, whatever the number of clients), and one end:
:class:`~tproxy.core.events.UpstreamEnded` or :class:`FlightFailed`.

:class:`Fanout` keeps the bookkeeping and does no I/O: told of a join, an item, a departure or
the end, it answers with the deliveries and cut-offs to perform, and the pipeline performs them
(``send_nowait`` into each client's channel, closing the channels of those cut off).

A *shared* flight never waits for a client. Each client holds what is queued for it and what its
writer has taken but not yet sent (:meth:`Fanout.taken`, :meth:`Fanout.sent`); a client whose
bytes would pass ``max_lag_bytes``, or whose queued items would pass its item bound, is cut off
(it *fell behind*) and detached at once. The flight keeps a history for joiners: the last
attempt, the start, every chunk, the end; once the chunks would pass ``max_history_bytes`` the
history is dropped and the flight closes to joiners. The history's chunks are the very objects
the clients' queues hold, so a flight holds at most ``max_history_bytes`` for joiners and each
client at most ``max_lag_bytes`` of bytes it shares with the others.

A *private* flight has one client and awaits it: :meth:`Fanout.publish` only names the clients,
keeps no history and cuts nobody off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tproxy.core.errors import UpstreamBroken, UpstreamError, UpstreamTimeout
from tproxy.core.events import (
    HeadersReceived,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.sse import Frame


@dataclass(frozen=True, slots=True)
class Chunk:
    """Body bytes as the upstream sent them, and how many events of the family's framing they
    completed. ``whole``: with this chunk the client has the whole answer (its end marker, or
    every byte its ``Content-Length`` announced). ``frames``: the frames the flight's reader
    decoded from these bytes, when its clients capture payloads (None for a body the reader does
    not decode, or when nobody captures: a shared flight's history would hold them, about 2.5
    times the bytes, for nothing)."""

    data: bytes
    events: int = 0
    whole: bool = False
    frames: Sequence[Frame] | None = None


@dataclass(frozen=True, slots=True)
class FlightFailed:
    """The upstream failed. Before the response started, the client is answered with an error
    (:func:`~tproxy.core.replies.rejection_for` of ``error``); after, its body is cut short."""

    error: UpstreamError

    def fact(self, answered: int | None) -> UpstreamFailed | TimedOut:
        """The exchange's fact for this failure; ``answered`` is the error answer's status."""
        if isinstance(self.error, UpstreamTimeout):
            return TimedOut(self.error.phase, answered)
        return UpstreamFailed(str(self.error), answered)


Item = UpstreamRequested | HeadersReceived | Chunk | UpstreamEnded | FlightFailed

Client = TypeVar("Client")


@dataclass(slots=True)
class _History:
    """What a shared flight produced so far, in the order a joiner receives it."""

    attempt: UpstreamRequested | None = None
    start: HeadersReceived | None = None
    chunks: list[Chunk] = field(default_factory=list)
    end: UpstreamEnded | FlightFailed | None = None
    size: int = 0

    def add(self, item: Item) -> None:
        if isinstance(item, Chunk):
            self.size += len(item.data)
            self.chunks.append(item)
        elif isinstance(item, UpstreamRequested):
            self.attempt = item
        elif isinstance(item, HeadersReceived):
            self.start = item
        else:
            self.end = item

    def items(self) -> list[Item]:
        items: list[Item] = [item for item in (self.attempt, self.start) if item is not None]
        items.extend(self.chunks)
        if self.end is not None:
            items.append(self.end)
        return items


@dataclass(slots=True)
class _Lag:
    """How much one client of a shared flight holds: bytes queued or in its writer's hands,
    and items queued (its bound counts the history it joined with)."""

    max_items: int
    held_bytes: int = 0
    queued_items: int = 0


@dataclass(slots=True)
class Joined(Generic[Client]):
    """What a joiner receives: the history, to queue first; ``attached`` is False when the flight
    already ended (queue the history, then close the channel); ``cut_off`` when it could not
    even take the history."""

    history: list[Item]
    attached: bool
    cut_off: bool = False


@dataclass(slots=True)  # not frozen: one per item, where a frozen init costs
class Delivery(Generic[Client]):
    """One item to hand to ``to`` (in order); ``cut_off`` fell behind: close their channels and
    let them leave the flight. ``closed_to_joiners``: with this item the history outgrew its
    bound and was dropped (the flight's book must hear it)."""

    to: list[Client]
    cut_off: list[Client]
    closed_to_joiners: bool = False


@dataclass(slots=True)
class Ending(Generic[Client]):
    """The end of a flight: hand ``to`` the interruption (if any), cut off ``cut_off``, then
    close the channels of ``closing`` (every client still attached)."""

    item: FlightFailed | None
    to: list[Client]
    cut_off: list[Client]
    closing: list[Client]


def _size(item: Item) -> int:
    return len(item.data) if isinstance(item, Chunk) else 0


class Fanout(Generic[Client]):
    """The clients of one flight and what each is owed. Illegal calls (an item after the end, a
    second end or join) raise ``AssertionError``: a bug in the caller, not a state."""

    __slots__ = (
        "_clients",
        "_everyone",
        "_history",
        "_max_history_bytes",
        "_max_items",
        "_max_lag_bytes",
        "ended",
        "joinable",
        "shared",
    )

    def __init__(
        self,
        *,
        shared: bool,
        max_lag_bytes: float = float("inf"),
        max_history_bytes: float = float("inf"),
        max_items: int = 0,
    ) -> None:
        self.shared = shared
        self._max_lag_bytes = max_lag_bytes
        self._max_history_bytes = max_history_bytes
        self._max_items = max_items
        self._clients: dict[Client, _Lag] = {}
        self._everyone: Delivery[Client] = Delivery([], [])  # a private flight's, kept ready
        self._history = _History()
        self.joinable = shared
        self.ended = False

    @property
    def clients(self) -> list[Client]:
        return list(self._clients)

    @property
    def history_bytes(self) -> int:
        return self._history.size

    def held_bytes(self, client: Client) -> int:
        return self._clients[client].held_bytes

    def join(self, client: Client) -> Joined[Client]:
        """Attach ``client``: it first receives what the flight produced so far."""
        assert client not in self._clients, "joined twice"
        history = self._history.items()
        if not self.shared:
            if not self.ended:
                self._clients[client] = _Lag(0)
                self._everyone = Delivery(list(self._clients), [])
            return Joined(history, attached=not self.ended)
        lag = _Lag(self._max_items + len(history))
        for item in history:
            if not self._admit(lag, item):
                return Joined([], attached=False, cut_off=True)
        if self.ended:
            return Joined(history, attached=False)
        self._clients[client] = lag
        return Joined(history, attached=True)

    def publish(self, item: Item) -> Delivery[Client]:
        """Hand ``item`` to every client; a shared flight cuts off those too far behind."""
        assert not self.ended, "published after the end"
        if not self.shared:
            return self._everyone
        closed = self._remember(item)
        return self._offer(item, closed)

    def taken(self, client: Client, items: int) -> None:
        """The client's writer took ``items`` off its channel."""
        lag = self._clients.get(client)
        if lag is not None:
            lag.queued_items -= items

    def sent(self, client: Client, size: int) -> None:
        """The client's writer's ``send()`` of ``size`` bytes it took returned."""
        lag = self._clients.get(client)
        if lag is not None:
            lag.held_bytes -= size

    def leave(self, client: Client) -> bool:
        """Detach ``client``; False when it was no longer attached (cut off, or after the end)."""
        attached = self._clients.pop(client, None) is not None
        if attached and not self.shared:
            self._everyone = Delivery(list(self._clients), [])
        return attached

    def end(self, *, interrupted: bool) -> Ending[Client]:
        """No more items. An interrupted shared flight (cancelled before its end was published)
        tells its clients so without waiting: the delivery hands them a :class:`FlightFailed`
        (cutting off those too far behind). Every client still attached must have its channel
        closed."""
        assert not self.ended, "ended twice"
        failure = None
        delivery: Delivery[Client] = Delivery([], [])
        if interrupted and self.shared:
            failure = FlightFailed(UpstreamBroken("the answer was cancelled"))
            delivery = self._offer(failure, self._remember(failure))
        self.ended = True
        closing = list(self._clients)
        self._clients.clear()
        self._everyone = Delivery([], [])
        return Ending(failure, delivery.to, delivery.cut_off, closing)

    def _remember(self, item: Item) -> bool:
        """Add ``item`` to the history; True when this closes the flight to joiners."""
        if not self.joinable:
            return False
        if self._history.size + _size(item) > self._max_history_bytes:
            self.joinable = False
            self._history = _History()
            return True
        self._history.add(item)
        return False

    def _offer(self, item: Item, closed: bool) -> Delivery[Client]:
        to: list[Client] = []
        cut_off: list[Client] = []
        for client, lag in self._clients.items():
            (to if self._admit(lag, item) else cut_off).append(client)
        for client in cut_off:
            del self._clients[client]
        return Delivery(to, cut_off, closed)

    def _admit(self, lag: _Lag, item: Item) -> bool:
        size = _size(item)
        if lag.held_bytes + size > self._max_lag_bytes or lag.queued_items >= lag.max_items:
            return False
        lag.held_bytes += size
        lag.queued_items += 1
        return True
