"""``tproxy serve --workers N``: a supervisor and its workers, as real processes on 127.0.0.1.

Each test starts ``python -m tproxy serve --workers 2`` and follows it by its log (JSON lines on
stderr, read as they come): where it listens, which worker has which pid and admin address.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx2
import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.fakeupstream import FakeUpstream
from tests.tlsfiles import write_pair
from tproxy.notify import socket_address
from tproxy.tls import read_certificate

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
_LISTENING = re.compile(r"tproxy listening on (\S+) with \d+ workers \(admin \['([^']+)'\]\)")
_WORKER = re.compile(r"worker (\d+) \(pid (\d+)\) listening, admin (\S+)")


@dataclass
class Service:
    """A running supervisor: its process, its log so far, its addresses."""

    process: trio.Process
    messages: list[str] = field(default_factory=list)
    records: list[dict[str, object]] = field(default_factory=list)  # its JSON lines
    logged: trio.Event = field(default_factory=trio.Event)
    url: str = ""
    admin: str = ""

    async def read_log(self, stderr: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    self.messages.append(line.decode(errors="replace"))
                else:
                    self.records.append(record)
                    self.messages.append(str(record.get("message", "")))
            self.logged.set()
            self.logged = trio.Event()
        self.logged.set()

    def access_lines(self) -> list[dict[str, object]]:
        return [record for record in self.records if record["logger"] == "tproxy.access"]

    async def wait_for(self, pattern: re.Pattern[str] | str, *, after: int = 0) -> re.Match[str]:
        """The first message from index ``after`` on that matches ``pattern``."""
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                for message in self.messages[after:]:
                    found = re.search(pattern, message)
                    if found:
                        return found
                if self.process.returncode is not None and self.logged.is_set():
                    raise AssertionError(f"no {pattern!r} in {self.messages}")
                await self.logged.wait()

    async def workers(self, *, after: int = 0) -> dict[int, tuple[int, str]]:
        """Each worker's pid and admin URL, from the log."""
        found: dict[int, tuple[int, str]] = {}
        while len(found) < 2:
            match = await self.wait_for(_WORKER, after=after)
            found.setdefault(int(match[1]), (int(match[2]), match[3]))
            after = self.messages.index(match.string, after) + 1
        return found

    async def exit_code(self) -> int:
        with trio.fail_after(STARTUP_TIMEOUT):
            return await self.process.wait()


def command(
    upstream: FakeUpstream, tmp_path: Path, listen: str = "127.0.0.1:0", extra: str = ""
) -> list[str]:
    config = tmp_path / "tproxy.toml"
    config.write_text(
        f'[server]\nworkers = 2\ngraceful_timeout = 5\n[log]\nformat = "json"\n{extra}'
    )
    return [
        *(sys.executable, "-m", "tproxy", "serve", "--config", str(config)),
        *("--listen", listen, "--admin-listen", "127.0.0.1:0"),
        *("--upstream", upstream.url, "--cache-dir", str(tmp_path / "store")),
    ]


@asynccontextmanager
async def running(
    nursery: trio.Nursery, argv: list[str], environ: dict[str, str] | None = None
) -> AsyncIterator[Service]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**env, **(environ or {})},
            cwd=REPO,
        )
    )
    assert process.stderr is not None
    service = Service(process)
    nursery.start_soon(service.read_log, process.stderr)
    try:
        yield service
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGTERM)
            await service.exit_code()


async def started(nursery: trio.Nursery, service: Service) -> Service:
    listening = await service.wait_for(_LISTENING)
    service.url, service.admin = f"http://{listening[1]}", listening[2]
    return service


def chat() -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": "shared store"}]}


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a family's samples named ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def scrape(http: httpx2.AsyncClient, admin: str) -> str:
    response = await http.get(f"{admin}/metrics")
    assert response.status_code == 200, response.text
    return response.text


async def test_two_workers_answer_on_one_port_share_one_store_and_the_admin_sums(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        workers = await service.workers()
        statuses: list[str] = []
        async with httpx2.AsyncClient(timeout=10) as http:
            first = await http.post(f"{service.url}/v1/chat/completions", json=chat())
            statuses.append(first.headers["cache-status"])
            for _ in range(500):  # the store writer commits after the answer: nothing to await
                if total(await scrape(http, service.admin), "tproxy_cache_entries") == 1:
                    break
                await trio.sleep(0.02)
            answered: dict[int, float] = {}
            for _ in range(60):  # a new connection each time: the kernel picks a worker
                if len(answered) == 2 and all(answered.values()):
                    break
                async with httpx2.AsyncClient(timeout=10) as fresh:
                    response = await fresh.post(f"{service.url}/v1/chat/completions", json=chat())
                statuses.append(response.headers["cache-status"])
                for number, (_, admin) in workers.items():
                    answered[number] = total(await scrape(http, admin), "tproxy_cache_hits_total")
            merged = await scrape(http, service.admin)
            per_worker = [await scrape(http, admin) for _, admin in workers.values()]
            ready = await http.get(f"{service.admin}/readyz")
            inflight = (await http.get(f"{service.admin}/inflight")).json()
            healthy = await http.get(f"{service.admin}/healthz")
        with trio.fail_after(STARTUP_TIMEOUT):  # access lines are written off the answers' path
            while len(service.access_lines()) < len(statuses):
                await service.logged.wait()
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert sorted(ready.json()["workers"]) == ["1", "2"]
    assert inflight == {"count": 0, "exchanges": []}
    assert healthy.status_code == 200
    assert all(answered.values()), answered  # each worker had a hit...
    assert upstream.calls["/v1/chat/completions"] == 1  # ...on the one entry the first stored
    assert all("hit" in status for status in statuses[1:]), statuses
    requests = [total(text, "tproxy_requests_total") for text in per_worker]
    assert total(merged, "tproxy_requests_total") == sum(requests) == len(statuses)
    assert total(merged, "tproxy_cache_entries") == 1  # the shared store, counted once
    assert total(merged, "tproxy_workers") == 2
    assert total(merged, "tproxy_build_info") == 1
    access = service.access_lines()
    assert len(access) == len(statuses)
    assert {record["worker"] for record in access} == {1, 2}  # each line names its worker
    supervisor = [record for record in service.records if record["logger"] == "tproxy.workers"]
    assert supervisor  # "worker 1 (pid ...) listening", ...: the supervisor's own lines
    assert all("worker" not in record for record in supervisor)


async def test_a_killed_worker_is_restarted_and_the_service_keeps_answering(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        workers = await service.workers()
        pid, _ = workers[1]
        mark = len(service.messages)
        os.kill(pid, signal.SIGKILL)
        await service.wait_for(rf"worker 1 \(pid {pid}\) was killed by SIGKILL; restarting")
        replaced = await service.wait_for(_WORKER, after=mark)
        assert replaced[1] == "1"
        assert int(replaced[2]) != pid
        async with httpx2.AsyncClient(timeout=10) as http:
            for index in range(10):
                async with httpx2.AsyncClient(timeout=10) as fresh:
                    response = await fresh.get(f"{service.url}/v1/models/{index}")
                assert response.status_code == 200
            merged = await scrape(http, service.admin)
    assert total(merged, "tproxy_worker_restarts_total") == 1


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    body = {**chat(), "stream": True}
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        await service.workers()
        async with (
            httpx2.AsyncClient(timeout=10) as http,
            http.stream(
                "POST",
                f"{service.url}/v1/chat/completions",
                json=body,
                headers={"x-fake-delay": "0.05"},
            ) as response,
        ):
            received = b""
            async for chunk in response.aiter_raw():
                if not received:
                    service.process.send_signal(signal.SIGTERM)
                received += chunk
        assert received.rstrip().endswith(b"data: [DONE]")  # the stream finished in the drain
        assert await service.exit_code() == 0
    assert "SIGTERM: every worker drains for up to 5s" in service.messages
    assert service.messages.count("SIGTERM: stopped accepting; draining for up to 5s") == 2
    assert "tproxy stopped: every worker has exited" in service.messages


async def test_a_second_sigterm_stops_every_worker_at_once(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    words = " ".join(f"word{index}" for index in range(100))
    body = {"model": "fake", "messages": [{"role": "user", "content": words}], "stream": True}
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        await service.workers()
        async with (
            httpx2.AsyncClient(timeout=10) as http,
            http.stream(
                "POST",
                f"{service.url}/v1/chat/completions",
                json=body,
                headers={"x-fake-delay": "0.1"},  # 10 s: longer than the 5 s drain
            ) as response,
        ):
            chunks = response.aiter_raw()
            await anext(chunks)
            mark = len(service.messages)
            service.process.send_signal(signal.SIGTERM)
            for _ in range(2):  # each worker has taken the first signal
                found = await service.wait_for("SIGTERM: stopped accepting", after=mark)
                mark = service.messages.index(found.string, mark) + 1
            service.process.send_signal(signal.SIGTERM)
            with pytest.raises(httpx2.RemoteProtocolError):
                async for _ in chunks:
                    pass
        assert await service.exit_code() == 0
    assert "SIGTERM again: every worker stops now" in service.messages
    # the worker with the stream (the idle one may have drained and exited already)
    assert "SIGTERM again: cancelling the drain, stopping now" in service.messages


async def test_the_admin_token_guards_the_supervisor_and_is_passed_to_the_workers(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    argv = command(upstream, tmp_path, extra='[admin]\ntoken_env = "TEST_ADMIN_TOKEN"\n')
    async with running(nursery, argv, {"TEST_ADMIN_TOKEN": "s3cret"}) as service:
        await started(nursery, service)
        workers = await service.workers()
        async with httpx2.AsyncClient(timeout=10) as http:
            refused = await http.get(f"{service.admin}/metrics")
            worker_refused = await http.get(f"{workers[1][1]}/metrics")
            http.headers["authorization"] = "Bearer s3cret"
            merged = await scrape(http, service.admin)
            ready = await http.get(f"{service.admin}/readyz")
    assert refused.status_code == 401
    assert worker_refused.status_code == 401  # a worker's own listener asks for it too
    assert total(merged, "tproxy_workers") == 2
    assert ready.status_code == 200


async def test_the_supervisors_admin_listener_serves_https_with_admin_tls(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "admin-tls")
    extra = f'[admin]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    async with running(nursery, command(upstream, tmp_path, extra=extra)) as service:
        await started(nursery, service)
        workers = await service.workers()
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with httpx2.AsyncClient(verify=trusting, timeout=10) as https:
            merged = await scrape(https, service.admin)
        async with httpx2.AsyncClient(timeout=10) as http:  # workers: plain, on loopback
            worker = await scrape(http, workers[1][1])
    assert service.admin.startswith("https://")
    assert total(merged, "tproxy_workers") == 2
    assert total(worker, "tproxy_build_info") == 1
    expiry = "tproxy_tls_certificate_expiry_timestamp_seconds"
    assert total(merged, expiry, listener="admin") == read_certificate(cert).not_after.timestamp()


async def test_sighup_is_passed_on_to_every_worker(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        await service.workers()
        mark = len(service.messages)
        service.process.send_signal(signal.SIGHUP)
        await service.wait_for("SIGHUP: passed on to every worker", after=mark)
        for _ in range(2):  # without TLS each worker says that it reloads nothing
            found = await service.wait_for("SIGHUP: reload is not supported", after=mark)
            mark = service.messages.index(found.string, mark) + 1
        service.process.send_signal(signal.SIGTERM)
        assert await service.exit_code() == 0


async def test_the_supervisor_pings_the_watchdog_while_its_workers_answer(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    name = f"@tproxy-test-{uuid.uuid4().hex}"
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as manager:
        await manager.bind(socket_address(name))
        environ = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"}
        async with running(nursery, command(upstream, tmp_path), environ):
            with trio.fail_after(STARTUP_TIMEOUT):
                assert (await manager.recv(65536)).startswith(b"READY=1\n")
                for _ in range(2):
                    assert await manager.recv(65536) == b"WATCHDOG=1"


async def test_ready_and_stopping_come_from_the_supervisor_alone(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    name = f"@tproxy-test-{uuid.uuid4().hex}"
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as manager:
        await manager.bind(socket_address(name))
        argv = command(upstream, tmp_path)
        async with running(nursery, argv, {"NOTIFY_SOCKET": name}) as service:
            with trio.fail_after(STARTUP_TIMEOUT):
                ready = (await manager.recv(65536)).decode().split("\n")
            assert ready[0] == "READY=1"
            assert re.fullmatch(r"STATUS=http://127\.0\.0\.1:\d+: 2 of 2 workers, .*", ready[1])
            service.process.send_signal(signal.SIGTERM)
            with trio.fail_after(STARTUP_TIMEOUT):
                stopping = (await manager.recv(65536)).decode().split("\n")
            assert stopping[0] == "STOPPING=1"
            assert await service.exit_code() == 0
        with trio.move_on_after(0.1):  # workers that had NOTIFY_SOCKET would have sent more
            extra = await manager.recv(65536)
            raise AssertionError(f"unexpected notification {extra!r}")


async def test_a_port_in_use_stops_the_supervisor_with_a_clear_message_and_exit_1(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        async with running(nursery, command(upstream, tmp_path, listen=address)) as service:
            assert await service.exit_code() == 1
    failure = await service.wait_for("tproxy cannot serve: worker 1 could not start")
    assert f"cannot listen on {address}: [Errno " in failure.string
    assert not any("restarting" in message for message in service.messages)


@pytest.mark.slow
async def test_a_worker_that_keeps_failing_to_start_stops_the_service_instead_of_looping(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with running(nursery, command(upstream, tmp_path)) as service:
        await started(nursery, service)
        workers = await service.workers()
        store = tmp_path / "store"
        store.rename(tmp_path / "moved")  # the running workers keep the files they opened
        store.write_text("")  # a new worker finds a file where its store should be
        os.kill(workers[1][0], signal.SIGKILL)
        assert await service.exit_code() == 1  # after five failed starts, ~8 s of backoff
    failure = await service.wait_for("worker 1 could not start 5 times in a row")
    assert "tproxy cannot serve" in failure.string
    assert f"cannot open the cache store at {store}" in failure.string
    assert service.messages.count(failure.string) == 1
