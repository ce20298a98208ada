"""The systemd notify protocol: tell the service manager we are ready, stopping, alive, and how.

Under ``Type=notify`` systemd passes the path of a datagram socket in ``NOTIFY_SOCKET`` and waits
for ``READY=1`` before it calls the service started. Each notification is one datagram of
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once the proxy listens, ``STOPPING=1``
when a drain starts, ``STATUS=...`` for the line ``systemctl status`` shows, ``WATCHDOG=1`` as
the heartbeat when the unit sets ``WatchdogSec`` (systemd then passes ``WATCHDOG_USEC``, and
``WATCHDOG_PID`` when the heartbeat is expected from one process only). A socket name starting
with ``@`` is in the abstract namespace: the ``@`` stands for a leading NUL byte.

Without ``NOTIFY_SOCKET`` every method is a silent no-op, so the same code runs on a laptop.
Notifications never stop the proxy: a send that fails or would block for longer than
:data:`SEND_TIMEOUT` is dropped with one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

log = logging.getLogger("tproxy.notify")

# A datagram to a service manager that stopped reading is given up after this many seconds.
SEND_TIMEOUT = 1.0


class Notifier:
    """One open notify socket, or none; build it with :func:`open_notifier`."""

    def __init__(
        self, sock: trio.socket.SocketType | None, name: str, watchdog_interval: float | None
    ) -> None:
        self._sock = sock
        self._name = name
        self._watchdog_interval = watchdog_interval
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens: only then is there anything to report."""
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two heartbeats (half of ``WATCHDOG_USEC``), or None: no watchdog."""
        return self._watchdog_interval

    async def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False if it could not be sent."""
        if self._sock is None:
            return False
        message = "\n".join(assignments).encode()
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await self._sock.send(message)
            except OSError as error:
                self._warn(f"could not notify the service manager at {self._name}: {error}")
                return False
            return True
        self._warn(f"the service manager at {self._name} did not take a notification")
        return False

    async def ready(self, status: str) -> bool:
        return await self.send("READY=1", status_assignment(status))

    async def stopping(self, status: str) -> bool:
        return await self.send("STOPPING=1", status_assignment(status))

    async def status(self, status: str) -> bool:
        return await self.send(status_assignment(status))

    async def serve_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval` seconds, forever.

        The ping comes from the event loop itself, so it stops when the loop is stuck: that is
        what the watchdog is for. Returns at once when no watchdog is wanted.
        """
        interval = self._watchdog_interval
        if interval is None or self._sock is None:
            return
        while True:
            await self.send("WATCHDOG=1")
            await trio.sleep(interval)

    def _warn(self, message: str) -> None:
        """Warn once: a service manager that is gone would otherwise fill the log."""
        if not self._warned:
            self._warned = True
            log.warning(message)


def status_assignment(text: str) -> str:
    """``STATUS=`` with ``text`` on one line: a newline would start another assignment."""
    return "STATUS=" + " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds when the watchdog is meant for ``pid``, else None."""
    raw_usec = environ.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None and raw_pid.strip() != str(pid):
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", raw_usec)
        return None
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not positive", raw_usec)
        return None
    return usec / 2_000_000


def socket_address(name: str) -> str:
    """The ``AF_UNIX`` address of a ``NOTIFY_SOCKET`` value: ``@name`` is abstract (NUL)."""
    return "\0" + name[1:] if name.startswith("@") else name


@asynccontextmanager
async def open_notifier(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> AsyncIterator[Notifier]:
    """A :class:`Notifier` for the service manager named in ``environ`` (default: ours).

    Without ``NOTIFY_SOCKET``, with one that is neither a path nor an ``@`` name, or with one
    nobody listens on, the notifier does nothing (the last two are logged). The socket is
    connected once: only a connected datagram socket waits for room in the receiver's queue;
    an unconnected one would report itself writable while every send fails.
    """
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if not name.startswith(("/", "@")) or len(name) < 2:
        if name:
            log.warning("ignoring NOTIFY_SOCKET=%r: expected a path or an @ name", name)
        yield Notifier(None, name, None)
        return
    interval = watchdog_interval(env, os.getpid() if pid is None else pid)
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as sock:
        try:
            await sock.connect(socket_address(name))
        except OSError as error:
            log.warning("cannot notify the service manager at %s: %s", name, error)
            yield Notifier(None, name, None)
        else:
            yield Notifier(sock, name, interval)
