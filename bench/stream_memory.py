"""What one open stream holds in a tproxy process: RSS, objects by type, tasks, Python lines.

    .venv/bin/python bench/stream_memory.py                       # 1,000 streams: RSS over idle
    .venv/bin/python bench/stream_memory.py --streams 300 --trace 1    # and tracemalloc by line

tproxy (the working tree, cache off, one process) runs under this script's ``--serve`` mode: a
SIGUSR1 handler that writes, for the script to read, a census of the objects the collector sees
(by type), every Trio task's coroutine chain, and a tracemalloc snapshot when the server runs
under ``-X tracemalloc`` (``--trace FRAMES``; RSS is then tracemalloc's too: read the lines, not
the MiB). The script answers three unpaced streams, reads RSS and takes a census (idle), holds
``--streams`` paced streams (50 events 2 s apart, so none ends) until each has its first bytes,
waits a second, reads RSS and takes a census again (open), and prints the differences per
stream. ``serving_costs.py memory`` is the goal's measurement; this is where to look.
"""

from __future__ import annotations

import argparse
import collections
import gc
import pickle
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType

import trio
from run import OFF_CONFIG, Server, Servers, free_ports, port_open, start_script, wait_until

WARM_STREAMS = 3
PACED_INTERVAL_MS = 2000


def census() -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Objects by type, and Trio tasks by their coroutine chain (outermost first)."""
    types = collections.Counter(
        f"{type(item).__module__}.{type(item).__qualname__}" for item in gc.get_objects()
    )
    chains: collections.Counter[str] = collections.Counter()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        pending.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
        names = []
        awaited: object = task.coro
        while awaited is not None:
            code = getattr(awaited, "cr_code", None) or getattr(awaited, "gi_code", None)
            names.append(code.co_qualname if code is not None else type(awaited).__name__)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        chains[" > ".join(names)] += 1
    return types, chains


def serve(prefix: str, arguments: list[str]) -> int:
    """Run ``tproxy`` with ``arguments``; each SIGUSR1 writes ``prefix.N.census`` (and
    ``prefix.N.snapshot`` under tracemalloc), N counting from 1."""
    taken = 0

    def take(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        gc.collect()
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(f"{prefix}.{taken}.snapshot")
        written = Path(f"{prefix}.{taken}.census")
        written.with_suffix(".partial").write_bytes(pickle.dumps(census()))
        written.with_suffix(".partial").rename(written)

    signal.signal(signal.SIGUSR1, take)
    from tproxy.cli import main as tproxy_main

    sys.argv = ["tproxy", *arguments]
    return tproxy_main()


def rss_kib(server: Server) -> int:
    return server.memory_kib()[0]


def take_census(server: Server, prefix: Path, number: int) -> tuple[collections.Counter[str], ...]:
    server.process.send_signal(signal.SIGUSR1)
    written = Path(f"{prefix}.{number}.census")
    wait_until(written.exists, server, timeout=60.0)
    loaded: tuple[collections.Counter[str], ...] = pickle.loads(written.read_bytes())
    return loaded


def request(port: int, interval_ms: int) -> bytes:
    body = b'{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"stream":true}'
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Bench-Interval-Ms: %d\r\n\r\n%s" % (port, len(body), interval_ms, body)
    )


async def warm(port: int) -> None:
    """A few whole streams, so that idle is a server that has served."""
    for _ in range(WARM_STREAMS):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request(port, 0))
            received = b""
            with trio.fail_after(10):
                while not received.endswith(b"0\r\n\r\n"):
                    received += await stream.receive_some()


async def hold(port: int, streams: int, at_peak: trio.Event, release: trio.Event) -> None:
    """Open ``streams`` paced streams, set ``at_peak`` once each has its first bytes, and keep
    them open until ``release``."""
    started = 0

    async def one() -> None:
        nonlocal started
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request(port, PACED_INTERVAL_MS))
            with trio.fail_after(30):
                await stream.receive_some()
            started += 1
            if started == streams:
                at_peak.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
            await trio.sleep(0.001)


def per_stream(before: collections.Counter[str], after: collections.Counter[str], n: int) -> None:
    for name, count in (after - before).most_common(40):
        if count / n >= 0.5:
            print(f"  {count / n:6.2f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description="what one open stream holds in tproxy")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    parser.add_argument("--top", type=int, default=30, help="tracemalloc lines shown")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.serve:
        return serve(args.serve, rest)
    with tempfile.TemporaryDirectory(prefix="tproxy-stream-memory-") as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        try:
            up, port, admin = free_ports(3)
            start_script(servers, "upstream", "upstream.py", ["--port", str(up)], up)
            config = workdir / "tproxy.toml"
            config.write_text(
                OFF_CONFIG
                + f'[upstreams.bench]\nurl = "http://127.0.0.1:{up}"\nmax_connections = 4096\n'
            )
            prefix = workdir / "census"
            command = [sys.executable, *([f"-Xtracemalloc={args.trace}"] if args.trace else [])]
            command += [__file__, "--serve", str(prefix), "serve", "--config", str(config)]
            command += ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
            command += ["--cache-dir", str(workdir / "store"), "--workers", "1"]
            server = servers.start("tproxy", command)
            wait_until(lambda: port_open(port), server, timeout=60.0)
            trio.run(warm, port)
            time.sleep(0.5)
            idle = rss_kib(server)
            idle_types, idle_chains = take_census(server, prefix, 1)
            opened: list[int] = []

            async def measure() -> None:
                at_peak, release = trio.Event(), trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hold, port, args.streams, at_peak, release)
                    await at_peak.wait()
                    await trio.sleep(1.0)
                    opened.append(rss_kib(server))
                    await trio.to_thread.run_sync(take_census, server, prefix, 2)
                    release.set()

            trio.run(measure)
            open_types, open_chains = pickle.loads(Path(f"{prefix}.2.census").read_bytes())
        finally:
            servers.stop_all()
        n = args.streams
        added = opened[0] - idle
        print(
            f"{n} streams: idle {idle / 1024:.1f} MiB, open {opened[0] / 1024:.1f} MiB,"
            f" added {added / 1024:.1f} MiB = {added * 1024 / n / 1000:.1f} KB per stream"
        )
        print("tasks per stream, by coroutine chain:")
        per_stream(idle_chains, open_chains, n)
        print("objects per stream, by type:")
        per_stream(idle_types, open_types, n)
        if args.trace:
            before = tracemalloc.Snapshot.load(f"{prefix}.1.snapshot")
            after = tracemalloc.Snapshot.load(f"{prefix}.2.snapshot")
            lines = after.compare_to(before, "lineno")
            total = sum(line.size_diff for line in lines)
            print(f"Python objects (tracemalloc): {total / n:.0f} B per stream; by line:")
            for line in lines[: args.top]:
                frame = line.traceback[0]
                print(
                    f"  {line.size_diff / n:7.0f} B {line.count_diff / n:6.2f} objects"
                    f"  {frame.filename}:{frame.lineno}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
