"""The admin listener: liveness and readiness, on an address apart from the proxy's."""

from __future__ import annotations

import json

from tproxy.app import serve_lifespan
from tproxy.asgi import ASGIReceive, ASGISend, Scope
from tproxy.core.errors import StoreError
from tproxy.store import CacheStore


class AdminApp:
    """``/healthz``: the process answers. ``/readyz``: the store is open and readable."""

    def __init__(self, store: CacheStore | None) -> None:
        self._store = store

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await _reply(send, 200, {"status": "ok"})
        elif path == "/readyz":
            await _reply(send, *self._readiness())
        else:
            await _reply(send, 404, {"error": f"no admin endpoint {path}"})

    def _readiness(self) -> tuple[int, dict[str, object]]:
        if self._store is None:
            return 200, {"status": "ready", "cache": "disabled"}
        try:
            stats = self._store.stats()
        except StoreError as error:
            return 503, {"status": "not ready", "cache": str(error)}
        return 200, {"status": "ready", "cache": "open", "entries": stats.entries}


async def _reply(send: ASGISend, status: int, document: dict[str, object]) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
