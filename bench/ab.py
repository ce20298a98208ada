"""Measure a change: tproxy at a git revision against the working tree, side by side, as ratios.

    .venv/bin/python bench/ab.py                      # HEAD against the working tree
    .venv/bin/python bench/ab.py --base main --rounds 5 --tests json-16,hit-16

Both versions run from the same virtualenv (the base is ``git archive``d into a temporary
directory and put first on ``PYTHONPATH``), against one benchmark upstream, with the same load.
Both servers are pinned to the last core and everything else (this script, the load processes,
the upstream) to the others. Each measurement loads both versions AT THE SAME TIME, each from its
own load process, and reads each server's CPU from ``/proc`` over the same window: on a machine
shared with other work, whatever else runs lands on both alike (measured one after the other,
a version compared with itself varied by ±15 % from one run to the next on a busy 2-core host).
The ratio new/base (CPU per answer) is taken within each round; the table gives the median over
the rounds and the range. A ratio under 1 means the change costs less. ``--new HEAD`` measures
HEAD against itself: the noise floor. ``--base minimal`` puts ``minimal_proxy.py`` in the base's
place, pinned alike (cache-off tests only): the issue's goals are ratios to it.

Tests (``--tests``, comma-separated): ``json-16`` (small JSON, cache off), ``stream-16`` (the
50-event stream, unpaced, cache off), ``paced-16`` (50 events 10 ms apart, cache off), ``hit-16``
(small JSON answered from the cache), ``hit-stream-16`` (the stream answered from the cache).
The number is the count of connections.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from load import LoadPool, Mode, request_body
from run import (
    BENCH,
    OFF_CONFIG,
    ROOT,
    BenchError,
    Server,
    Servers,
    free_ports,
    healthy,
    port_open,
    post,
    start_script,
    wait_quiet,
    wait_until,
)
from upstream import EVENTS

INTERVAL_MS = 10.0
MODES = {"json": Mode.JSON, "stream": Mode.STREAM, "paced": Mode.PACED}


@dataclass(frozen=True, slots=True)
class Test:
    key: str
    mode: Mode
    connections: int
    hit: bool  # answered from the cache (the cache-on servers) rather than upstream


def parse_test(key: str) -> Test:
    """``json-16``, ``hit-16`` (JSON from the cache), ``hit-stream-16`` and so on."""
    *words, connections = key.split("-")
    hit = words[0] == "hit"
    mode = words[1] if hit and len(words) > 1 else "json" if hit else words[0]
    return Test(key, MODES[mode], int(connections), hit)


@dataclass(frozen=True, slots=True)
class Version:
    """One tproxy source tree and its two servers (cache off, cache on and warmed)."""

    name: str
    source: Path
    off: tuple[Server, int] | None
    hit: tuple[Server, int] | None


def start_tproxy(
    servers: Servers, name: str, source: Path, config_text: str, upstream_url: str, core: int
) -> tuple[Server, int]:
    """``tproxy serve`` from ``source``, pinned to ``core``; its proxy port once healthy."""
    port, admin = free_ports(2)
    config = servers.workdir / f"{name}.toml"
    config.write_text(config_text)
    command = ["taskset", "-c", str(core), sys.executable, "-P", "-m", "tproxy", "serve"]
    command += ["--config", str(config), "--upstream", upstream_url]
    command += ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    command += ["--cache-dir", str(servers.workdir / f"store-{name}")]
    server = servers.start(name, command, env={"PYTHONPATH": str(source)})
    wait_until(partial(healthy, admin), server)
    return server, port


def start_minimal_pinned(servers: Servers, upstream_url: str, core: int) -> tuple[Server, int]:
    """``minimal_proxy.py``, pinned to ``core`` as tproxy is; its port once it listens."""
    (port,) = free_ports(1)
    command = ["taskset", "-c", str(core), sys.executable, str(BENCH / "minimal_proxy.py")]
    command += ["--upstream", upstream_url, "--listen", f"127.0.0.1:{port}"]
    server = servers.start("base-minimal", command)
    wait_until(partial(port_open, port), server)
    return server, port


def warm(port: int, modes: set[Mode], turns: int) -> None:
    """Ask each request until the cache answers it (the store commits in the background)."""
    for mode in modes:
        for _ in range(100):
            status, cache_status, _ = post(port, mode, INTERVAL_MS, turns)
            if status == 200 and "hit" in cache_status:
                break
            time.sleep(0.05)
        else:
            raise BenchError(f"port {port}: {mode.value} never hit")


def export(revision: str, into: Path) -> Path:
    """The ``tproxy`` package at ``revision``, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "archive", revision, "tproxy"], cwd=ROOT, capture_output=True, check=True
    )
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def measure_pair(
    pools: tuple[LoadPool, LoadPool],
    targets: list[tuple[Server, int]],
    test: Test,
    duration: float,
    turns: int,
) -> list[tuple[float, float]]:
    """Both versions under the same load at the same time: per version, CPU µs per answer of
    its server and answers per second."""
    stagger = EVENTS * INTERVAL_MS / 1000 if test.mode is Mode.PACED else 0.0
    running = []
    for pool, (server, port) in zip(pools, targets, strict=True):
        server.check_alive()
        running.append(
            pool.start(
                f"http://127.0.0.1:{port}",
                test.mode,
                test.connections,
                duration=duration,
                warmup=max(0.5, stagger),
                interval_ms=INTERVAL_MS,
                stagger=stagger,
                turns=turns,
            )
        )
    opens = max(run.window[0] for run in running)
    closes = min(run.window[1] for run in running)
    time.sleep(max(0.0, opens - time.time()))
    before = [server.cpu_seconds() for server, _ in targets]
    time.sleep(max(0.0, closes - time.time()))
    spent = [server.cpu_seconds() - b for (server, _), b in zip(targets, before, strict=True)]
    results = []
    for run, (server, _), cpu in zip(running, targets, spent, strict=True):
        measurement = run.wait()
        wait_quiet(server)  # type: ignore[arg-type]  # it only asks for cpu_seconds()
        if measurement.errors:
            print(f"  {server.name} {test.key}: errors {measurement.errors}", flush=True)
        # Counted over its own window, which differs from the CPU's by a few ms at most.
        results.append((cpu / (measurement.completed or 1) * 1e6, measurement.rate))
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description="tproxy at a revision against the working tree.")
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--new", help="git revision to measure (default: the working tree)")
    parser.add_argument("--tests", default="json-16,stream-16,paced-16,hit-16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--turns", type=int, default=0, help="earlier exchanges in each request (~250 B each)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the servers to a core")
    args = parser.parse_args()
    tests = [parse_test(key) for key in args.tests.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[-1]
    if not args.no_pin and len(cores) > 1:
        os.sched_setaffinity(0, set(cores[:-1]))  # this script, the load and the upstream
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tproxy-ab-") as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        pools = (LoadPool(args.processes), LoadPool(args.processes))
        try:
            (up,) = free_ports(1)
            start_script(servers, "upstream", "upstream.py", ["--port", str(up)], up)
            upstream_url = f"http://127.0.0.1:{up}"
            minimal = args.base == "minimal"
            base_source = ROOT if minimal else export(args.base, workdir / "base")
            new_source = ROOT if args.new is None else export(args.new, workdir / "new")
            hit_modes = {t.mode for t in tests if t.hit}
            if minimal and hit_modes:
                raise BenchError("the minimal proxy has no cache: hit tests need a revision")
            versions = []
            for name, source in (("base", base_source), ("new", new_source)):
                core = server_core if not args.no_pin else cores[0]
                off = hit = None
                if minimal and name == "base":
                    off = start_minimal_pinned(servers, upstream_url, core)
                elif any(not t.hit for t in tests):
                    off = start_tproxy(
                        servers, f"{name}-off", source, OFF_CONFIG, upstream_url, core
                    )
                if hit_modes:
                    hit = start_tproxy(servers, f"{name}-hit", source, "", upstream_url, core)
                    warm(hit[1], hit_modes, args.turns)
                versions.append(Version(name, source, off, hit))
            ratios: dict[str, list[float]] = {t.key: [] for t in tests}
            rate_ratios: dict[str, list[float]] = {t.key: [] for t in tests}
            costs: dict[tuple[str, str], list[float]] = {}
            for round_number in range(args.rounds):
                # Which load process drives which version alternates from round to round.
                order = versions if round_number % 2 == 0 else versions[::-1]
                for test in tests:
                    targets = [version.hit if test.hit else version.off for version in order]
                    assert None not in targets
                    pair = measure_pair(pools, targets, test, args.duration, args.turns)  # type: ignore[arg-type]
                    seen = {version.name: got for version, got in zip(order, pair, strict=True)}
                    for name, (cost, _) in seen.items():
                        costs.setdefault((test.key, name), []).append(cost)
                    ratios[test.key].append(seen["new"][0] / seen["base"][0])
                    rate_ratios[test.key].append(seen["new"][1] / seen["base"][1])
                    print(
                        f"round {round_number + 1}/{args.rounds} {test.key:>14}:"
                        f" base {seen['base'][0]:8.1f} µs  new {seen['new'][0]:8.1f} µs"
                        f"  ×{ratios[test.key][-1]:.3f}",
                        flush=True,
                    )
        finally:
            for pool in pools:
                pool.close()
            servers.stop_all()
    new = args.new or "the working tree"
    print(f"\nbase {args.base}, new {new}, {args.rounds} rounds of {args.duration:g} s,", end=" ")
    print(f"{time.monotonic() - started:.0f} s in all; servers pinned: {not args.no_pin};", end=" ")
    print(f"request body {len(request_body(Mode.JSON, args.turns))} bytes\n")
    print("| test | base CPU µs/answer | new CPU µs/answer | CPU ratio new/base | rate ratio |")
    print("|---|---|---|---|---|")
    for test in tests:
        base = statistics.median(costs[(test.key, "base")])
        new = statistics.median(costs[(test.key, "new")])
        print(
            f"| {test.key} | {base:.0f} | {new:.0f} | ×{spread(ratios[test.key])}"
            f" | ×{spread(rate_ratios[test.key])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
