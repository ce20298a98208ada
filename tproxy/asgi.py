"""The few ASGI types tproxy uses, so no module but server.py needs Hypercorn's, and the one way
to send an answer that is whole before its first byte goes out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[Message]]
ASGISend = Callable[[Message], Awaitable[None]]


async def send_whole(
    send: ASGISend, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send a one-shot answer (an error, a cache hit, an admin document): its head, then all of
    its body in the one message that ends it. Each ASGI message has a fixed cost in Hypercorn,
    and such an answer has nothing to wait for. ``headers`` are sent as given, in order."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
