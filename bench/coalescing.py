"""Single flight, measured: 64 identical concurrent streams against 64 distinct ones.

    .venv/bin/python bench/coalescing.py            # 3 rounds, well under a minute
    .venv/bin/python bench/coalescing.py --rounds 5

Starts bench/upstream.py and tproxy (cache on, default settings) on free loopback ports, then,
round after round and alternating the two cases, sends 64 concurrent streamed chat requests
(50 events 10 ms apart) that are either all the same or all different. Every round uses fresh
prompts, so no answer comes from the cache of an earlier round. Upstream calls are read from
tproxy's own ``/metrics`` (``tproxy_requests_total`` by cache status: a ``miss`` went upstream, a
``collapsed`` request joined one in flight, a ``hit`` was stored by then). Writes
``docs/benchmarks-coalescing.md``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import trio
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = ROOT / "docs" / "benchmarks-coalescing.md"
CLIENTS = 64

Result = tuple[float, Counter[str]]  # wall time, requests by cache status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_up(url: str) -> None:
    async with httpx2.AsyncClient(timeout=1) as http:
        with trio.fail_after(20):
            while True:
                try:
                    await http.get(url)
                except httpx2.TransportError:
                    await trio.sleep(0.05)  # a process starting up: polling is all there is
                else:
                    return


async def requests_by_cache(admin: str) -> Counter[str]:
    async with httpx2.AsyncClient(timeout=5) as http:
        text = (await http.get(admin + "/metrics")).text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tproxy_requests_total":
                counts[sample.labels["cache"]] += int(sample.value)
    return counts


async def one_case(proxy: str, admin: str, identical: bool) -> Result:
    nonce = uuid.uuid4().hex
    before = await requests_by_cache(admin)

    async def ask(http: httpx2.AsyncClient, index: int) -> None:
        content = nonce if identical else f"{nonce} {index}"
        body = {
            "model": "bench",
            "stream": True,
            "messages": [{"role": "user", "content": content}],
        }
        response = await http.post(
            "/v1/chat/completions", json=body, headers={"x-bench-interval-ms": "10"}
        )
        response.raise_for_status()

    limits = httpx2.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx2.AsyncClient(base_url=proxy, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(CLIENTS):
                nursery.start_soon(ask, http, index)
        wall = time.perf_counter() - started
    after = await requests_by_cache(admin)
    return wall, after - before


async def measure(proxy: str, admin: str, rounds: int) -> dict[str, list[Result]]:
    await wait_until_up(admin + "/healthz")
    results: dict[str, list[Result]] = {"identical": [], "distinct": []}
    for _ in range(rounds):
        for case in ("identical", "distinct"):
            results[case].append(await one_case(proxy, admin, case == "identical"))
    return results


def run(rounds: int) -> dict[str, list[Result]]:
    """Start the upstream and tproxy, measure, stop them."""
    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as store:
        tproxy = [
            *(sys.executable, "-m", "tproxy", "serve"),
            *("--upstream", f"http://127.0.0.1:{upstream_port}"),
            *("--listen", f"127.0.0.1:{proxy_port}"),
            *("--admin-listen", f"127.0.0.1:{admin_port}"),
            *("--cache-dir", store),
        ]
        upstream = [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)]
        processes = [
            subprocess.Popen(upstream),
            subprocess.Popen(tproxy, stderr=subprocess.DEVNULL),
        ]
        try:
            proxy, admin = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"
            return trio.run(measure, proxy, admin, rounds)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=15)


def report(results: dict[str, list[Result]], rounds: int) -> str:
    lines = [
        "# Benchmark: single flight",
        "",
        f"Generated by `bench/coalescing.py --rounds {rounds}` on "
        f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}; 2 cores shared by the client, "
        "the upstream and tproxy.",
        "",
        f"{CLIENTS} concurrent streamed chat requests (50 events 10 ms apart, about 0.5 s of "
        "generation each), all identical or all different, fresh prompts every round; "
        "cases alternate within each round. Upstream calls are the requests tproxy counted as "
        "`miss`.",
        "",
        "| case | upstream calls (per round) | collapsed | hits | wall time, median (range) |",
        "|---|---|---|---|---|",
    ]
    for case, rows in results.items():
        walls = [wall for wall, _ in rows]
        calls = "/".join(str(counts["miss"]) for _, counts in rows)
        collapsed = "/".join(str(counts["collapsed"]) for _, counts in rows)
        hits = "/".join(str(counts["hit"]) for _, counts in rows)
        lines.append(
            f"| {CLIENTS} {case} | {calls} | {collapsed} | {hits} | "
            f"{statistics.median(walls):.2f} s ({min(walls):.2f}–{max(walls):.2f}) |"
        )
    identical = statistics.median(wall for wall, _ in results["identical"])
    distinct = statistics.median(wall for wall, _ in results["distinct"])
    lines += [
        "",
        f"Wall time, identical / distinct: {identical / distinct:.2f}× (same run).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = run(args.rounds)
    text = report(results, args.rounds)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
