"""The few ASGI types tproxy uses, so no module but server.py needs Hypercorn's, and the one way
to send an answer that is whole before its first byte goes out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[Message]]
ASGISend = Callable[[Message], Awaitable[None]]

# The scope extension through which tproxy's server tells the app that a client left.
DEPARTURE = "tproxy.departure"


class Departure(Protocol):
    """A request's client departure, told to a listener: what ``http.disconnect`` on
    ``receive()`` says, without a task waiting on ``receive()`` for the whole answer."""

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` once when the client leaves (at once if it has already left);
        None stops listening. It runs in the server's reading task: it must not block or
        raise."""


async def send_whole(
    send: ASGISend, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send a one-shot answer (an error, a cache hit, an admin document): its head, then all of
    its body in the one message that ends it. Each ASGI message has a fixed cost in Hypercorn,
    and such an answer has nothing to wait for. ``headers`` are sent as given, in order."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
