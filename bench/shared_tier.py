"""The shared cache tier (issue 17), side by side in one run: short, not part of run.py.

    .venv/bin/python bench/shared_tier.py            # about a minute on 2 cores
    .venv/bin/python bench/shared_tier.py --quick    # a smoke test

It starts a redis-server (Debian's, on a free loopback port, nothing saved), the benchmark
upstream (``upstream.py``) and tproxy processes, and measures:

1. The lookup alone, in one process: ``LmdbStore.get`` inline against ``SharedTier.get`` over
   loopback, the same encoded ~1 KB entry, one after another.
2. A hit through the proxy, from a client's side: two tproxy processes (hosts A and B, each its
   own LMDB store, one Redis). Host A fetches N distinct answers; then, key by key, host A
   answers from its local store and host B, which has never seen the key, from the shared tier.
3. A miss while the tier stalls (redis-server under SIGSTOP): with the breaker kept closed, every
   lookup waits ``lookup_timeout`` (10 ms) and then goes upstream; with the default breaker,
   only the first five do. Against misses with the tier healthy.
4. Two hosts answering the same N questions, one after the other, with paced upstream streams
   (50 events, ``--interval-ms`` apart, standing in for a model): alone (no shared tier), host B
   calls the upstream N times again; sharing Redis, it calls it for none. Requests per second of
   host B's pass and the upstream calls of both passes.

It prints a Markdown report on stdout (``--out FILE`` writes it there too).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tproxy.config import SharedStoreSettings  # noqa: E402
from tproxy.core.entry import StoredEntry  # noqa: E402
from tproxy.store import (  # noqa: E402
    LmdbStore,
    open_shared_tier,
)

CHAT = "/v1/chat/completions"
START_TIMEOUT = 20.0
NOTHING_SAVED = ("--save", "", "--appendonly", "no", "--dir")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Processes:
    """Everything this run started, stopped at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], port: int, what: str) -> None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running.append(process)
        wait_until(lambda: port_open(port), what)

    def stop(self) -> None:
        for process in reversed(self.running):
            process.terminate()
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def tproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "tproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tproxy"]


class Host:
    """One tproxy process: its proxy and admin ports."""

    def __init__(
        self,
        processes: Processes,
        workdir: Path,
        name: str,
        upstream_port: int,
        redis_url: str | None,
        tier_settings: str = "lookup_timeout = 0.05\n",
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        config = workdir / f"{name}.toml"
        table = (
            f'[shared_store]\nurl = "{redis_url}"\n{tier_settings}' if redis_url is not None else ""
        )
        config.write_text("[telemetry]\naccess_log = false\n" + table)
        command = [
            *tproxy_command(),
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--cache-dir",
            str(workdir / f"store-{name}"),
        ]
        processes.start(command, self.port, f"tproxy {name}")

    def ask(
        self, question: str, *, stream: bool = False, interval_ms: float = 0
    ) -> tuple[float, str]:
        """One request on a fresh connection: seconds it took, and its Cache-Status."""
        body = json.dumps(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": question}],
                "stream": stream,
            }
        )
        headers = {"content-type": "application/json", "x-bench-interval-ms": str(interval_ms)}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            started = time.perf_counter()
            connection.request("POST", CHAT, body, headers)
            response = connection.getresponse()
            response.read()
            took = time.perf_counter() - started
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"tproxy answered {response.status}")
        return took, response.getheader("cache-status") or ""

    def metric(self, name: str, **labels: str) -> float:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


def start_redis(processes: Processes, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    processes.start(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", *NOTHING_SAVED, str(workdir)],
        port,
        "redis-server",
    )
    return f"redis://127.0.0.1:{port}/0", processes.running[-1]


def quantiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return f"{at(0.5):,.0f} | {at(0.9):,.0f} | {at(0.99):,.0f}"


# --- 1. the lookup alone ----------------------------------------------------------------------


def sample_entry() -> StoredEntry:
    now = time.time()
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"application/json"),),
        chunks=(b'{"choices":[{"message":{"content":"' + b"x" * 1000 + b'"}}]}',),
        offsets=(0.0,),
        streamed=False,
        created_at=now,
        expires_at=now + 3600,
        model="bench",
    )


def lookup_alone(workdir: Path, redis_url: str, count: int) -> list[str]:
    entry = sample_entry()
    store = LmdbStore(workdir / "alone", max_total_bytes=1 << 26, max_entry_bytes=1 << 20)
    store.put_many([("k", entry)], time.time())
    local: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        assert store.get("k", time.time()) is not None
        local.append(time.perf_counter() - started)
    store.close()

    async def shared_lookups() -> list[float]:
        settings = SharedStoreSettings(url=redis_url, lookup_timeout=1.0)
        async with open_shared_tier(settings) as tier:
            tier.submit("k", entry)
            await tier.flush()
            took: list[float] = []
            for _ in range(count):
                started = time.perf_counter()
                assert await tier.get("k", time.time()) is not None
                took.append(time.perf_counter() - started)
            return took

    shared = trio.run(shared_lookups)
    return [
        "| lookup of a ~1 KB entry | p50 µs | p90 µs | p99 µs |",
        "|---|---|---|---|",
        f"| LMDB, inline | {quantiles(local)} |",
        f"| shared tier (Redis over loopback, coredis on Trio) | {quantiles(shared)} |",
    ]


# --- 2. a hit through the proxy -------------------------------------------------------------------


def hit_latency(
    processes: Processes, workdir: Path, redis_url: str, count: int, port: int
) -> list[str]:
    host_a = Host(processes, workdir, "hit-a", port, redis_url)
    host_b = Host(processes, workdir, "hit-b", port, redis_url)
    questions = [f"hit latency {index}" for index in range(count)]
    for question in questions:
        host_a.ask(question)
    wait_for_shared_writes(host_a, count)
    local: list[float] = []
    shared: list[float] = []
    for question in questions:
        took, status = host_a.ask(question)
        assert "hit" in status, status
        assert "detail=shared" not in status, status
        local.append(took)
        took, status = host_b.ask(question)
        assert "detail=shared" in status, status
        shared.append(took)
    return [
        "| a request answered from the cache, new connection each | p50 µs | p90 µs | p99 µs |",
        "|---|---|---|---|",
        f"| host A, from its LMDB store | {quantiles(local)} |",
        f"| host B, from the shared tier (then copied locally) | {quantiles(shared)} |",
    ]


# --- 3. a stalled tier -----------------------------------------------------------------------


def stalled_tier(
    processes: Processes,
    workdir: Path,
    redis_url: str,
    redis: subprocess.Popen[bytes],
    count: int,
    port: int,
) -> list[str]:
    deadline = "lookup_timeout = 0.01\n"
    healthy = Host(processes, workdir, "stall-healthy", port, redis_url, deadline)
    no_breaker = Host(
        processes,
        workdir,
        "stall-nobreaker",
        port,
        redis_url,
        deadline + "breaker_failures = 1000000\n",
    )
    with_breaker = Host(processes, workdir, "stall-breaker", port, redis_url, deadline)
    rows = [f"| tier healthy | {quantiles([healthy.ask(f'h{i}')[0] for i in range(count)])} |"]
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        waited = [no_breaker.ask(f"n{i}")[0] for i in range(count)]
        saved = [with_breaker.ask(f"b{i}")[0] for i in range(count)]
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    rows.append(f"| tier stalled, breaker kept closed | {quantiles(waited)} |")
    rows.append(f"| tier stalled, default breaker (5 failures) | {quantiles(saved)} |")
    return [
        f"| a miss (JSON, fast upstream), lookup_timeout 10 ms, {count} requests | p50 µs | p90 µs"
        " | p99 µs |",
        "|---|---|---|---|",
        *rows,
    ]


# --- 4. two hosts, the same questions -----------------------------------------------------------


def answer_all(host: Host, questions: list[str], interval_ms: float, clients: int) -> float:
    """Ask every question as streams, ``clients`` at a time; requests per second."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for _ in pool.map(lambda q: host.ask(q, stream=True, interval_ms=interval_ms), questions):
            pass
    return len(questions) / (time.perf_counter() - started)


def wait_for_shared_writes(host: Host, count: int) -> None:
    wait_until(
        lambda: host.metric("tproxy_shared_store_writes_total", outcome="written") >= count,
        "the shared writes",
    )


def two_hosts(
    processes: Processes,
    workdir: Path,
    redis_url: str,
    count: int,
    port: int,
    interval_ms: float,
    clients: int,
) -> list[str]:
    rows = []
    for label, url in (("each alone", None), ("sharing one Redis", redis_url)):
        tag = "alone" if url is None else "shared"
        host_a = Host(processes, workdir, f"{tag}-a", port, url)
        host_b = Host(processes, workdir, f"{tag}-b", port, url)
        questions = [f"two hosts {tag} {index}" for index in range(count)]
        first = answer_all(host_a, questions, interval_ms, clients)
        if url is not None:
            wait_for_shared_writes(host_a, count)
        second = answer_all(host_b, questions, interval_ms, clients)
        misses = sum(
            host.metric("tproxy_requests_total", cache="miss") for host in (host_a, host_b)
        )
        rows.append(f"| {label} | {first:,.0f} | {second:,.0f} | {misses:.0f} |")
    return [
        f"| two hosts, {count} questions each, {clients} clients, streams of 50 events"
        f" {interval_ms:g} ms apart | host A req/s | host B req/s | upstream calls |",
        "|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke test")
    parser.add_argument("--interval-ms", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    lookups, hits, questions = (200, 50, 24) if options.quick else (5000, 500, 96)
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="tproxy-shared-bench-") as directory:
        workdir = Path(directory)
        try:
            redis_url, redis = start_redis(processes, workdir)
            upstream_port = free_port()
            processes.start(
                [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)],
                upstream_port,
                "the benchmark upstream",
            )
            report = [
                "# The shared cache tier: hit latency and two hosts",
                "",
                f"`bench/shared_tier.py{' --quick' if options.quick else ''}`, "
                f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start.",
                "",
                *lookup_alone(workdir, redis_url, lookups),
                "",
                *hit_latency(processes, workdir, redis_url, hits, upstream_port),
                "",
                *stalled_tier(processes, workdir, redis_url, redis, hits, upstream_port),
                "",
                *two_hosts(
                    processes,
                    workdir,
                    redis_url,
                    questions,
                    upstream_port,
                    options.interval_ms,
                    options.clients,
                ),
                "",
                f"Load average at the end: {os.getloadavg()[0]:.2f}.",
            ]
        finally:
            processes.stop()
    text = "\n".join(report) + "\n"
    print(text)
    if options.out is not None:
        options.out.write_text(text)


if __name__ == "__main__":
    main()
