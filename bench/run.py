"""Run the whole benchmark suite and write ``docs/benchmarks.md`` and ``docs/benchmarks.svg``.

    .venv/bin/python bench/run.py           # full run, ~12 minutes on 2 cores
    .venv/bin/python bench/run.py --quick   # one short round, about 2 minutes

It starts, each in its own process on a free port of 127.0.0.1: the benchmark upstream, nginx
serving the same answers as files and nginx as a reverse proxy (when nginx is there or can be
installed), the minimal pass-through proxy, LiteLLM (with ``--litellm``), tproxy with the cache
off, two such tproxy processes sharing one port (when tproxy has ``[server] reuse_port``), tproxy
with the cache on (warmed with the exact requests the load sends, so every request is a hit) and
Hypercorn answering a constant (the floor for a cache hit). Then, round after round, it runs
every measurement against every target in turn: drift of the machine (other work, frequency
changes) lands on all targets alike, and each round gives one value per target. Tables show the
median over the rounds and the range; "added" values and ratios are taken within a round (target
against direct in the same round) before the median is taken. Last, it holds 1,000 paced streams
open through fresh proxy processes and reads how much their memory grew.

The analysis section of the existing ``docs/benchmarks.md`` (between the ``analysis`` markers)
is written by hand and kept when the file is regenerated, flagged when it was written for an
earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from importlib import metadata
from pathlib import Path

import chart
import nginx
from load import LoadPool, LoadStuckError, Measurement, Mode, percentile, request_body
from soak import socket_breakdown
from upstream import EVENTS

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
PACKAGES = ("tproxy-llm", "trio", "hypercorn", "h11", "httpx2", "httpcore2", "lmdb")
ANALYSIS_BEGIN = re.compile(r"<!-- analysis:begin run=(\S+) -->\n(.*?)<!-- analysis:end -->", re.S)


class BenchError(Exception):
    """A server would not start or answer as expected: the run cannot be trusted."""


class Kind(Enum):
    """The targets, in the order they are measured within a round."""

    DIRECT = "direct"
    NGINX_STATIC = "nginx static"
    NGINX = "nginx proxy"
    MINIMAL = "minimal"
    LITELLM = "LiteLLM"
    TPROXY_OFF = "tproxy cache off"
    TPROXY_MISS = "tproxy cache miss"
    TPROXY_OFF2 = "tproxy off ×2"
    TPROXY_HIT = "tproxy cache hit"
    FLOOR = "Hypercorn floor"


# Answer every request with the same prebuilt bytes, no upstream: their rates are stable after a
# short window, so they are measured for less time.
CONSTANT = frozenset({Kind.NGINX_STATIC, Kind.FLOOR})
# Measured for throughput only (a constant answer has no meaningful paced stream; the two
# tproxy processes are there for goal 5, which is about throughput).
THROUGHPUT_ONLY = frozenset({Kind.NGINX_STATIC, Kind.FLOOR, Kind.TPROXY_OFF2})
# The miss target's requests ask to skip the lookup but store the answer (RFC 9111 no-cache):
# every request goes upstream and is written to the store, with no coalescing (coalescing
# needs a lookup), from identical request bytes. A failed lookup (~25 µs) is all it leaves out.
MISS_HEADER = b"Cache-Control: no-cache"
# LiteLLM takes ~4.5 s per stream at 64 connections: with the usual warm-up no answer would
# complete inside the window, and the first to complete would all finish together.
SLOW_WARMUP = 5.0


@dataclass(frozen=True, slots=True)
class Test:
    """One measurement, run against every target in every round but those it skips."""

    key: str
    mode: Mode
    connections: int
    duration: float
    skip: frozenset[Kind] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how often everything runs: the full run or ``--quick``."""

    rounds: int
    warmup: float
    interval_ms: float
    tests: tuple[Test, ...]
    hit_latency_duration: float  # paced-1 against cache hits: replays are instant
    constant_duration: float  # throughput against the CONSTANT targets
    memory_window: float  # seconds the 1,000 streams are held open and sampled

    @property
    def stream_seconds(self) -> float:
        """How long one paced stream lasts: paced connections start spread over it."""
        return EVENTS * self.interval_ms / 1000

    def warmup_for(self, test: Test, kind: Kind) -> float:
        """Paced connections start over one stream's length: count none before all run."""
        stagger = self.stream_seconds if test.mode is Mode.PACED else 0.0
        slow = SLOW_WARMUP if kind is Kind.LITELLM else 0.0
        return max(self.warmup, stagger, slow)

    def duration(self, test: Test, kind: Kind) -> float:
        if kind is Kind.TPROXY_HIT and test.mode is Mode.PACED:
            return self.hit_latency_duration
        if kind in CONSTANT:
            return min(test.duration, self.constant_duration)
        return test.duration


def make_plan(quick: bool, rounds: int | None) -> Plan:
    throughput, paced1, paced32 = (1.0, 3.0, 2.0) if quick else (3.0, 12.0, 4.0)
    tests = (
        Test("json-1", Mode.JSON, 1, throughput, frozenset({Kind.NGINX_STATIC, Kind.TPROXY_OFF2})),
        Test("json-16", Mode.JSON, 16, throughput),
        Test("json-64", Mode.JSON, 64, throughput),
        Test("stream-16", Mode.STREAM, 16, throughput),
        Test("stream-64", Mode.STREAM, 64, throughput),
        Test("paced-1", Mode.PACED, 1, paced1, THROUGHPUT_ONLY | {Kind.TPROXY_MISS}),
        Test(
            "paced-32",
            Mode.PACED,
            32,
            paced32,
            THROUGHPUT_ONLY | {Kind.TPROXY_HIT, Kind.TPROXY_MISS},
        ),
    )
    return Plan(
        rounds=rounds or (1 if quick else 3),
        warmup=0.3 if quick else 0.5,
        interval_ms=10.0,
        tests=tests,
        hit_latency_duration=1.0 if quick else 2.0,
        constant_duration=1.0 if quick else 2.0,
        memory_window=1.0 if quick else 2.0,
    )


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of one target in one round, with the CPU its server process spent."""

    measurement: Measurement
    server_cpu_seconds: float  # inside the measured window
    seconds: float  # the measured window's length


@dataclass(frozen=True, slots=True)
class Server:
    """One server subprocess and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (from /proc)."""
        return process_cpu_seconds(self.process.pid)

    def memory_kib(self) -> tuple[int, int]:
        """Resident set size now and at its peak, in KiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load is sent, and the processes it costs CPU and memory in."""

    kind: Kind
    port: int
    servers: tuple[Server, ...]
    headers: tuple[bytes, ...] = ()  # header lines added to every request of the load

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()

    def cpu_seconds(self) -> float:
        return sum(server.cpu_seconds() for server in self.servers)

    def memory_kib(self) -> tuple[int, int]:
        """Resident set size now and at its peak, in KiB, summed over the processes."""
        now, peak = zip(*(server.memory_kib() for server in self.servers), strict=True)
        return sum(now), sum(peak)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free now (held together so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_until(ready: Callable[[], bool], server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{server.name} not ready after {timeout:g} s (log: {server.log})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def healthy(admin_port: int) -> bool:
    return get_status(admin_port, "/healthz") == 200


def get_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def post(port: int, mode: Mode, interval_ms: float, turns: int = 0) -> tuple[int, str, bytes]:
    """One request as the load sends it: status, Cache-Status header, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if mode is Mode.PACED:
        headers["X-Bench-Interval-Ms"] = f"{interval_ms:g}"
    try:
        connection.request("POST", "/v1/chat/completions", request_body(mode, turns), headers)
        response = connection.getresponse()
        return response.status, response.getheader("cache-status") or "", response.read()
    finally:
        connection.close()


class Servers:
    """Every server process of a run; all are stopped on exit, whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Server] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Server:
        log = self.workdir / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, **env} if env else None,
            )
        server = Server(name, process, log)
        self.started.append(server)
        return server

    def stop(self, servers: tuple[Server, ...]) -> None:
        for server in servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()

    def stop_all(self) -> None:
        self.stop(tuple(self.started))


def tproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "tproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tproxy"]


def slug(name: str) -> str:
    """A file name for a server's log, config and store."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


OFF_CONFIG = "[cache]\nenabled = false\n"
REUSE_PORT_CONFIG = "[server]\nreuse_port = true\n"
NGINX_CONNECTIONS = 4096  # client plus upstream connections: 1,000 proxied streams need 2,000
MEMORY_POOL = 1024  # upstream connections the proxies may open for the 1,000 streams


@dataclass(frozen=True, slots=True)
class Options:
    """The optional targets: what the machine and the command line make possible."""

    nginx: str | None  # the nginx binary; None: no nginx targets
    litellm: Path | None  # the LiteLLM proxy's binary; None: not measured
    reuse_port: bool  # tproxy accepts [server] reuse_port: the two-process target runs


def reuse_port_support(workdir: Path) -> str | None:
    """None when this tproxy accepts ``[server] reuse_port``, else why goal 5 is not measured."""
    config = workdir / "reuse-port-check.toml"
    config.write_text(REUSE_PORT_CONFIG + '[upstreams.bench]\nurl = "http://127.0.0.1:9"\n')
    done = subprocess.run(
        [*tproxy_command(), "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode == 0:
        return None
    said = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
    return (
        f"{Kind.TPROXY_OFF2.value}: skipped, this tproxy refuses `[server] reuse_port` ({said[0]})"
    )


def start_script(servers: Servers, name: str, script: str, args: list[str], port: int) -> Server:
    server = servers.start(name, [sys.executable, str(BENCH / script), *args])
    wait_until(lambda: port_open(port), server)
    return server


def start_minimal(
    servers: Servers, name: str, upstream_url: str, port: int, max_connections: int = 512
) -> Server:
    args = ["--upstream", upstream_url, "--listen", f"127.0.0.1:{port}"]
    args += ["--max-connections", str(max_connections)]
    return start_script(servers, name, "minimal_proxy.py", args, port)


def start_tproxy(
    servers: Servers,
    name: str,
    config_text: str,
    ports: tuple[int, int],
    upstream_url: str | None,
    workers: int = 1,
) -> Server:
    """``tproxy serve --workers N`` with ``config_text`` on ``ports`` (proxy, admin) and its own
    store; one process unless told otherwise, so that its CPU is the one process's.

    Ready when its admin ``/readyz`` answers 200 (with workers: when every worker listens).
    Without ``upstream_url`` the config names the upstream itself.
    """
    port, admin = ports
    config = servers.workdir / f"{slug(name)}.toml"
    config.write_text(config_text)
    command = [
        *tproxy_command(),
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--cache-dir",
        str(servers.workdir / f"store-{slug(name)}"),
        "--workers",
        str(workers),
    ]
    if upstream_url is not None:
        command += ["--upstream", upstream_url]
    server = servers.start(name, command)
    wait_until(lambda: get_status(admin, "/readyz") == 200, server)
    return server


def start_nginx(servers: Servers, name: str, binary: str, config: Path, port: int) -> Server:
    server = servers.start(name, nginx.command(binary, config))
    wait_until(lambda: port_open(port), server)
    return server


def start_litellm(servers: Servers, binary: Path, upstream_url: str, port: int) -> Server:
    """The LiteLLM proxy, one worker, the benchmark upstream as an OpenAI-compatible model.

    It forwards the client's headers (the pacing one among them). Without a master key recent
    versions refuse to start unless told this is a local setup, which a loopback benchmark is.
    ``LITELLM_LOCAL_MODEL_COST_MAP`` keeps it from fetching its price list at start-up.
    """
    config = servers.workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        "      model: openai/bench\n"
        f"      api_base: {upstream_url}/v1\n"
        "      api_key: bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        "  forward_client_headers_to_llm_api: true\n"
        "  dangerously_permit_weak_or_unset_master_key: true\n"
    )
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    server = servers.start(
        Kind.LITELLM.value,
        [*command, "--num_workers", "1"],
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    wait_until(lambda: port_open(port), server, timeout=180.0)  # a large app to import
    return server


def start_targets(servers: Servers, plan: Plan, options: Options) -> list[Target]:
    """Every target the options allow, in measuring order, each checked."""
    ports = iter(free_ports(len(Kind) + 4))  # + an admin port for each tproxy process
    up = next(ports)
    upstream_url = f"http://127.0.0.1:{up}"
    upstream = start_script(servers, "upstream", "upstream.py", ["--port", str(up)], up)
    targets = [Target(Kind.DIRECT, up, (upstream,))]
    if options.nginx is not None:
        port = next(ports)
        config = nginx.static_config(servers.workdir / "nginx-static", port)
        server = start_nginx(servers, Kind.NGINX_STATIC.value, options.nginx, config, port)
        targets.append(Target(Kind.NGINX_STATIC, port, (server,)))
        port = next(ports)
        config = nginx.proxy_config(servers.workdir / "nginx-proxy", port, up, NGINX_CONNECTIONS)
        server = start_nginx(servers, Kind.NGINX.value, options.nginx, config, port)
        targets.append(Target(Kind.NGINX, port, (server,)))
    port = next(ports)
    targets.append(
        Target(Kind.MINIMAL, port, (start_minimal(servers, "minimal", upstream_url, port),))
    )
    if options.litellm is not None:
        port = next(ports)
        server = start_litellm(servers, options.litellm, upstream_url, port)
        targets.append(Target(Kind.LITELLM, port, (server,)))
    port = next(ports)
    server = start_tproxy(
        servers, Kind.TPROXY_OFF.value, OFF_CONFIG, (port, next(ports)), upstream_url
    )
    targets.append(Target(Kind.TPROXY_OFF, port, (server,)))
    port = next(ports)
    server = start_tproxy(servers, Kind.TPROXY_MISS.value, "", (port, next(ports)), upstream_url)
    targets.append(Target(Kind.TPROXY_MISS, port, (server,), (MISS_HEADER,)))
    if options.reuse_port:
        port = next(ports)
        pair = tuple(
            start_tproxy(
                servers,
                f"{Kind.TPROXY_OFF2.value} {number}",
                OFF_CONFIG + REUSE_PORT_CONFIG,
                (port, next(ports)),
                upstream_url,
            )
            for number in (1, 2)
        )
        targets.append(Target(Kind.TPROXY_OFF2, port, pair))
    port = next(ports)
    server = start_tproxy(servers, Kind.TPROXY_HIT.value, "", (port, next(ports)), upstream_url)
    targets.append(Target(Kind.TPROXY_HIT, port, (server,)))
    port = next(ports)
    server = start_script(
        servers, Kind.FLOOR.value, "constant_app.py", ["--listen", f"127.0.0.1:{port}"], port
    )
    targets.append(Target(Kind.FLOOR, port, (server,)))
    for target in targets:
        check_target(target, plan)
    return targets


def check_target(target: Target, plan: Plan) -> None:
    """Every target answers every request kind whole; the hit target answers from its cache."""
    for mode in (Mode.JSON, Mode.STREAM, Mode.PACED):
        status, cache_status, body = post(target.port, mode, plan.interval_ms)
        if status != 200 or (mode is not Mode.JSON and not body.endswith(b"data: [DONE]\n\n")):
            raise BenchError(f"{target.kind.value}: {mode.value} answered {status}: {body[:200]!r}")
        if target.kind is not Kind.TPROXY_HIT:
            continue
        for _ in range(100):  # the store writer commits in the background: wait for the entry
            status, cache_status, body = post(target.port, mode, plan.interval_ms)
            if "hit" in cache_status:
                break
            time.sleep(0.05)
        else:
            raise BenchError(f"{target.kind.value}: {mode.value} never hit: {cache_status!r}")


Results = dict[str, dict[Kind, list[Sample]]]  # measurement key -> target -> one per round


def run_rounds(pool: LoadPool, targets: list[Target], plan: Plan) -> Results:
    """Every measurement against every target, round after round (interleaved)."""
    results: Results = {t.key: {} for t in plan.tests}
    for round_number in range(1, plan.rounds + 1):
        for test in plan.tests:
            for target in targets:
                if target.kind in test.skip:
                    continue
                duration = plan.duration(test, target.kind)
                stagger = plan.stream_seconds if test.mode is Mode.PACED else 0.0
                target.check_alive()
                running = pool.start(
                    target.url,
                    test.mode,
                    test.connections,
                    duration=duration,
                    warmup=plan.warmup_for(test, target.kind),
                    interval_ms=plan.interval_ms,
                    stagger=stagger,
                    headers=target.headers,
                )
                cpu = cpu_in_window(target.cpu_seconds, running.window)
                measurement = running.wait()
                wait_quiet(target)
                sample = Sample(measurement, cpu, duration)
                results[test.key].setdefault(target.kind, []).append(sample)
                errors = f" errors {measurement.errors}" if measurement.errors else ""
                print(
                    f"round {round_number}/{plan.rounds} {test.key:>9} {target.kind.value:<17}"
                    f" {measurement.rate:9.1f}/s{errors}",
                    flush=True,
                )
    return results


def cpu_in_window(cpu_seconds: Callable[[], float], window: tuple[float, float]) -> float:
    """The growth of ``cpu_seconds()`` between two ``time.time()`` instants still to come."""
    time.sleep(max(0.0, window[0] - time.time()))
    before = cpu_seconds()
    time.sleep(max(0.0, window[1] - time.time()))
    return cpu_seconds() - before


def wait_quiet(target: Target, timeout: float = 15.0) -> None:
    """Return once the target's processes use under 20 % of a core (over 0.1 s), or after
    ``timeout``.

    A slow server (LiteLLM) goes on working for seconds on the requests cut at the end of a
    measurement; the next target must not share the cores with that.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = target.cpu_seconds()
        time.sleep(0.1)
        if target.cpu_seconds() - before < 0.02:
            return


# --- goal 4: memory with 1,000 open streams --------------------------------------------------

MEMORY_STREAMS = 1000
MEMORY_INTERVAL_MS = 2000.0  # 100 s streams: every one is still open while memory is read
# The streams start over 6 s (~170 a second: a Python proxy spends a few ms of CPU on each new
# connection and request, and lags behind) and must all be open 15 s after the first.
MEMORY_STAGGER = 6.0
MEMORY_DEADLINE = 15.0
MEMORY_KINDS = (Kind.NGINX, Kind.MINIMAL, Kind.TPROXY_OFF)
MEMORY_FILES = 2 * MEMORY_STREAMS + 200  # descriptors a proxy needs: client + upstream, + slack


@dataclass(frozen=True, slots=True)
class MemoryLoad:
    """One fresh proxy process before and while it carries the 1,000 streams."""

    idle_kib: int  # after answering the three check requests, before the load
    open_kib: int  # the highest RSS read while every stream was open
    clients: int  # its established client connections when the readings started
    upstreams: int  # its established connections to the upstream then
    open_after: float  # seconds from the first stream until all were open (or the deadline)
    errors: dict[str, int]

    @property
    def added_kib(self) -> int:
        return self.open_kib - self.idle_kib


def measure_memory(
    pool: LoadPool, servers: Servers, plan: Plan, options: Options, upstream_port: int
) -> dict[Kind, MemoryLoad]:
    """Goal 4 for each proxy, in a fresh process started for it and stopped after it.

    Fresh, so that idle is a process that has only started and answered the checks, not one
    grown by the rounds; its upstream pool allows the 1,000 connections (as shipped, both Python
    proxies allow 512, and the other streams would wait for a connection instead of being open).
    """
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    loads: dict[Kind, MemoryLoad] = {}
    for kind in MEMORY_KINDS:
        port, admin = free_ports(2)
        name = f"memory {kind.value}"
        if kind is Kind.NGINX:
            if options.nginx is None:
                continue
            config = nginx.proxy_config(
                servers.workdir / slug(name), port, upstream_port, NGINX_CONNECTIONS
            )
            server = start_nginx(servers, name, options.nginx, config, port)
        elif kind is Kind.MINIMAL:
            server = start_minimal(servers, name, upstream_url, port, MEMORY_POOL)
        else:
            config_text = (
                OFF_CONFIG
                + f'[upstreams.bench]\nurl = "{upstream_url}"\nmax_connections = {MEMORY_POOL}\n'
            )
            server = start_tproxy(servers, name, config_text, (port, admin), None)
        target = Target(kind, port, (server,))
        try:
            check_target(target, plan)
            loads[kind] = hold_streams(pool, target, plan, upstream_port)
        finally:
            servers.stop(target.servers)
        load = loads[kind]
        print(
            f"memory {kind.value:<17} idle {load.idle_kib / 1024:.1f} MiB, "
            f"{load.clients} streams open after {load.open_after:.1f} s "
            f"{load.open_kib / 1024:.1f} MiB" + (f" errors {load.errors}" if load.errors else ""),
            flush=True,
        )
    return loads


def hold_streams(pool: LoadPool, target: Target, plan: Plan, upstream_port: int) -> MemoryLoad:
    """Open the paced streams; once all are open (both sides), read RSS every 0.1 s.

    The readings go on until the load's measured window closes, ``MEMORY_DEADLINE`` +
    ``memory_window`` seconds after the first stream; if not every stream is open by the
    deadline, they start then, and the counts say how many were.
    """
    server = target.servers[0]
    idle = server.memory_kib()[0]
    running = pool.start(
        target.url,
        Mode.PACED,
        MEMORY_STREAMS,
        duration=plan.memory_window,
        warmup=MEMORY_DEADLINE,
        interval_ms=MEMORY_INTERVAL_MS,
        stagger=MEMORY_STAGGER,
        timeout=120.0,
    )
    deadline, closed = running.window
    first = deadline - MEMORY_DEADLINE
    roles = {"upstream": upstream_port, "proxy": target.port, "admin": 0}
    time.sleep(max(0.0, first + MEMORY_STAGGER - time.time()))
    while True:
        sockets = socket_breakdown(server.process.pid, roles)
        everything = min(sockets["established client"], sockets["established upstream"])
        if everything >= MEMORY_STREAMS or time.time() >= deadline:
            break
        time.sleep(0.25)
    open_after = time.time() - first
    highest = idle
    while time.time() < closed:
        highest = max(highest, server.memory_kib()[0])
        time.sleep(0.1)
    measurement = running.wait()
    return MemoryLoad(
        idle_kib=idle,
        open_kib=highest,
        clients=sockets["established client"],
        upstreams=sockets["established upstream"],
        open_after=open_after,
        errors=measurement.errors,
    )


def raise_open_files() -> tuple[int, str]:
    """Raise this process's soft limit on open files to the hard one; servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft >= wanted:
        return soft, f"open files allowed per process: {soft} (the hard limit)"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as error:
        return soft, f"open files allowed per process: {soft} (raising it to {wanted}: {error})"
    return wanted, f"open files allowed per process: soft limit raised from {soft} to {wanted}"


# --- turning samples into table cells -------------------------------------------------------


def spread(values: list[float], digits: int, suffix: str = "") -> str:
    """``median (min–max)``; just the value for a single round."""
    values = [v for v in values if v == v]  # NaN: no sample
    if not values:
        return "—"
    median = f"{statistics.median(values):,.{digits}f}{suffix}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def per_round(
    results: Results, key: str, kind: Kind, value: Callable[[Sample], float]
) -> list[float]:
    return [value(sample) for sample in results.get(key, {}).get(kind, [])]


def relative(
    results: Results,
    key: str,
    kind: Kind,
    base: Kind,
    value: Callable[[Sample], float],
    combine: Callable[[float, float], float],
) -> list[float]:
    """``combine(target, base)`` for each round in which both were measured."""
    mine = per_round(results, key, kind, value)
    theirs = per_round(results, key, base, value)
    return [combine(a, b) for a, b in zip(mine, theirs, strict=False)]


def rate(sample: Sample) -> float:
    return sample.measurement.rate


SamplesOf = Callable[[Measurement], list[int]]


def ttfbs(measurement: Measurement) -> list[int]:
    return measurement.ttfbs


def latencies(measurement: Measurement) -> list[int]:
    return measurement.latencies


def event_delays(measurement: Measurement) -> list[int]:
    return measurement.event_delays


def pct(samples_of: SamplesOf, q: float) -> Callable[[Sample], float]:
    """The percentile ``q`` of a round's samples, in milliseconds."""
    return lambda sample: percentile(samples_of(sample.measurement), q)


def cpu_per_request_us(sample: Sample) -> float:
    completed = sample.measurement.completed
    return sample.server_cpu_seconds / completed * 1e6 if completed else float("nan")


def cores_busy(sample: Sample) -> float:
    return sample.server_cpu_seconds / sample.seconds


def client_cpu_per_request_us(sample: Sample) -> float:
    completed = sample.measurement.completed
    return sample.measurement.client_cpu_seconds / completed * 1e6 if completed else float("nan")


def minus(a: float, b: float) -> float:
    return a - b


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --- the report ------------------------------------------------------------------------------


def machine(revision: str) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    memory = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return [
        f"- CPUs available (`nproc`): {len(os.sched_getaffinity(0))}; "
        f"CPU model: {model.group(1).strip() if model else 'unknown'}",
        f"- Memory: {int(memory.group(1)) // 1024 if memory else '?'} MiB; "
        f"kernel {platform.release()}",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- tproxy source when the servers started: {revision}",
    ]


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tproxy"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes under tproxy/" if dirty else "")


@dataclass(frozen=True, slots=True)
class RunInfo:
    stamp: str
    revision: str
    command: str
    plan: Plan
    load_processes: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float
    memory: dict[Kind, tuple[int, int, int]]  # idle RSS, RSS at the end, peak RSS (KiB)
    memory_load: dict[Kind, MemoryLoad]  # goal 4, empty when not measured
    notes: list[str]  # what was found, installed or skipped, for the goals section
    chart: str  # the SVG's file name, next to the report


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


THROUGHPUT_KEYS = ("json-1", "json-16", "json-64", "stream-16", "stream-64")
CHARTED = {  # measurement key -> label, in the chart and the goals
    "json-16": "JSON, 16 conns",
    "json-64": "JSON, 64 conns",
    "stream-16": "streams, 16 conns",
    "stream-64": "streams, 64 conns",
}
RATIOS = (  # (target, base): shown when both ran
    (Kind.TPROXY_OFF, Kind.MINIMAL),
    (Kind.TPROXY_OFF, Kind.DIRECT),
    (Kind.TPROXY_OFF, Kind.NGINX),
    (Kind.TPROXY_OFF2, Kind.TPROXY_OFF),
    (Kind.TPROXY_MISS, Kind.TPROXY_OFF),
    (Kind.TPROXY_HIT, Kind.MINIMAL),
    (Kind.TPROXY_HIT, Kind.DIRECT),
    (Kind.TPROXY_HIT, Kind.FLOOR),
    (Kind.NGINX, Kind.DIRECT),
    (Kind.MINIMAL, Kind.NGINX),
    (Kind.LITELLM, Kind.MINIMAL),
)
LONG_STREAM_TEST = "tests/faults/test_upstream_faults.py"


def render(results: Results, info: RunInfo, kinds: list[Kind], analysis: str) -> str:
    plan = info.plan
    tests = {t.key: t for t in plan.tests}
    out = [
        "# Benchmarks",
        "",
        f"Generated by `bench/run.py` on {info.stamp} in {info.seconds / 60:.1f} minutes. "
        "Everything but the analysis section is rewritten by each run; `bench/README.md` says "
        "what each number means and how it is measured.",
        "",
        f"Command: `{info.command}`",
        "",
        f"![Answers per second of each target, and the time each adds to the first event of a "
        f"stream]({info.chart})",
        "",
        "## Machine and method",
        "",
        *machine(info.revision),
        f"- Load average (1, 5, 15 min) before the run: {fmt_load(info.load_before)}; "
        f"after it (its own load included): {fmt_load(info.load_after)}"
        + (
            " — **the machine was not idle when the run started**: other work competed with it"
            if info.load_before[0] >= 0.5
            else ""
        ),
        f"- {plan.rounds} round(s); in each round every measurement runs against every target "
        "in turn (interleaved). Cells are the median over the rounds with the range in "
        "parentheses; added times and ratios are computed within a round, then summarised.",
        f"- Throughput measurements: {tests['json-16'].duration:g} s each "
        f"({plan.constant_duration:g} s against the constant answers of nginx static and the "
        f"Hypercorn floor) after {plan.warmup:g} s of warm-up; paced streams: {EVENTS} events "
        f"{plan.interval_ms:g} ms apart, {tests['paced-1'].duration:g} s at 1 client, "
        f"{tests['paced-32'].duration:g} s at 32 clients ({plan.hit_latency_duration:g} s at 1 "
        "client against cache hits), after a warm-up of one stream's length "
        f"({plan.stream_seconds:g} s) over which the connections' first requests are spread "
        "evenly, so that streams do not run in lockstep.",
        f"- **The load generator ({info.load_processes} processes), the upstream and the proxy "
        "all share the same cores.** Every request the load sends costs CPU that the servers "
        "under test cannot use, so absolute numbers are lower than on a machine with a separate "
        "client, and the direct numbers are limited by the client and the one-process upstream "
        "as much as anything.",
        "- Targets: *direct* is the upstream itself (Trio + h11, one process). *nginx static* "
        "serves the same two answers as files: a stream is then ONE write of the whole body, "
        "not 51 events, so that row shows what the load generator can reach, not streaming. "
        "*nginx proxy* is nginx in front of the upstream (`proxy_buffering off`, HTTP/1.1 "
        "kept-alive upstream connections, one process). *minimal* is `bench/minimal_proxy.py`. "
        "*tproxy* runs as shipped (default settings, access log at `info` written to a file), "
        "with `[cache] enabled = false` for *cache off*; *cache miss* has the cache on and sends "
        "`Cache-Control: no-cache`, so every answer is fetched and stored, never looked up or "
        "shared; *tproxy off ×2* is two cache-off processes "
        "sharing one port (`[server] reuse_port = true`), whose CPU and memory are summed. "
        "*Hypercorn floor* is `bench/constant_app.py`: Hypercorn's trio worker answering every "
        "request with the upstream's bytes, a stream in one body message, no upstream."
        + (
            f" *LiteLLM* is the LiteLLM proxy (one worker), warmed up {SLOW_WARMUP:g} s before "
            "each measurement: under load it takes seconds per answer."
            if Kind.LITELLM in kinds
            else ""
        ),
        "",
        "## Throughput",
        "",
        "Answers per second; small JSON (~300 bytes) and 50-event SSE streams sent as fast as "
        "the upstream can write them, over N keep-alive connections each sending its next "
        "request as soon as the previous answer has arrived.",
        "",
    ]
    header = ["target", "JSON, 1 conn", "JSON, 16", "JSON, 64", "streams, 16", "streams, 64"]
    rows = [
        [k.value, *(spread(per_round(results, key, k, rate), 0) for key in THROUGHPUT_KEYS)]
        for k in kinds
    ]
    out += table(header, rows)
    out += ["", "### Ratios (same round, then median and range)", ""]
    rows = [
        [
            f"{kind.value} / {base.value}",
            *(
                spread(relative(results, key, kind, base, rate, ratio), 2, "×")
                for key in THROUGHPUT_KEYS
            ),
        ]
        for kind, base in RATIOS
        if kind in kinds and base in kinds
    ]
    out += table(["ratio", *header[1:]], rows)
    out += [
        "",
        "## Latency",
        "",
        "Time to first byte (TTFB) is from the last byte of the request written to the first "
        "complete body chunk read (for a stream: the first event). *Added* is the target's "
        "percentile minus direct's, in the same round. Milliseconds.",
        "",
        f"### Paced stream, 1 client (50 events {plan.interval_ms:g} ms apart)",
        "",
    ]
    out += latency_table(results, "paced-1", measured(results, "paced-1", kinds), ttfbs, "TTFB")
    out += [
        "",
        "Against the cache-hit target the stream is replayed from the store at once, so its row "
        "is the latency of a hit rather than of a forwarded stream; *added* compares it with an "
        "upstream that answers instantly.",
        "",
        "### Paced streams, 32 concurrent clients",
        "",
    ]
    out += latency_table(results, "paced-32", measured(results, "paced-32", kinds), ttfbs, "TTFB")
    out += [
        "",
        "### Per-event delay",
        "",
        "Client receive time minus the upstream's send time (`time.time_ns()` in the event), for "
        "every event of every paced stream; the direct row is the floor (loopback, scheduling, "
        "the client itself).",
        "",
    ]
    paced1 = proxies_without_hit(measured(results, "paced-1", kinds))
    out += latency_table(results, "paced-1", paced1, event_delays, "1 client")
    out += [""]
    out += latency_table(
        results, "paced-32", measured(results, "paced-32", kinds), event_delays, "32 clients"
    )
    out += [
        "",
        "### Small JSON, 1 connection",
        "",
        "Whole-answer latency, one request at a time.",
        "",
    ]
    out += latency_table(
        results, "json-1", measured(results, "json-1", kinds), latencies, "latency"
    )
    out += [
        "",
        "## Where the CPU goes",
        "",
        "CPU time per answer, in microseconds, of the process under test (the upstream for "
        "direct, the proxy otherwise; the upstream's own share behind a proxy is not included; "
        "for tproxy off ×2 the sum of its two processes) and of the load generator, both read at "
        "the edges of the measured window; then how many cores the process under test kept busy "
        "in the window (a single-threaded process saturates at 1.0, the pair at 2.0), and its "
        "memory over the rounds.",
        "",
    ]
    cpu_keys = ("json-64", "stream-64", "paced-32")
    rows = []
    for kind in kinds:
        rows.append(
            [
                kind.value,
                *(spread(per_round(results, k, kind, cpu_per_request_us), 0) for k in cpu_keys),
                *(
                    spread(per_round(results, k, kind, client_cpu_per_request_us), 0)
                    for k in cpu_keys[:2]
                ),
            ]
        )
    out += table(
        [
            "target",
            "server, JSON 64",
            "server, streams 64",
            "server, paced 32",
            "client, JSON 64",
            "client, streams 64",
        ],
        rows,
    )
    out.append("")
    rows = []
    for kind in kinds:
        idle, end, peak = info.memory.get(kind, (0, 0, 0))
        rows.append(
            [
                kind.value,
                *(spread(per_round(results, k, kind, cores_busy), 2) for k in cpu_keys),
                f"{idle / 1024:.0f} / {end / 1024:.0f} / {peak / 1024:.0f}",
            ]
        )
    out += table(
        [
            "target",
            "cores busy, JSON 64",
            "streams 64",
            "paced 32",
            "RSS MiB: idle / end / peak",
        ],
        rows,
    )
    out += memory_section(info)
    out += ["", "## The goals of issue 8", ""]
    out += goals(results, info)
    out += errors_section(results, kinds)
    out += analysis_section(analysis, info.stamp)
    return "\n".join(out)


def analysis_section(previous: str, stamp: str) -> list[str]:
    """The hand-written analysis of the report ``previous``, kept across runs and marked when it
    was written for another run; a placeholder when there is none."""
    out = ["", "## Analysis", ""]
    match = ANALYSIS_BEGIN.search(previous)
    if match is None:
        out += [f"<!-- analysis:begin run={stamp} -->", "_Not written yet._", ""]
    else:
        if match.group(1) != stamp:
            out += [
                f"> Written for the run of {match.group(1)}, not this one: check it against the "
                "tables above.",
                "",
            ]
        out += [f"<!-- analysis:begin run={match.group(1)} -->", match.group(2).rstrip("\n"), ""]
    out += ["<!-- analysis:end -->", ""]
    return out


def memory_section(info: RunInfo) -> list[str]:
    out = [
        "",
        f"## Memory with {MEMORY_STREAMS:,} open streams",
        "",
    ]
    if not info.memory_load:
        return [*out, "Not measured in this run (see the notes under the goals)."]
    out += [
        f"Each proxy is started afresh for this (its upstream pool allowing {MEMORY_POOL} "
        f"connections), answers the check requests, and its RSS is read (*idle*). Then "
        f"{MEMORY_STREAMS:,} paced streams ({EVENTS} events {MEMORY_INTERVAL_MS:g} ms apart, "
        f"so none ends here) start, spread over {MEMORY_STAGGER:g} s. As soon as the process "
        "holds an established connection for every stream on both sides (client and upstream, "
        "counted from `/proc`; *open after* says when), and until "
        f"{MEMORY_DEADLINE + info.plan.memory_window:g} s after the first stream, its RSS is "
        "read every 0.1 s; the highest reading is *open RSS*. The load is then cut and the "
        "process stopped.",
        "",
    ]
    rows = [
        [
            kind.value,
            f"{load.idle_kib / 1024:.1f}",
            f"{load.open_kib / 1024:.1f}",
            f"{load.added_kib / 1024:.1f}",
            f"{load.clients:,}",
            f"{load.upstreams:,}",
            f"{load.open_after:.1f} s",
            str(load.errors) if load.errors else "none",
        ]
        for kind, load in info.memory_load.items()
    ]
    return out + table(
        [
            "target",
            "idle RSS MiB",
            "open RSS MiB",
            "added MiB",
            "client connections",
            "upstream connections",
            "open after",
            "errors",
        ],
        rows,
    )


def measured(results: Results, key: str, kinds: list[Kind]) -> list[Kind]:
    """The targets that ran a measurement."""
    return [k for k in kinds if results.get(key, {}).get(k)]


def proxies_without_hit(kinds: list[Kind]) -> list[Kind]:
    return [k for k in kinds if k is not Kind.TPROXY_HIT]


def fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def latency_table(
    results: Results,
    key: str,
    kinds: list[Kind],
    samples_of: SamplesOf,
    label: str,
) -> list[str]:
    rows = []
    for kind in kinds:
        counts = per_round(results, key, kind, lambda s: float(len(samples_of(s.measurement))))
        row = [
            kind.value,
            spread(per_round(results, key, kind, pct(samples_of, 0.5)), 2),
            spread(per_round(results, key, kind, pct(samples_of, 0.99)), 2),
        ]
        if kind is Kind.DIRECT:
            row += ["—", "—"]
        else:
            row += [
                spread(relative(results, key, kind, Kind.DIRECT, pct(samples_of, q), minus), 2)
                for q in (0.5, 0.99)
            ]
        row.append(spread(counts, 0))
        rows.append(row)
    header = [
        "target",
        f"{label} p50",
        f"{label} p99",
        "added p50",
        "added p99",
        "samples per round",
    ]
    return table(header, rows)


def goals(results: Results, info: RunInfo) -> list[str]:
    """Each goal of issue 8, with the measured value, met or not; then what the run skipped."""
    rows: list[list[str]] = []

    def verdict(
        values: list[float], ok: Callable[[float], bool], digits: int, suffix: str
    ) -> list[str]:
        values = [v for v in values if v == v]
        if not values:
            return ["not measured", "—"]
        median = statistics.median(values)
        return [spread(values, digits, suffix), "met" if ok(median) else "**not met**"]

    for key, label in CHARTED.items():
        values = relative(results, key, Kind.TPROXY_OFF, Kind.MINIMAL, rate, ratio)
        rows.append(
            [
                f"1. pass-through ≥ 1.5× minimal, {label}",
                "≥ 1.50×",
                *verdict(values, lambda v: v >= 1.5, 2, "×"),
            ]
        )
    added_ttfb = relative(results, "paced-1", Kind.TPROXY_OFF, Kind.DIRECT, pct(ttfbs, 0.5), minus)
    rows.append(
        [
            "2. added TTFB p50, 1 client",
            "≤ 0.5 ms",
            *verdict(added_ttfb, lambda v: v <= 0.5, 2, " ms"),
        ]
    )
    added_ttfb99 = relative(
        results, "paced-32", Kind.TPROXY_OFF, Kind.DIRECT, pct(ttfbs, 0.99), minus
    )
    rows.append(
        [
            "2. added TTFB p99, 32 paced streams",
            "≤ 10 ms",
            *verdict(added_ttfb99, lambda v: v <= 10, 2, " ms"),
        ]
    )
    delays = per_round(results, "paced-1", Kind.TPROXY_OFF, pct(event_delays, 0.99))
    rows.append(
        [
            "2. event delay p99 (send → receive), 1 client",
            "≤ 1 ms",
            *verdict(delays, lambda v: v <= 1, 2, " ms"),
        ]
    )
    hit_json = per_round(results, "json-1", Kind.TPROXY_HIT, pct(latencies, 0.5))
    rows.append(
        [
            "3. cache hit latency p50, 1 client, JSON",
            "≤ 1 ms",
            *verdict(hit_json, lambda v: v <= 1, 2, " ms"),
        ]
    )
    hit_stream = per_round(results, "paced-1", Kind.TPROXY_HIT, pct(latencies, 0.5))
    rows.append(
        [
            "3. cache hit latency p50, 1 client, stream",
            "≤ 1 ms",
            *verdict(hit_stream, lambda v: v <= 1, 2, " ms"),
        ]
    )
    for key, label in CHARTED.items():
        values = relative(results, key, Kind.TPROXY_HIT, Kind.FLOOR, rate, ratio)
        rows.append(
            [
                f"3. cache hits ≥ 0.9× the Hypercorn+Trio floor, {label}",
                "≥ 0.90×",
                *verdict(values, lambda v: v >= 0.9, 2, "×"),
            ]
        )
    rows.append(memory_goal(info))
    for key in ("json-64", "stream-64"):
        values = relative(results, key, Kind.TPROXY_OFF2, Kind.TPROXY_OFF, rate, ratio)
        rows.append(
            [
                f"5. 2 tproxy processes (reuse_port) / 1, cache off, {CHARTED[key]}",
                "≥ 1.70×",
                *verdict(values, lambda v: v >= 1.7, 2, "×"),
            ]
        )
    notes = [
        *info.notes,
        "Goal 5: the load generator and the upstream run on the same cores as the two tproxy "
        "processes, so two processes cannot have two whole cores; the ratio is what this "
        "machine allows, not what two workers give with a separate client.",
    ]
    return [*table(["goal", "target", "measured", "verdict"], rows), "", *(f"- {n}" for n in notes)]


def memory_goal(info: RunInfo) -> list[str]:
    """Goal 4's row: RSS added by 1,000 open streams through tproxy with the cache off."""
    goal = (
        f"4. RSS above idle, {MEMORY_STREAMS:,} open paced streams, cache off (flat over a long "
        f"stream: tested, `{LONG_STREAM_TEST}`, 200 MB, peak growth ~5 MiB)"
    )
    load = info.memory_load.get(Kind.TPROXY_OFF)
    if load is None:
        return [goal, "≤ 48 MB", "not measured", "—"]
    added_mb = load.added_kib * 1024 / 1e6
    value = f"{added_mb:.1f} MB ({load.added_kib / 1024:.1f} MiB)"
    if load.clients < MEMORY_STREAMS:
        return [goal, "≤ 48 MB", f"{value}, {load.clients:,} streams open", "not judged"]
    return [goal, "≤ 48 MB", value, "met" if added_mb <= 48 else "**not met**"]


def errors_section(results: Results, kinds: list[Kind]) -> list[str]:
    lines = []
    for key, by_kind in results.items():
        for kind in kinds:
            for number, sample in enumerate(by_kind.get(kind, []), start=1):
                if sample.measurement.errors:
                    lines.append(
                        f"- {key}, {kind.value}, round {number}: {sample.measurement.errors}"
                    )
    if not lines:
        return ["", "## Errors", "", "No request failed, timed out or got a status other than 200."]
    return ["", "## Errors", "", *lines]


def chart_data(results: Results, kinds: list[Kind], stamp: str) -> chart.ChartData:
    """Medians over the rounds, for the picture."""
    rates: dict[str, dict[str, float]] = {}
    for key, label in CHARTED.items():
        rates[label] = {}
        for kind in kinds:
            values = per_round(results, key, kind, rate)
            if values:
                rates[label][kind.value] = statistics.median(values)
    added: dict[str, float] = {}
    for kind in kinds:
        values = relative(results, "paced-1", kind, Kind.DIRECT, pct(ttfbs, 0.5), minus)
        values = [v for v in values if v == v]
        if kind is not Kind.DIRECT and values:
            added[kind.value] = statistics.median(values)
    notes = [
        "Medians over the rounds of one run of bench/run.py; the report beside this chart has "
        "the ranges."
    ]
    if Kind.NGINX_STATIC in kinds:
        notes.append(
            "nginx static sends a stream as one file in one write: it shows what the load "
            "generator reaches, not streaming."
        )
    if Kind.TPROXY_HIT.value in added:
        notes.append(
            "tproxy cache hit, lower panel: a replay from the store, against an upstream "
            "that starts its stream at once."
        )
    return chart.ChartData(
        title=f"tproxy and its references on {len(os.sched_getaffinity(0))} cores, {stamp}",
        targets=[k.value for k in kinds],
        slots=[list(Kind).index(k) for k in kinds],
        groups=list(CHARTED.values()),
        rates=rates,
        added_ttfb=added,
        notes=notes,
    )


def python_as_invoked() -> str:
    """The interpreter's path, relative to the checkout when it lives there (``.venv/...``)."""
    path = Path(sys.executable)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def litellm_note(binary: Path | None) -> str:
    if binary is None:
        return (
            "LiteLLM: not installed, not measured (`--litellm PATH` names a LiteLLM proxy "
            "installed in its own virtualenv)."
        )
    python = binary.parent / "python"
    done = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = done.stdout.strip() or "version unknown"
    return (
        f"LiteLLM: {version} ({binary}), one worker, the upstream as an OpenAI model. It "
        "rewrites every chunk and drops the upstream's send time, so its per-event delay is "
        "not measured."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks, write docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true", help="one short round (about 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="the Markdown file to write; the chart goes next to it, ending in .svg",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="load generator processes (default: nproc)",
    )
    parser.add_argument(
        "--litellm",
        type=Path,
        help="the `litellm` binary of a LiteLLM proxy in its own virtualenv: adds that target",
    )
    args = parser.parse_args()
    plan = make_plan(args.quick, args.rounds)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = os.getloadavg()
    revision = git_revision()  # now: the tree may change while the run goes on
    open_files, files_note = raise_open_files()  # first: the load processes and servers inherit
    found = nginx.find_or_install()
    notes = [found.note, litellm_note(args.litellm), files_note]
    pool = LoadPool(args.processes)
    memory_load: dict[Kind, MemoryLoad] = {}
    with tempfile.TemporaryDirectory(prefix="tproxy-bench-") as workdir:
        servers = Servers(Path(workdir))
        reuse_port_skipped = reuse_port_support(servers.workdir)
        if reuse_port_skipped:
            notes.append(reuse_port_skipped)
        options = Options(found.binary, args.litellm, reuse_port_skipped is None)
        try:
            targets = start_targets(servers, plan, options)
            idle = {t.kind: t.memory_kib()[0] for t in targets}
            results = run_rounds(pool, targets, plan)
            memory = {t.kind: (idle[t.kind], *t.memory_kib()) for t in targets}
            if open_files >= MEMORY_FILES:
                memory_load = measure_memory(pool, servers, plan, options, targets[0].port)
            else:
                notes.append(f"Goal 4: not measured, {MEMORY_FILES} open files are needed.")
        except (BenchError, LoadStuckError) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        finally:
            pool.close()
            servers.stop_all()
    svg = args.out.with_suffix(".svg")
    kinds = [t.kind for t in targets]
    info = RunInfo(
        stamp=stamp,
        revision=revision,
        command=" ".join([python_as_invoked(), "bench/run.py", *sys.argv[1:]]),
        plan=plan,
        load_processes=args.processes,
        load_before=load_before,
        load_after=os.getloadavg(),
        seconds=time.monotonic() - started,
        memory=memory,
        memory_load=memory_load,
        notes=notes,
        chart=svg.name,
    )
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(render(results, info, kinds, previous))
    svg.write_text(chart.render(chart_data(results, kinds, stamp)))
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"wrote {args.out} and {svg}; total time {minutes} min {seconds:02d} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
