"""The accept loop of ``tproxy/serving.py``: what it adds to Hypercorn's connection code.

Prompt closing after a client's FIN and closes that never race a write are tested with the other
client faults (``tests/faults/test_client_faults.py``); this file holds the rest.
"""

from __future__ import annotations

import logging

import httpx2
import pytest
import trio
from hypercorn.events import Event, RawData
from hypercorn.protocol.h11 import H11Protocol

from tests.conftest import RunningProxy
from tests.security.rawhttp import address


async def test_a_connection_that_fails_is_closed_and_the_server_goes_on(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one connection's code (injected: Hypercorn's HTTP/1.1 handler raising on one
    connection's bytes) closes that connection and is logged; it never ends the server, which
    Hypercorn's own loop would let it do."""
    handle = H11Protocol.handle

    async def failing(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"BOOM"):
            raise RuntimeError("injected")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", failing)
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(b"BOOM / HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        assert (await http.get("/v1/models")).status_code == 200
    failures = [r for r in caplog.records if r.name == "tproxy.serving"]
    assert [r.levelno for r in failures] == [logging.ERROR]
    assert "RuntimeError at " in failures[0].getMessage()


async def test_a_failing_connection_logs_no_request_bytes_and_a_flood_logs_one_line(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Exception messages can quote what the client sent (an authorization header, decoded):
    the log names the exception and where it was raised, never its message or traceback. Many
    failures in a row log one line, so a client cannot flood the error log."""
    handle = H11Protocol.handle

    async def failing(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"BOOM"):
            raise ValueError(f"cannot parse {event.data!r}")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", failing)
    for _ in range(20):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(b"BOOM / HTTP/1.1\r\nauthorization: Bearer sk-secret\r\n\r\n")
            with trio.fail_after(5):
                assert await stream.receive_some() == b""
    failures = [r for r in caplog.records if r.name == "tproxy.serving"]
    assert len(failures) == 1
    assert failures[0].exc_info is None
    assert "ValueError at " in failures[0].getMessage()
    assert "sk-secret" not in caplog.text
