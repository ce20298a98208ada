"""Throughput of ``tproxy serve --workers 2`` against ``--workers 1``, in one run.

    .venv/bin/python bench/workers.py                 # 3 rounds of 8 s each way, about 1 minute
    .venv/bin/python bench/workers.py --cache         # the same with every answer a cache hit
    .venv/bin/python bench/workers.py --load python --upstream python   # no C tools

Starts an upstream and, on their own ports, tproxy with one worker and with two (the cache off:
every request goes to the upstream; with ``--cache``, on and warmed: every request is a hit),
then alternates JSON load at each, round after round, so that drift of the machine lands on both
alike. Prints the answers per second of each round, the cores each side used, and the median
ratio.

By default the load generator is wrk and the upstream nginx serving the answer from a file
(both installed from Debian's packages when missing): C programs that spend a small part of
what tproxy spends per request, so that two workers on a 2-core machine get close to the two
cores. With ``--load python --upstream python`` (``load.py``, ``upstream.py``) the load and the
upstream cost about as much CPU as the proxy: the ratio then says what a second worker buys on
a machine shared with them, not what two cores give tproxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nginx
import wrk
from load import LoadPool, Mode
from run import (
    Server,
    Servers,
    cpu_in_window,
    free_ports,
    port_open,
    process_cpu_seconds,
    start_script,
    start_tproxy,
    wait_until,
)

OFF = "[cache]\nenabled = false\n"
ON = "[cache]\nenabled = true\n"


def cpu_seconds(server: Server) -> float:
    """CPU time so far of the process and its children (a supervisor's workers), from /proc."""
    pid = server.process.pid
    # Each thread lists the children it started: the supervisor may start workers from any.
    tasks = Path(f"/proc/{pid}/task").iterdir()
    children = [child for task in tasks for child in (task / "children").read_text().split()]
    return sum(process_cpu_seconds(each) for each in (pid, *map(int, children)))


def children_cpu() -> float:
    """CPU of this process's ended children so far: the wrk runs."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@dataclass(frozen=True, slots=True)
class Round:
    rate: float  # answers per second
    completed: int
    tproxy_cpu: float  # seconds of CPU over the measured window
    load_cpu: float | None  # the load generator's, when it is a process of its own (wrk)
    upstream_cpu: float = 0.0


def start_upstream(servers: Servers, kind: str, port: int, workdir: Path) -> Server:
    if kind == "nginx":
        found = nginx.find_or_install()
        if found.binary is None:
            sys.exit(f"{found.note}: use --upstream python")
        config = nginx.static_config(workdir / "nginx", port)
        server = servers.start("nginx", nginx.command(found.binary, config))
        wait_until(lambda: port_open(port), server)
        return server
    return start_script(servers, "upstream", "upstream.py", ["--port", str(port)], port)


def wrk_round(
    binary: str, script: Path, url: str, server: Server, connections: int, duration: float
) -> Round:
    cpu_before, load_before = cpu_seconds(server), children_cpu()
    result = wrk.run(binary, url, script, connections, duration)
    tproxy_cpu, load_cpu = cpu_seconds(server) - cpu_before, children_cpu() - load_before
    if result.errors:
        sys.exit(f"{url}: {result.errors} errors")
    return Round(result.rate, result.completed, tproxy_cpu, load_cpu)


def python_round(
    pool: LoadPool, url: str, server: Server, connections: int, duration: float
) -> Round:
    running = pool.start(url, Mode.JSON, connections, duration=duration, warmup=1.0)
    cpu = cpu_in_window(lambda: cpu_seconds(server), running.window)
    measured = running.wait()
    if measured.error_count:
        sys.exit(f"{url}: errors {measured.errors}")
    return Round(measured.rate, measured.completed, cpu, None)


def measure(args: argparse.Namespace, workdir: Path, servers: Servers) -> dict[int, list[Round]]:
    up, one, one_admin, two, two_admin = free_ports(5)
    upstream = start_upstream(servers, args.upstream, up, workdir)
    upstream_url = f"http://127.0.0.1:{up}"
    config = ON if args.cache else OFF
    targets = {
        1: (one, start_tproxy(servers, "one", config, (one, one_admin), upstream_url)),
        2: (two, start_tproxy(servers, "two", config, (two, two_admin), upstream_url, 2)),
    }
    if args.load == "python":
        pool = LoadPool(2)
        try:
            one_round = partial(
                python_round, pool, connections=args.connections, duration=args.duration
            )
            return alternate(args, targets, upstream, one_round)
        finally:
            pool.close()
    found = wrk.find_or_install()
    if found.binary is None:
        sys.exit(f"{found.note}: use --load python")
    script = wrk.post_script(workdir, Mode.JSON)
    one_round = partial(
        wrk_round, found.binary, script, connections=args.connections, duration=args.duration
    )
    return alternate(args, targets, upstream, one_round)


def alternate(
    args: argparse.Namespace,
    targets: dict[int, tuple[int, Server]],
    upstream: Server,
    one_round: Callable[[str, Server], Round],
) -> dict[int, list[Round]]:
    """Load each target in turn, round after round."""
    rounds: dict[int, list[Round]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for workers, (port, server) in targets.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            if args.cache and not rounds[workers]:
                one_round(url, server)  # the first answers store the entry; the rest hit it
            upstream_before = cpu_seconds(upstream)
            measured = one_round(url, server)
            upstream_cpu = cpu_seconds(upstream) - upstream_before
            measured = dataclasses.replace(measured, upstream_cpu=upstream_cpu)
            rounds[workers].append(measured)
            print(f"{workers} worker(s): {describe(measured, args.duration)}", flush=True)
            time.sleep(0.5)  # the cut connections' last work ends before the other side starts
    return rounds


def describe(measured: Round, duration: float) -> str:
    per_answer = measured.tproxy_cpu / measured.completed * 1e6
    busy = f"tproxy {measured.tproxy_cpu / duration:.2f}"
    if measured.load_cpu is not None:
        busy += f", wrk {measured.load_cpu / duration:.2f}"
    busy += f", upstream {measured.upstream_cpu / duration:.2f}"
    return f"{measured.rate:.0f}/s, {per_answer:.0f} us CPU per answer, cores busy: {busy}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Throughput of 2 workers against 1.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--load", choices=("wrk", "python"), default="wrk")
    parser.add_argument("--upstream", choices=("nginx", "python"), default="nginx")
    parser.add_argument("--cache", action="store_true", help="every answer a cache hit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        servers = Servers(Path(workdir))
        try:
            rounds = measure(args, Path(workdir), servers)
        finally:
            servers.stop_all()
    ratios = [b.rate / a.rate for a, b in zip(rounds[1], rounds[2], strict=True)]
    each = ", ".join(f"{value:.2f}" for value in ratios)
    print(
        f"median: 1 worker {statistics.median(r.rate for r in rounds[1]):.0f}/s,"
        f" 2 workers {statistics.median(r.rate for r in rounds[2]):.0f}/s,"
        f" ratio {statistics.median(ratios):.2f} (per round {each})"
    )


if __name__ == "__main__":
    main()
