"""Issue 16's serving goals, each measured within one run.

    .venv/bin/python bench/serving_costs.py hits --rounds 7      # hits vs Hypercorn's constant app
    .venv/bin/python bench/serving_costs.py ttfb --rounds 5      # added TTFB at 1 client
    .venv/bin/python bench/serving_costs.py ttfb --clients 32    # p99 TTFB at 32 paced streams
    .venv/bin/python bench/serving_costs.py memory               # RSS of 1,000 open streams

- ``hits``: tproxy from the working tree (or ``--revision REV``; cache on, warmed) and
  ``constant_app.py``, both pinned to the last core and loaded AT THE SAME TIME, as ``ab.py``
  loads two versions; the ratio of CPU per answer is taken within each round (``hit-16``:
  small JSON, ``hit-stream-16``: the 50-event stream, from the cache / in one body message).
- ``ttfb``: paced streams (50 events 10 ms apart) at 1 client against the upstream itself, the
  minimal proxy and tproxy (cache off), in turn within each round; *added* is a target's
  percentile minus the upstream's in the same round. ``--clients N`` runs N streams at once
  (issue 16's p99 goal is at 32), and the p99 ratio to the minimal proxy is taken within each
  round. It also reports whether every TCP socket
  of both proxies has ``TCP_NODELAY`` (read from the live processes' sockets), and with
  ``--pin SPEC`` pins all processes to one core set (``--pin 0``: everything on one core: no
  cross-core wake-ups, but every hop waits for the one core).
- ``memory``: ``run.py``'s 1,000-stream measurement (fresh processes) for the minimal proxy
  and tproxy with the cache off.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from ab import export, measure_pair, parse_test, start_tproxy, warm
from load import LoadPool, Mode, percentile
from run import (
    BENCH,
    OFF_CONFIG,
    ROOT,
    Kind,
    Options,
    Server,
    Servers,
    free_ports,
    make_plan,
    measure_memory,
    port_open,
    raise_open_files,
    start_minimal,
    start_script,
    wait_until,
)
from run import start_tproxy as start_tproxy_unpinned
from upstream import EVENTS

INTERVAL_MS = 10.0
PIDFD_OPEN, PIDFD_GETFD = 434, 438  # Linux syscall numbers (x86-64 and arm64 alike)


def spread(values: list[float], digits: int = 3) -> str:
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{middle:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def hits(args: argparse.Namespace, servers: Servers, upstream_url: str) -> None:
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1]
    if len(cores) > 1:
        os.sched_setaffinity(0, set(cores[:-1]))  # this script, the load and the upstream
    tests = [parse_test(key) for key in args.tests.split(",")]
    source = ROOT if args.revision is None else export(args.revision, servers.workdir / "source")
    tproxy = start_tproxy(servers, "tproxy-hit", source, "", upstream_url, core)
    warm(tproxy[1], {test.mode for test in tests}, 0)
    (port,) = free_ports(1)
    command = ["taskset", "-c", str(core), sys.executable, str(BENCH / "constant_app.py")]
    constant = servers.start("constant", [*command, "--listen", f"127.0.0.1:{port}"])
    wait_until(partial(port_open, port), constant)
    pools = (LoadPool(1), LoadPool(1))
    ratios: dict[str, list[float]] = {test.key: [] for test in tests}
    costs: dict[tuple[str, str], list[float]] = {}
    try:
        for number in range(args.rounds):
            pair = [("tproxy", tproxy), ("constant", (constant, port))]
            order = pair if number % 2 == 0 else pair[::-1]  # which load process drives which
            for test in tests:
                got = measure_pair(pools, [target for _, target in order], test, args.duration, 0)
                seen = {name: cost for (name, _), (cost, _) in zip(order, got, strict=True)}
                for name, cost in seen.items():
                    costs.setdefault((test.key, name), []).append(cost)
                ratios[test.key].append(seen["tproxy"] / seen["constant"])
                print(
                    f"round {number + 1}/{args.rounds} {test.key:>14}: tproxy"
                    f" {seen['tproxy']:7.1f} µs  constant {seen['constant']:7.1f} µs"
                    f"  ×{ratios[test.key][-1]:.3f}",
                    flush=True,
                )
    finally:
        for pool in pools:
            pool.close()
    print(f"\n{args.rounds} rounds of {args.duration:g} s, both servers on core {core}\n")
    print("| test | tproxy CPU µs/answer | constant app CPU µs/answer | ratio tproxy/constant |")
    print("|---|---|---|---|")
    for test in tests:
        tproxy_cost = statistics.median(costs[(test.key, "tproxy")])
        constant_cost = statistics.median(costs[(test.key, "constant")])
        ratio = spread(ratios[test.key])
        print(f"| {test.key} | {tproxy_cost:.0f} | {constant_cost:.0f} | ×{ratio} |")


def nodelay_counts(pid: int) -> tuple[int, int]:
    """How many of the process's TCP sockets (listening ones aside) have ``TCP_NODELAY``, of how
    many: each is read through a copy of its descriptor (``pidfd_getfd``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    with_option = total = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            with socket.socket(fileno=fd) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                try:
                    sock.getpeername()
                except OSError:
                    continue  # listening
                total += 1
                with_option += bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        os.close(pidfd)
    return with_option, total


def ttfb(args: argparse.Namespace, servers: Servers, upstream: tuple[Server, int]) -> None:
    upstream_url = f"http://127.0.0.1:{upstream[1]}"
    (minimal_port,) = free_ports(1)
    minimal = start_minimal(servers, "minimal", upstream_url, minimal_port)
    ports = free_ports(2)
    tproxy = start_tproxy_unpinned(
        servers, "tproxy off", OFF_CONFIG, (ports[0], ports[1]), upstream_url
    )
    targets = {
        "direct": upstream,
        "minimal": (minimal, minimal_port),
        "tproxy": (tproxy, ports[0]),
    }
    pool = LoadPool(min(args.clients, len(os.sched_getaffinity(0))))
    stagger = EVENTS * INTERVAL_MS / 1000
    found: dict[str, dict[str, list[float]]] = {}
    nodelay: dict[str, tuple[int, int]] = {}
    try:
        for number in range(args.rounds):
            p50s: dict[str, float] = {}
            for name, (server, port) in targets.items():
                running = pool.start(
                    f"http://127.0.0.1:{port}",
                    Mode.PACED,
                    args.clients,
                    duration=args.duration,
                    warmup=stagger,
                    interval_ms=INTERVAL_MS,
                    stagger=stagger,
                )
                opens, closes = running.window
                time.sleep(max(0.0, opens - time.time()))
                before = server.cpu_seconds()
                if number == 0 and name != "direct":  # while the stream's sockets are open
                    nodelay[name] = nodelay_counts(server.process.pid)
                time.sleep(max(0.0, closes - time.time()))
                cpu = server.cpu_seconds() - before
                measurement = running.wait()
                if measurement.errors:
                    print(f"  {name}: errors {measurement.errors}", flush=True)
                figures = found.setdefault(name, {})
                p50s[name] = percentile(measurement.ttfbs, 0.5)
                p99 = percentile(measurement.ttfbs, 0.99)
                figures.setdefault("p50", []).append(p50s[name])
                figures.setdefault("p99", []).append(p99)
                figures.setdefault("cpu", []).append(cpu / (measurement.completed or 1) * 1e3)
                if name != "direct":
                    figures.setdefault("added", []).append(p50s[name] - p50s["direct"])
                if name == "tproxy":  # the p99 ratio to the minimal proxy's, within the round
                    ratio = p99 / found["minimal"]["p99"][-1]
                    figures.setdefault("p99 ratio", []).append(ratio)
            line = ", ".join(f"{name} {p50s[name]:.2f}" for name in targets)
            print(f"round {number + 1}/{args.rounds} TTFB p50 ms: {line}", flush=True)
        for name, (with_option, total) in nodelay.items():
            print(f"{name}: {with_option} of {total} connected TCP sockets have TCP_NODELAY")
    finally:
        pool.close()
    clients = f"{args.clients} client{'s' if args.clients > 1 else ''}"
    print(f"\n{args.rounds} rounds of {args.duration:g} s, {clients}, pinned: {args.pin or 'no'}\n")
    columns = "TTFB p50 ms | TTFB p99 ms | added p50 ms | p99 / minimal's | CPU ms per stream"
    print(f"| target | {columns} |")
    print("|---|---|---|---|---|---|")
    for name, figures in found.items():
        added = spread(figures["added"], 2) if "added" in figures else "—"
        ratio = f"×{spread(figures['p99 ratio'])}" if "p99 ratio" in figures else "—"
        print(
            f"| {name} | {spread(figures['p50'], 2)} | {spread(figures['p99'], 2)} | {added}"
            f" | {ratio} | {spread(figures['cpu'], 2)} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description="issue 16's serving goals, in one run")
    parser.add_argument("what", choices=("hits", "ttfb", "memory"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--tests", default="hit-16,hit-stream-16", help="for hits (ab.py's keys)")
    parser.add_argument("--pin", help="ttfb: a taskset CPU list for every process")
    parser.add_argument("--clients", type=int, default=1, help="ttfb: paced streams at once")
    parser.add_argument("--revision", help="hits: tproxy at this git revision")
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.pin.split(",")})  # children inherit
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tproxy-serving-") as tmp:
        servers = Servers(Path(tmp))
        try:
            (up,) = free_ports(1)
            upstream = start_script(servers, "upstream", "upstream.py", ["--port", str(up)], up)
            if args.what == "hits":
                hits(args, servers, f"http://127.0.0.1:{up}")
            elif args.what == "ttfb":
                ttfb(args, servers, (upstream, up))
            else:
                raise_open_files()
                pool = LoadPool(len(os.sched_getaffinity(0)))
                try:
                    options = Options(nginx=None, litellm=None, reuse_port=False)
                    loads = measure_memory(pool, servers, make_plan(False, 1), options, up)
                finally:
                    pool.close()
                for kind in (Kind.MINIMAL, Kind.TPROXY_OFF):
                    load = loads[kind]
                    print(
                        f"| {kind.value} | {load.idle_kib / 1024:.1f} | {load.open_kib / 1024:.1f}"
                        f" | {(load.open_kib - load.idle_kib) / 1024:.1f} | {load.clients:,} |"
                    )
        finally:
            servers.stop_all()
    print(f"\n{time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
