"""Several worker processes on one address, supervised: ``tproxy serve --workers N``.

One process serves on one core. With ``server.workers`` above 1 the process that ``tproxy serve``
starts becomes a supervisor: it starts that many workers (``tproxy serve --worker I``), each a
whole server (:func:`tproxy.server.run_until_signalled`) on the same ``listen`` address with
``SO_REUSEPORT`` (the kernel spreads the connections) and the same LMDB store.

Between the supervisor and a worker:

- the worker's **stdin** carries its settings (pickled: the supervisor read and checked the file
  once), then stays open as a lifeline: when it closes, the supervisor is gone and the worker
  drains as on SIGTERM, rather than serving on as an orphan;
- the worker's **stdout** carries one JSON line: where it listens (its admin listener is on
  loopback port 0) or why it could not start. Its logs go to the shared stderr;
- **signals**: the supervisor forwards SIGTERM/SIGINT (drain, then stop at once) and SIGHUP
  (reload certificates). Workers run in their own process group, so a terminal's Ctrl-C reaches
  the supervisor alone, and the unit says ``KillMode=mixed`` so that systemd signals it alone;
- the supervisor's **admin listener** asks every worker's admin listener (each call with its
  own deadline) and answers for them all: ``/metrics`` summed, ``/inflight`` joined, ``/readyz``
  ready when every worker is (:mod:`tproxy.workers_admin`).

Only the supervisor talks to systemd (workers do not inherit ``NOTIFY_SOCKET``): ``READY=1`` once
every worker listens, ``STOPPING=1`` when the drain starts, the watchdog pinged only while every
running worker answers. A worker that dies is restarted after a backoff that doubles up to
:data:`RESTART_BACKOFF_MAX`; one that cannot start (the port taken, the store unusable) stops the
whole service: at the first start at once, later after :data:`MAX_FAILED_STARTS` in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

import trio

from tproxy.admin import read_admin_token
from tproxy.config import Settings, parse_host_port
from tproxy.core.errors import TproxyError, leaf_errors
from tproxy.notify import Notifier, open_notifier
from tproxy.server import (
    STATUS_INTERVAL,
    Certificate,
    Listening,
    note_expiry,
    reload_certificates,
    run_until_signalled,
    start_admin_listener,
)
from tproxy.workers_admin import Answers, WorkersAdmin, ask_workers

log = logging.getLogger("tproxy.workers")

# Seconds a worker has, from its start, to listen or to say why it cannot.
START_TIMEOUT = 30.0
# Restart backoff: the first pause, and the most it doubles to.
RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
# A worker that served this many seconds before it died restarts after the first pause again.
STABLE_AFTER = 60.0
# Failed starts in a row (the worker exited before it listened) that stop the whole service.
MAX_FAILED_STARTS = 5
# Seconds past server.graceful_timeout a draining worker gets before it is stopped at once.
EXIT_MARGIN = 5.0
# Seconds a worker stopped at once gets before SIGKILL.
KILL_TIMEOUT = 5.0

# Variables for systemd: only the supervisor speaks to it.
_SERVICE_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class WorkerFailed(TproxyError):
    """A worker could not start, or kept failing to: the service stops."""


def worker_count(settings: Settings) -> int:
    """``server.workers``, or one per core this process may run on (1 without SO_REUSEPORT)."""
    if settings.server.workers is not None:
        return settings.server.workers
    if not hasattr(socket, "SO_REUSEPORT"):
        return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


async def serve(settings: Settings) -> None:
    """``tproxy serve``: one process as before, or a supervisor and its workers."""
    count = worker_count(settings)
    if count == 1:
        await run_until_signalled(settings)
    else:
        await Supervisor(settings, count).run()


# --- the worker's side ------------------------------------------------------------------------


def read_settings(stream: BinaryIO) -> Settings:
    """The settings the supervisor wrote to a worker's stdin (trusted: our own parent)."""
    settings = pickle.load(stream)
    if not isinstance(settings, Settings):
        raise TypeError(f"expected Settings on stdin, got {type(settings).__name__}")
    return settings


async def run_worker(settings: Settings) -> None:
    """Serve as a worker: report where it listens (or why it cannot) on stdout; drain on
    signals as a single process does, and when the supervisor goes away."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_when_orphaned)
        try:
            await run_until_signalled(settings, on_listening=_report_listening)
        except* (TproxyError, OSError) as group:
            _report({"failed": "; ".join(str(error) for error in leaf_errors(group))})
            raise
        nursery.cancel_scope.cancel()


def _report_listening(listening: Listening) -> None:
    _report({"proxy": listening.proxy, "admin": listening.admin})


def _report(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _drain_when_orphaned() -> None:
    """The supervisor holds our stdin open while it lives: at its end, drain as on SIGTERM."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as lifeline:
        while await lifeline.receive_some():
            pass
    log.warning("the supervisor is gone: draining")
    os.kill(os.getpid(), signal.SIGTERM)


# --- the supervisor ---------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerSlot:
    """One worker's place: replaced processes keep the slot and its number."""

    number: int
    process: trio.Process | None = None
    admin: str | None = None  # the worker's admin URL once it listens
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(frozen=True, slots=True)
class WorkerExit:
    listened: bool
    reason: str


class Supervisor:
    """Runs, restarts and signals the workers; answers the admin listener and systemd."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.slots = [WorkerSlot(number) for number in range(1, count + 1)]
        self.stop = trio.Event()
        self.restarts = 0
        self.listen = settings.server.listen
        self.url = settings.server.listen
        self.token = read_admin_token(settings)
        self._environ = {
            name: value
            for name, value in os.environ.items()
            if name not in _SERVICE_MANAGER_VARIABLES
        }

    @property
    def count(self) -> int:
        return len(self.slots)

    async def run(self) -> None:
        """Serve until the workers have drained after SIGTERM/SIGINT (or could not start)."""
        workers_done = trio.Event()
        async with open_notifier() as notifier:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    admin = WorkersAdmin(self)
                    admin_binds, certificates = await start_admin_listener(
                        nursery, self.settings, admin, workers_done.wait
                    )
                    for certificate in certificates:
                        note_expiry(certificate, admin)
                    nursery.start_soon(self._watch_signals, signals, certificates, admin, notifier)

                    async def run_workers(*, task_status: trio.TaskStatus[None]) -> None:
                        try:
                            await self._run_workers(task_status=task_status)
                        finally:
                            workers_done.set()
                        log.info("tproxy stopped: every worker has exited")
                        nursery.cancel_scope.cancel()

                    await nursery.start(run_workers)
                    log.info(
                        "tproxy listening on %s with %d workers (admin %s)",
                        self.listen,
                        len(self.slots),
                        admin_binds,
                    )
                    await notifier.ready(await self.summary())
                    nursery.start_soon(self._serve_watchdog, notifier)
                    nursery.start_soon(self._report_status, notifier)

    async def _run_workers(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start the first worker (it settles a port 0), then the others; started when all
        listen; returns when all have exited."""
        async with trio.open_nursery() as workers:
            first, *others = self.slots
            await workers.start(self._supervise, first)
            async with trio.open_nursery() as starting:
                for slot in others:
                    starting.start_soon(workers.start, self._supervise, slot)
            task_status.started()

    async def _supervise(self, slot: WorkerSlot, *, task_status: trio.TaskStatus[None]) -> None:
        """Run a slot's worker, and its replacements, until the service stops."""
        failed_starts = 0
        backoff = RESTART_BACKOFF_FIRST
        first = True
        while not self.stop.is_set():
            began = trio.current_time()
            ended = await self._run_process(slot, task_status.started if first else _nothing)
            if first and not ended.listened and self.stop.is_set():
                task_status.started()  # stopped while starting: not a failure
            elif first and not ended.listened:
                raise WorkerFailed(f"worker {slot.number} could not start: {ended.reason}")
            first = False
            if self.stop.is_set():
                log.info("worker %d %s", slot.number, ended.reason)
                return
            failed_starts = 0 if ended.listened else failed_starts + 1
            if failed_starts >= MAX_FAILED_STARTS:
                raise WorkerFailed(
                    f"worker {slot.number} could not start {failed_starts} times in a row,"
                    f" the last: {ended.reason}"
                )
            if ended.listened and trio.current_time() - began >= STABLE_AFTER:
                backoff = RESTART_BACKOFF_FIRST
            log.error("worker %d %s; restarting it in %gs", slot.number, ended.reason, backoff)
            self.restarts += 1
            with trio.move_on_after(backoff):
                await self.stop.wait()
            backoff = min(2 * backoff, RESTART_BACKOFF_MAX)

    async def _run_process(self, slot: WorkerSlot, started: Callable[[], None]) -> WorkerExit:
        """One worker process, from its start to its exit."""
        command = [sys.executable, "-m", "tproxy", "serve", "--worker", str(slot.number)]
        listened = False
        failure = ""
        slot.scope = trio.CancelScope()
        with slot.scope:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        check=False,
                        env=self._environ,
                        process_group=0,
                        deliver_cancel=_stop_at_once,
                    )
                )
                assert process.stdin is not None
                assert process.stdout is not None
                slot.process = process
                if self.stop.is_set():
                    self._drain(slot)
                with contextlib.suppress(trio.BrokenResourceError):  # it died at once
                    await process.stdin.send_all(pickle.dumps(self._worker_settings()))
                reports = _LineReader(process.stdout)
                with trio.move_on_after(START_TIMEOUT) as starting:
                    report = await reports.next_message()
                if starting.cancelled_caught:
                    failure = f"did not listen within {START_TIMEOUT:g}s"
                    nursery.cancel_scope.cancel()
                elif "admin" in report:
                    listened = True
                    self._listening(slot, report)
                    started()
                else:
                    failure = str(report.get("failed", "exited before it listened"))
                while await reports.next_message():
                    pass  # anything else a worker prints on stdout is not ours to read
        slot.process = None
        slot.admin = None
        reason = f"(pid {process.pid}) {_exit_reason(process)}"
        return WorkerExit(listened, f"{reason}: {failure}" if failure else reason)

    def _listening(self, slot: WorkerSlot, report: dict[str, object]) -> None:
        proxy = _strings(report.get("proxy"))
        admin = _strings(report.get("admin"))
        slot.admin = admin[0]
        _host, port = parse_host_port(self.listen)
        if port == 0:
            self.listen = proxy[0].partition("://")[2]  # the others join the port it got
        self.url = proxy[0]
        log.info("worker %d (pid %s) listening, admin %s", slot.number, _pid(slot), slot.admin)

    def _worker_settings(self) -> Settings:
        """A worker's settings: the proxy address shared, the admin listener on loopback."""
        server = dataclasses.replace(
            self.settings.server,
            listen=self.listen,
            admin_listen="127.0.0.1:0",
            reuse_port=True,
            workers=1,
        )
        admin = dataclasses.replace(self.settings.admin, tls_cert=None, tls_key=None)
        admin = dataclasses.replace(admin, tls_client_ca=None)
        return dataclasses.replace(self.settings, server=server, admin=admin, warnings=())

    def _drain(self, slot: WorkerSlot, signum: int = signal.SIGTERM) -> None:
        """Start a worker's drain, bounded by the drain's timeout and :data:`EXIT_MARGIN`."""
        _signal(slot, signum)
        slot.scope.deadline = (
            trio.current_time() + self.settings.server.graceful_timeout + EXIT_MARGIN
        )

    async def _watch_signals(
        self,
        signals: AsyncIterator[int],
        certificates: Sequence[Certificate],
        admin: WorkersAdmin,
        notifier: Notifier,
    ) -> None:
        graceful = self.settings.server.graceful_timeout
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: passed on to every worker")
                reload_certificates(certificates, admin)
                for slot in self.slots:
                    if slot.admin is not None:  # one still starting loads the files anyway
                        _signal(slot, signal.SIGHUP)
            elif not self.stop.is_set():
                log.info("%s: every worker drains for up to %gs", name, graceful)
                self.stop.set()
                for slot in self.slots:
                    self._drain(slot, signum)
                await notifier.stopping(await self.summary())
            else:
                log.warning("%s again: every worker stops now", name)
                for slot in self.slots:
                    _signal(slot, signum)

    async def _serve_watchdog(self, notifier: Notifier) -> None:
        """``WATCHDOG=1`` while every running worker answers ``/healthz`` in time."""
        interval = notifier.watchdog_interval
        if interval is None:
            return
        while True:
            answers = await self.ask_workers("/healthz")
            if answers and all(status == 200 for status, _ in answers.values()):
                await notifier.send("WATCHDOG=1")
            else:
                log.warning("a worker did not answer /healthz: no watchdog ping")
            await trio.sleep(interval)

    async def _report_status(self, notifier: Notifier) -> None:
        if not notifier.enabled:
            return
        while True:
            await trio.sleep(STATUS_INTERVAL)
            await notifier.status(await self.summary())

    async def summary(self) -> str:
        """The status line: ``http://127.0.0.1:8080: 2 of 2 workers, 3 in flight, 0 restarts``."""
        answers = await self.ask_workers("/inflight")
        inflight = sum(_count_of(body) for status, body in answers.values() if status == 200)
        state = "draining: " if self.stop.is_set() else ""
        listening = sum(1 for slot in self.slots if slot.admin is not None)
        return (
            f"{state}{self.url}: {listening} of {len(self.slots)} workers,"
            f" {inflight} in flight, {self.restarts} restarts"
        )

    async def ask_workers(self, path: str) -> Answers:
        """GET ``path`` from every listening worker at once (:func:`ask_workers`)."""
        admins = {slot.number: slot.admin for slot in self.slots if slot.admin is not None}
        return await ask_workers(admins, path, self.token)


def _nothing() -> None:
    """Replaces the first start's ``started``: a restarted worker reports to nobody."""


async def _stop_at_once(process: trio.Process) -> None:
    """Cancelling a worker: drain and stop at once (two signals), SIGKILL if it lingers."""
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    with trio.move_on_after(KILL_TIMEOUT):
        await process.wait()
        return
    log.error("worker (pid %d) did not stop in %gs: SIGKILL", process.pid, KILL_TIMEOUT)
    process.kill()


def _signal(slot: WorkerSlot, signum: int) -> None:
    process = slot.process
    if process is not None and process.returncode is None:
        process.send_signal(signum)


def _pid(slot: WorkerSlot) -> str:
    return "?" if slot.process is None else str(slot.process.pid)


def _exit_reason(process: trio.Process) -> str:
    code = process.returncode
    if code is None:
        return "still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"a worker reported {value!r} where addresses were expected")
    return value


def _count_of(body: bytes) -> int:
    document = json.loads(body)
    return int(document.get("count", 0)) if isinstance(document, dict) else 0


class _LineReader:
    """JSON lines from a worker's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next_message(self) -> dict[str, object]:
        """The next line that holds a JSON object; ``{}`` at the end of the stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    return {}
                self._buffer += chunk
                continue
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message:
                return message
