"""Throughput of ``tproxy serve --workers 2`` against ``--workers 1``, in one run.

    .venv/bin/python bench/workers.py            # 3 rounds of 8 s each way, about 1.5 minutes

Starts the benchmark upstream and, on their own ports, tproxy with one worker and with two
(the cache off: every request goes to the upstream), then alternates JSON load at each, round
after round, so that drift of the machine lands on both alike. Prints the answers per second of
each round and the median ratio. The load generator and the upstream run on the same cores as
the proxy, so on a 2-core machine the ratio says what a second worker buys there, not the
ceiling of two cores given to tproxy alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from load import LoadPool, Mode
from run import Server, Servers, cpu_in_window, free_ports, start_script, start_tproxy

CONFIG = "[cache]\nenabled = false\n"


def cpu_seconds(server: Server) -> float:
    """CPU time so far of the process and its children (a supervisor's workers), from /proc."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for each in (pid, *map(int, children)):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description="Throughput of 2 workers against 1.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    up, one, one_admin, two, two_admin = free_ports(5)
    upstream_url = f"http://127.0.0.1:{up}"
    pool = LoadPool(2)
    with tempfile.TemporaryDirectory() as workdir:
        servers = Servers(Path(workdir))
        try:
            start_script(servers, "upstream", "upstream.py", ["--port", str(up)], up)
            targets = {
                1: (one, start_tproxy(servers, "one", CONFIG, (one, one_admin), upstream_url)),
                2: (two, start_tproxy(servers, "two", CONFIG, (two, two_admin), upstream_url, 2)),
            }
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.rounds):
                for workers, (port, server) in targets.items():
                    running = pool.start(
                        f"http://127.0.0.1:{port}",
                        Mode.JSON,
                        args.connections,
                        duration=args.duration,
                        warmup=1.0,
                    )
                    cpu = cpu_in_window(lambda server=server: cpu_seconds(server), running.window)
                    measured = running.wait()
                    if measured.error_count:
                        sys.exit(f"{workers} worker(s): errors {measured.errors}")
                    rates[workers].append(measured.rate)
                    print(
                        f"{workers} worker(s): {measured.rate:.0f}/s,"
                        f" {cpu / measured.completed * 1e6:.0f} us CPU per answer,"
                        f" {cpu / args.duration:.2f} cores busy",
                        flush=True,
                    )
        finally:
            servers.stop_all()
            pool.close()
    ratios = [two_rate / one_rate for one_rate, two_rate in zip(rates[1], rates[2], strict=True)]
    each = ", ".join(f"{value:.2f}" for value in ratios)
    print(
        f"median: 1 worker {statistics.median(rates[1]):.0f}/s,"
        f" 2 workers {statistics.median(rates[2]):.0f}/s,"
        f" ratio {statistics.median(ratios):.2f} (per round {each})"
    )


if __name__ == "__main__":
    main()
