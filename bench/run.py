"""Run the whole benchmark suite and write ``docs/benchmarks.md``.

    .venv/bin/python bench/run.py           # full run, ~7 minutes on 2 cores
    .venv/bin/python bench/run.py --quick   # one short round, under 2 minutes

It starts, each in its own process on a free port of 127.0.0.1: the benchmark upstream, the
minimal pass-through proxy, tproxy with the cache off and tproxy with the cache on (warmed with
the exact requests the load sends, so every request is a hit). Then, round after round, it runs
every measurement against every target in turn: drift of the machine (other work, frequency
changes) lands on all targets alike, and each round gives one value per target. Tables show the
median over the rounds and the range; "added" values and ratios are taken within a round (target
against direct in the same round) before the median is taken.

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
from functools import partial
from importlib import metadata
from pathlib import Path

from load import LoadPool, LoadStuckError, Measurement, Mode, percentile, request_body
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
    MINIMAL = "minimal"
    TPROXY_OFF = "tproxy cache off"
    TPROXY_HIT = "tproxy cache hit"


@dataclass(frozen=True, slots=True)
class Test:
    """One measurement, run against every target in every round."""

    key: str
    mode: Mode
    connections: int
    duration: float
    on_hit: bool  # also run against the cache-hit target


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how often everything runs: the full run or ``--quick``."""

    rounds: int
    warmup: float
    interval_ms: float
    tests: tuple[Test, ...]
    hit_latency_duration: float  # paced-1 against cache hits: replays are instant

    @property
    def stream_seconds(self) -> float:
        """How long one paced stream lasts: paced connections start spread over it."""
        return EVENTS * self.interval_ms / 1000


def make_plan(quick: bool, rounds: int | None) -> Plan:
    throughput, paced1, paced32 = (1.0, 3.0, 2.0) if quick else (3.0, 12.0, 4.0)
    tests = (
        Test("json-1", Mode.JSON, 1, throughput, True),
        Test("json-16", Mode.JSON, 16, throughput, True),
        Test("json-64", Mode.JSON, 64, throughput, True),
        Test("stream-16", Mode.STREAM, 16, throughput, True),
        Test("stream-64", Mode.STREAM, 64, throughput, True),
        Test("paced-1", Mode.PACED, 1, paced1, True),
        Test("paced-32", Mode.PACED, 32, paced32, False),
    )
    return Plan(
        rounds=rounds or (1 if quick else 3),
        warmup=0.3 if quick else 0.5,
        interval_ms=10.0,
        tests=tests,
        hit_latency_duration=1.0 if quick else 2.0,
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
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kib(self) -> tuple[int, int]:
        """Resident set size now and at its peak, in KiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load is sent, and which process it costs CPU in."""

    kind: Kind
    url: str
    server: Server


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


def post(port: int, mode: Mode, interval_ms: float) -> tuple[int, str, bytes]:
    """One request as the load sends it: status, Cache-Status header, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if mode is Mode.PACED:
        headers["X-Bench-Interval-Ms"] = f"{interval_ms:g}"
    try:
        connection.request("POST", "/v1/chat/completions", request_body(mode), headers)
        response = connection.getresponse()
        return response.status, response.getheader("cache-status") or "", response.read()
    finally:
        connection.close()


class Servers:
    """Every server process of a run; all are stopped on exit, whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Server] = []

    def start(self, name: str, command: list[str]) -> Server:
        log = self.workdir / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        server = Server(name, process, log)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self.started:
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def tproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "tproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tproxy"]


def start_targets(servers: Servers, plan: Plan) -> list[Target]:
    up, minimal, off, off_admin, hit, hit_admin = free_ports(6)
    upstream_url = f"http://127.0.0.1:{up}"
    upstream = servers.start(
        "upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(up)]
    )
    wait_until(lambda: port_open(up), upstream)
    proxy = servers.start(
        "minimal",
        [
            sys.executable,
            str(BENCH / "minimal_proxy.py"),
            "--upstream",
            upstream_url,
            "--listen",
            f"127.0.0.1:{minimal}",
        ],
    )
    wait_until(lambda: port_open(minimal), proxy)
    tproxies: list[Target] = []
    for kind, port, admin, enabled in (
        (Kind.TPROXY_OFF, off, off_admin, "false"),
        (Kind.TPROXY_HIT, hit, hit_admin, "true"),
    ):
        slug = "off" if kind is Kind.TPROXY_OFF else "hit"
        config = servers.workdir / f"tproxy-{slug}.toml"
        config.write_text(f"[cache]\nenabled = {enabled}\n")
        server = servers.start(
            kind.value,
            [
                *tproxy_command(),
                "serve",
                "--config",
                str(config),
                "--upstream",
                upstream_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--cache-dir",
                str(servers.workdir / f"store-{slug}"),
            ],
        )
        wait_until(partial(healthy, admin), server)
        tproxies.append(Target(kind, f"http://127.0.0.1:{port}", server))
    targets = [
        Target(Kind.DIRECT, upstream_url, upstream),
        Target(Kind.MINIMAL, f"http://127.0.0.1:{minimal}", proxy),
        *tproxies,
    ]
    for target in targets:
        check_target(target, plan)
    return targets


def check_target(target: Target, plan: Plan) -> None:
    """Every target answers every request kind whole; the hit target answers from its cache."""
    port = int(target.url.rsplit(":", 1)[1])
    for mode in (Mode.JSON, Mode.STREAM, Mode.PACED):
        status, cache_status, body = post(port, mode, plan.interval_ms)
        if status != 200 or (mode is not Mode.JSON and not body.endswith(b"data: [DONE]\n\n")):
            raise BenchError(f"{target.kind.value}: {mode.value} answered {status}: {body[:200]!r}")
        if target.kind is not Kind.TPROXY_HIT:
            continue
        for _ in range(100):  # the store writer commits in the background: wait for the entry
            status, cache_status, body = post(port, mode, plan.interval_ms)
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
                if target.kind is Kind.TPROXY_HIT and not test.on_hit:
                    continue
                duration = test.duration
                if target.kind is Kind.TPROXY_HIT and test.mode is Mode.PACED:
                    duration = plan.hit_latency_duration
                stagger = plan.stream_seconds if test.mode is Mode.PACED else 0.0
                target.server.check_alive()
                running = pool.start(
                    target.url,
                    test.mode,
                    test.connections,
                    duration=duration,
                    warmup=max(plan.warmup, stagger),
                    interval_ms=plan.interval_ms,
                    stagger=stagger,
                )
                cpu = cpu_in_window(target.server, running.window)
                measurement = running.wait()
                sample = Sample(measurement, cpu, duration)
                results[test.key].setdefault(target.kind, []).append(sample)
                errors = f" errors {measurement.errors}" if measurement.errors else ""
                print(
                    f"round {round_number}/{plan.rounds} {test.key:>9} {target.kind.value:<17}"
                    f" {measurement.rate:9.1f}/s{errors}",
                    flush=True,
                )
    return results


def cpu_in_window(server: Server, window: tuple[float, float]) -> float:
    """The server's CPU seconds between two ``time.time()`` instants still to come."""
    time.sleep(max(0.0, window[0] - time.time()))
    before = server.cpu_seconds()
    time.sleep(max(0.0, window[1] - time.time()))
    return server.cpu_seconds() - before


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


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(results: Results, info: RunInfo, kinds: list[Kind], analysis: str) -> str:
    plan = info.plan
    tproxies = [Kind.TPROXY_OFF, Kind.TPROXY_HIT]
    tests = {t.key: t for t in plan.tests}
    throughput_keys = ["json-1", "json-16", "json-64", "stream-16", "stream-64"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `bench/run.py` on {info.stamp} in {info.seconds / 60:.1f} minutes. "
        "Everything but the analysis section is rewritten by each run; `bench/README.md` says "
        "what each number means and how it is measured.",
        "",
        f"Command: `{info.command}`",
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
        f"- Throughput measurements: {tests['json-16'].duration:g} s each after "
        f"{plan.warmup:g} s of warm-up; paced streams: {EVENTS} events {plan.interval_ms:g} ms "
        f"apart, {tests['paced-1'].duration:g} s at 1 client, {tests['paced-32'].duration:g} s "
        f"at 32 clients ({plan.hit_latency_duration:g} s at 1 client against cache hits), "
        f"after a warm-up of one stream's length ({plan.stream_seconds:g} s) over which the "
        "connections' first requests are spread evenly, so that streams do not run in lockstep.",
        f"- **The load generator ({info.load_processes} processes), the upstream and the proxy "
        "all share the same cores.** Every request the load sends costs CPU that the servers "
        "under test cannot use, so absolute numbers are lower than on a machine with a separate "
        "client, and the direct numbers are limited by the client and the one-process upstream "
        "as much as anything.",
        "- tproxy runs as shipped (default settings, access log at `info` written to a file), "
        "with `[cache] enabled = false` for the pass-through target.",
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
        [k.value, *(spread(per_round(results, key, k, rate), 0) for key in throughput_keys)]
        for k in kinds
    ]
    out += table(header, rows)
    out += ["", "### Ratios (same round, then median and range)", ""]
    rows = []
    for kind in tproxies:
        for base in (Kind.MINIMAL, Kind.DIRECT):
            rows.append(
                [
                    f"{kind.value} / {base.value}",
                    *(
                        spread(relative(results, key, kind, base, rate, ratio), 2, "×")
                        for key in throughput_keys
                    ),
                ]
            )
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
    out += latency_table(results, "paced-1", kinds, ttfbs, "TTFB")
    out += [
        "",
        "Against the cache-hit target the stream is replayed from the store at once, so its row "
        "is the latency of a hit rather than of a forwarded stream; *added* compares it with an "
        "upstream that answers instantly.",
        "",
        "### Paced streams, 32 concurrent clients",
        "",
    ]
    out += latency_table(results, "paced-32", proxies_without_hit(kinds), ttfbs, "TTFB")
    out += [
        "",
        "### Per-event delay",
        "",
        "Client receive time minus the upstream's send time (`time.time_ns()` in the event), for "
        "every event of every paced stream; the direct row is the floor (loopback, scheduling, "
        "the client itself).",
        "",
    ]
    out += latency_table(results, "paced-1", proxies_without_hit(kinds), event_delays, "1 client")
    out += [""]
    out += latency_table(
        results, "paced-32", proxies_without_hit(kinds), event_delays, "32 clients"
    )
    out += [
        "",
        "### Small JSON, 1 connection",
        "",
        "Whole-answer latency, one request at a time.",
        "",
    ]
    out += latency_table(results, "json-1", kinds, latencies, "latency")
    out += [
        "",
        "## Where the CPU goes",
        "",
        "CPU time per answer, in microseconds, of the process under test (the upstream for "
        "direct, the proxy otherwise; the upstream's own share behind a proxy is not included) "
        "and of the load generator, both read at the edges of the measured window; then how "
        "many cores the process under test kept busy in the window (a single-threaded process "
        "saturates at 1.0), and its memory.",
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
    out += ["", "## The goals of issue 8", ""]
    out += goals(results)
    out += errors_section(results, kinds)
    out += ["", "## Analysis", ""]
    match = ANALYSIS_BEGIN.search(analysis)
    if match is None:
        out += [f"<!-- analysis:begin run={info.stamp} -->", "_Not written yet._", ""]
    else:
        if match.group(1) != info.stamp:
            out += [
                f"> Written for the run of {match.group(1)}, not this one: check it against the "
                "tables above.",
                "",
            ]
        out += [f"<!-- analysis:begin run={match.group(1)} -->", match.group(2).rstrip("\n"), ""]
    out += ["<!-- analysis:end -->", ""]
    return "\n".join(out)


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


def goals(results: Results) -> list[str]:
    """Each goal of issue 8 that this suite measures, with the measured value, met or not."""
    rows: list[list[str]] = []

    def verdict(
        values: list[float], ok: Callable[[float], bool], digits: int, suffix: str
    ) -> list[str]:
        values = [v for v in values if v == v]
        if not values:
            return ["not measured", "—"]
        median = statistics.median(values)
        return [spread(values, digits, suffix), "met" if ok(median) else "**not met**"]

    for key, label in (
        ("json-16", "JSON, 16 conns"),
        ("json-64", "JSON, 64 conns"),
        ("stream-16", "streams, 16 conns"),
        ("stream-64", "streams, 64 conns"),
    ):
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
    rows.append(["3. hits ≥ 0.9× the Hypercorn+Trio floor", "≥ 0.90×", "not measured yet", "—"])
    rows.append(["4. memory (1,000 open streams, long stream)", "≤ 48 MB", "not measured yet", "—"])
    rows.append(["5. scaling with workers", "≥ 1.7× with 2", "not measured yet", "—"])
    return table(["goal", "target", "measured", "verdict"], rows)


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


def python_as_invoked() -> str:
    """The interpreter's path, relative to the checkout when it lives there (``.venv/...``)."""
    path = Path(sys.executable)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks, write docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true", help="one short round (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown file to write")
    parser.add_argument(
        "--processes",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="load generator processes (default: nproc)",
    )
    args = parser.parse_args()
    plan = make_plan(args.quick, args.rounds)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = os.getloadavg()
    revision = git_revision()  # now: the tree may change while the run goes on
    pool = LoadPool(args.processes)
    with tempfile.TemporaryDirectory(prefix="tproxy-bench-") as workdir:
        servers = Servers(Path(workdir))
        try:
            targets = start_targets(servers, plan)
            idle = {t.kind: t.server.memory_kib()[0] for t in targets}
            results = run_rounds(pool, targets, plan)
            memory = {t.kind: (idle[t.kind], *t.server.memory_kib()) for t in targets}
        except (BenchError, LoadStuckError) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        finally:
            pool.close()
            servers.stop_all()
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
    )
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(render(results, info, [t.kind for t in targets], previous))
    print(f"wrote {args.out} ({info.seconds / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
