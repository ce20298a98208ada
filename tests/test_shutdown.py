"""Graceful shutdown, seen from outside: a real ``python -m tproxy serve`` process, real signals.

Each test starts the fake upstream in its own nursery and tproxy as a subprocess whose
``NOTIFY_SOCKET`` is a datagram socket bound by the test: ``READY=1`` says when (and, in its
``STATUS=``, where) the proxy listens, ``STOPPING=1`` when a signal has started the drain. Nothing
here sleeps to synchronise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx2
import pytest
import trio

from tests.fakeupstream import FakeUpstream, stream_events
from tproxy import server
from tproxy.config import Overrides, load_settings
from tproxy.notify import socket_address
from tproxy.store import LmdbStore

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0
_URL = re.compile(r"http://127\.0\.0\.1:\d+")


@dataclass
class Tproxy:
    """A running ``tproxy serve`` process and what the test needs to talk to it."""

    process: trio.Process
    url: str
    notifications: trio.socket.SocketType
    stderr: Path
    store: Path

    async def wait_for(self, assignment: str) -> list[str]:
        return await wait_for(self.notifications, assignment)

    async def exit_code(self, within: float) -> int:
        with trio.fail_after(within):
            return await self.process.wait()

    def log_records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line]

    def messages(self) -> list[str]:
        return [str(record["message"]) for record in self.log_records() if "message" in record]


async def wait_for(notifications: trio.socket.SocketType, assignment: str) -> list[str]:
    """The next notification that contains ``assignment`` (others are skipped)."""
    with trio.fail_after(STARTUP_TIMEOUT):
        for _ in range(100):
            received = (await notifications.recv(65536)).decode().split("\n")
            if assignment in received:
                return received
    raise AssertionError(f"no {assignment} among 100 notifications")


@asynccontextmanager
async def running_tproxy(
    nursery: trio.Nursery,
    tmp_path: Path,
    upstream: FakeUpstream,
    graceful_timeout: float,
    more_toml: str = "",
) -> AsyncIterator[Tproxy]:
    """A ``tproxy serve`` process with its config and store in ``tmp_path``, ready."""
    config = tmp_path / "tproxy.toml"
    config.write_text(f"[server]\ngraceful_timeout = {graceful_timeout}\n{more_toml}")
    store = tmp_path / "store"
    name = f"@tproxy-test-{uuid.uuid4().hex}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = name
    command = [
        sys.executable,
        "-m",
        "tproxy",
        "serve",
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.url,
        "--cache-dir",
        str(store),
    ]
    stderr_path = tmp_path / "stderr.log"
    with (
        trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as notifications,
        stderr_path.open("wb") as stderr,
    ):
        await notifications.bind(socket_address(name))
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                check=False,
                stdin=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd=REPO,
            )
        )
        tproxy = Tproxy(process, "", notifications, stderr_path, store)
        ready = await tproxy.wait_for("READY=1")
        status = next(item for item in ready if item.startswith("STATUS="))
        match = _URL.search(status)
        assert match is not None, status
        tproxy.url = match.group()
        yield tproxy


def chat(words: int) -> dict[str, object]:
    content = " ".join(f"word{index}" for index in range(words))
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": True}


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def whole_stream(body: dict[str, object]) -> bytes:
    return b"".join(event + b"\n\n" for event in stream_events(body))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stream_in_flight_finishes_within_the_graceful_timeout_then_exit_0(
    nursery: trio.Nursery,
    tmp_path: Path,
    upstream: FakeUpstream,
    signum: signal.Signals,
) -> None:
    body = chat(8)
    async with (
        running_tproxy(nursery, tmp_path, upstream, graceful_timeout=5.0) as tproxy,
        httpx2.AsyncClient(base_url=tproxy.url, timeout=10.0) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-fake-delay": "0.1"}
        ) as response,
    ):
        received = b""
        async for chunk in response.aiter_raw():
            if not received:
                tproxy.process.send_signal(signum)
                await tproxy.wait_for("STOPPING=1")
            received += chunk
    assert received == whole_stream(body)
    assert await tproxy.exit_code(within=5.0) == 0
    messages = tproxy.messages()
    assert f"{signum.name}: stopped accepting; draining for up to 5s" in messages
    assert "tproxy stopped" in messages
    store = LmdbStore.open_existing(tproxy.store)
    try:
        assert store.stats().entries == 1  # the store writer drained before the store closed
    finally:
        store.close()


@pytest.mark.slow
async def test_a_stream_longer_than_the_graceful_timeout_is_cut_and_recorded_as_shut_down(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with (
        running_tproxy(nursery, tmp_path, upstream, graceful_timeout=0.5) as tproxy,
        httpx2.AsyncClient(base_url=tproxy.url, timeout=10.0) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(40), headers={"x-fake-delay": "0.1"}
        ) as response,
    ):
        chunks = response.aiter_raw()
        await anext(chunks)
        tproxy.process.send_signal(signal.SIGTERM)
        await tproxy.wait_for("STOPPING=1")
        with pytest.raises(httpx2.RemoteProtocolError):
            await read_all(chunks)
    assert await tproxy.exit_code(within=5.0) == 0
    assert not any("again" in message for message in tproxy.messages())
    with trio.fail_after(5):
        await upstream.disconnected.wait()  # the cut closed the upstream: generation stops
    access = [r for r in tproxy.log_records() if r.get("logger") == "tproxy.access"]
    assert [entry["state"] for entry in access] == ["shut_down"]
    store = LmdbStore.open_existing(tproxy.store)
    try:
        assert store.stats().entries == 0  # a cut stream is never stored
    finally:
        store.close()


@pytest.mark.slow
async def test_a_second_signal_cancels_the_drain_at_once_and_the_store_stays_usable(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    stalled = {"x-fake-stall-after": "2"}
    async with (
        running_tproxy(nursery, tmp_path, upstream, graceful_timeout=60.0) as tproxy,
        httpx2.AsyncClient(base_url=tproxy.url, timeout=10.0) as client,
        client.stream("POST", "/v1/chat/completions", json=chat(5), headers=stalled) as response,
    ):
        chunks = response.aiter_raw()
        await anext(chunks)
        tproxy.process.send_signal(signal.SIGTERM)
        await tproxy.wait_for("STOPPING=1")
        tproxy.process.send_signal(signal.SIGTERM)
        assert await tproxy.exit_code(within=5.0) == 0
        with pytest.raises(httpx2.RemoteProtocolError):
            await read_all(chunks)
    assert "SIGTERM again: cancelling the drain, stopping now" in tproxy.messages()
    store = LmdbStore.open_existing(tproxy.store)
    try:
        assert store.stats().entries == 0
    finally:
        store.close()


@pytest.mark.slow
async def test_sighup_is_refused_with_a_log_line_and_the_server_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with running_tproxy(nursery, tmp_path, upstream, graceful_timeout=5.0) as tproxy:
        tproxy.process.send_signal(signal.SIGHUP)
        async with httpx2.AsyncClient(base_url=tproxy.url, timeout=10.0) as client:
            response = await client.post("/v1/chat/completions", json=chat(3))
        assert response.status_code == 200
        assert tproxy.process.returncode is None
        tproxy.process.send_signal(signal.SIGTERM)
        assert await tproxy.exit_code(within=5.0) == 0
    assert any("reload is not supported" in message for message in tproxy.messages())


async def test_in_process_the_service_manager_hears_ready_status_watchdog_and_stopping(
    tmp_path: Path,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same path as the processes above, inside this one, with short intervals."""
    name = f"@tproxy-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(server, "STATUS_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, logger="tproxy")
    settings = load_settings(
        None,
        Overrides(
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            upstream=upstream.url,
            cache_dir=tmp_path / "store",
        ),
    )
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as notifications:
        await notifications.bind(socket_address(name))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run_until_signalled, settings)
            ready = await wait_for(notifications, "READY=1")
            assert ready[1].endswith(": 0 in flight, 0 handled")
            await wait_for(notifications, "WATCHDOG=1")
            status = await wait_for(notifications, ready[1])  # the periodic STATUS= line
            assert status == [ready[1]]
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
            stopping = await wait_for(notifications, "STOPPING=1")
            assert stopping[1].startswith("STATUS=draining http://127.0.0.1:")
    assert "reload is not supported" in caplog.text
    assert "tproxy stopped" in caplog.text


async def non_reading_client(url: str, words: int) -> trio.SocketStream:
    """A client that asks for a long stream, reads its first bytes, then never reads again (its
    receive buffer kept small, so the server's writes soon block)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    body = json.dumps(chat(words)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    await stream.send_all(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
    assert await stream.receive_some(1024)  # the answer has started
    return stream


@pytest.mark.slow
async def test_a_client_that_never_reads_holds_the_drain_no_longer_than_the_graceful_timeout(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Hypercorn's writes wait in a cancel shield; at the drain's deadline the sockets still open
    are closed, so the drain ends at ``graceful_timeout`` and not when the kernel gives up on the
    client (``client_stall_timeout``, a minute by default)."""
    async with running_tproxy(nursery, tmp_path, upstream, graceful_timeout=1.0) as tproxy:
        client = await non_reading_client(tproxy.url, 40000)
        async with client:
            tproxy.process.send_signal(signal.SIGTERM)
            await tproxy.wait_for("STOPPING=1")
            assert await tproxy.exit_code(within=15.0) == 0
    access = [r for r in tproxy.log_records() if r.get("logger") == "tproxy.access"]
    assert [entry["state"] for entry in access] == ["shut_down"]


@pytest.mark.slow
async def test_a_second_signal_stops_at_once_even_with_a_client_that_never_reads(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with running_tproxy(nursery, tmp_path, upstream, graceful_timeout=60.0) as tproxy:
        client = await non_reading_client(tproxy.url, 40000)
        async with client:
            tproxy.process.send_signal(signal.SIGTERM)
            await tproxy.wait_for("STOPPING=1")
            tproxy.process.send_signal(signal.SIGTERM)
            assert await tproxy.exit_code(within=10.0) == 0
    assert "SIGTERM again: cancelling the drain, stopping now" in tproxy.messages()
