"""The systemd notify protocol, spoken to a real AF_UNIX datagram socket bound by each test."""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tproxy.notify import (
    SEND_TIMEOUT,
    open_notifier,
    socket_address,
    status_assignment,
    watchdog_interval,
)


class ServiceManager:
    """The receiving end of NOTIFY_SOCKET, as systemd holds it."""

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self.sock = sock
        self.name = name

    async def receive(self) -> list[str]:
        """The assignments of the next datagram, in order."""
        with trio.fail_after(5):
            datagram = await self.sock.recv(65536)
        return datagram.decode().split("\n")


async def bind_manager(name: str) -> AsyncIterator[ServiceManager]:
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(socket_address(name))
        yield ServiceManager(sock, name)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ServiceManager]:
    """A service manager listening on a socket file."""
    async for bound in bind_manager(str(tmp_path / "notify")):
        yield bound


@pytest.fixture
async def abstract_manager() -> AsyncIterator[ServiceManager]:
    """A service manager listening on an abstract socket name (``@...``), as systemd does."""
    async for bound in bind_manager(f"@tproxy-test-{uuid.uuid4().hex}"):
        yield bound


async def test_without_notify_socket_everything_is_a_silent_no_op(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_notifier({}) as notifier:
        assert not notifier.enabled
        assert notifier.watchdog_interval is None
        assert not await notifier.ready("listening")
        assert not await notifier.stopping("draining")
        assert not await notifier.status("busy")
        await notifier.serve_watchdog()  # returns at once: nothing to ping
    assert caplog.records == []


async def test_ready_and_status_reach_a_socket_file(manager: ServiceManager) -> None:
    async with open_notifier({"NOTIFY_SOCKET": manager.name}) as notifier:
        assert notifier.enabled
        assert await notifier.ready("http://127.0.0.1:8080: 0 in flight")
        assert await manager.receive() == ["READY=1", "STATUS=http://127.0.0.1:8080: 0 in flight"]
        assert await notifier.status("2 in flight")
        assert await manager.receive() == ["STATUS=2 in flight"]


async def test_an_at_sign_names_an_abstract_socket(abstract_manager: ServiceManager) -> None:
    async with open_notifier({"NOTIFY_SOCKET": abstract_manager.name}) as notifier:
        assert await notifier.stopping("draining")
    assert await abstract_manager.receive() == ["STOPPING=1", "STATUS=draining"]


def test_abstract_names_start_with_a_nul_byte_and_paths_stay_as_they_are() -> None:
    assert socket_address("@systemd/notify") == "\0systemd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_a_status_stays_on_one_line_so_it_cannot_smuggle_an_assignment() -> None:
    assert status_assignment("busy\nREADY=1") == "STATUS=busy READY=1"
    assert status_assignment("  two   spaces\t") == "STATUS=two spaces"


async def test_a_relative_notify_socket_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_notifier({"NOTIFY_SOCKET": "notify.sock"}) as notifier:
        assert not notifier.enabled
    assert "ignoring NOTIFY_SOCKET='notify.sock'" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
    ids=["unset", "half", "our-pid", "another-pid", "not-a-number", "zero"],
)
def test_the_watchdog_pings_at_half_its_timeout_and_only_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, 4242) == expected


async def test_watchdog_pings_arrive_at_half_of_watchdog_usec(manager: ServiceManager) -> None:
    environ = {"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": "100000"}
    async with open_notifier(environ) as notifier, trio.open_nursery() as nursery:
        assert notifier.watchdog_interval == 0.05
        nursery.start_soon(notifier.serve_watchdog)
        arrivals = []
        for _ in range(3):
            assert await manager.receive() == ["WATCHDOG=1"]
            arrivals.append(trio.current_time())
        nursery.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.045 for gap in gaps), gaps


async def test_a_watchdog_meant_for_another_process_is_not_pinged(
    manager: ServiceManager,
) -> None:
    environ = {
        "NOTIFY_SOCKET": manager.name,
        "WATCHDOG_USEC": "100000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    async with open_notifier(environ) as notifier:
        assert notifier.watchdog_interval is None
        await notifier.serve_watchdog()  # returns at once


async def test_a_notify_socket_nobody_listens_on_disables_the_notifier_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nobody = str(tmp_path / "nobody-listens")
    async with open_notifier({"NOTIFY_SOCKET": nobody}) as notifier:
        assert not notifier.enabled
        assert not await notifier.ready("listening")
    assert f"cannot notify the service manager at {nobody}" in caplog.text


async def test_a_service_manager_that_goes_away_is_reported_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async for manager in bind_manager(f"@tproxy-test-{uuid.uuid4().hex}"):
        async with open_notifier({"NOTIFY_SOCKET": manager.name}) as notifier:
            manager.sock.close()
            assert not await notifier.ready("listening")
            assert not await notifier.status("still here")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not notify the service manager" in warnings[0].getMessage()


async def test_a_service_manager_that_stops_reading_costs_at_most_the_send_timeout(
    manager: ServiceManager, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_notifier({"NOTIFY_SOCKET": manager.name}) as notifier:
        for _ in range(10_000):  # the socket's queue holds far fewer datagrams than this
            started = trio.current_time()
            if not await notifier.status("x" * 1000):
                break
        else:
            pytest.fail("the receiving socket never filled up")
        assert trio.current_time() - started == SEND_TIMEOUT
