"""Memory of a shared flight whose followers never read (issue 13, item 7).

    .venv/bin/python bench/stalled_followers.py                      # 16 followers, 24 MB stream
    .venv/bin/python bench/stalled_followers.py --followers 4 --megabytes 8

Starts, on free loopback ports, an upstream (this script with ``--serve-upstream PORT``: one
long SSE answer per request, ~1 KiB events, paced so it lasts several seconds) and ``tproxy
serve`` with default settings (``max_entry_bytes`` 8 MiB). Then identical cacheable requests
arrive one after another over raw sockets whose 4 KiB receive buffers are never read: the first
opens the flight, the others join it mid-stream. Samples the tproxy process's RSS (``/proc``)
and its CPU time while they hang on, then closes them and samples
again. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import trio
from soak import free_port, proc_figures

ROOT = Path(__file__).resolve().parent.parent
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 960 + b'"}}]}\n\n'
DONE = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


async def _serve_connection(megabytes: int, stream: trio.SocketStream) -> None:
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        events = megabytes * 1024
        for index in range(events):
            await stream.send_all(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
            if index % 64 == 63:
                await trio.sleep(0.02)  # ~3 MB/s: a long stream
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


def serve_upstream(port: int, megabytes: int) -> None:
    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")

        async def handler(stream: trio.SocketStream) -> None:
            await _serve_connection(megabytes, stream)

        await trio.serve_listeners(handler, listeners)

    trio.run(main)


def request(port: int) -> bytes:
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "long"}]}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (port, len(body), body)
    )


async def drive(args: argparse.Namespace, ports: dict[str, int], pid: int) -> dict[str, object]:
    admin = f"http://127.0.0.1:{ports['admin']}"
    samples: list[dict[str, object]] = []
    async with httpx2.AsyncClient(timeout=5) as http:
        for _ in range(100):
            try:
                await http.get(admin + "/healthz")
                break
            except httpx2.TransportError:
                await trio.sleep(0.1)
        baseline = proc_figures(pid)["VmRSS"]
        started = time.monotonic()
        sockets: list[socket.socket] = []
        try:
            for _ in range(args.followers + 1):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", ports["proxy"]))
                sock.sendall(request(ports["proxy"]))
                sockets.append(sock)
                await trio.sleep(args.join_every)
            while time.monotonic() - started < args.hold:
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "rss_kib": proc_figures(pid)["VmRSS"],
                        "cpu_ticks": _cpu_ticks(pid),
                    }
                )
                await trio.sleep(0.5)
        finally:
            for sock in sockets:
                sock.close()
        await trio.sleep(args.settle)
        after = proc_figures(pid)["VmRSS"]
    peak = max(int(sample["rss_kib"]) for sample in samples)  # type: ignore[call-overload]
    ticks = [int(sample["cpu_ticks"]) for sample in samples]  # type: ignore[call-overload]
    return {
        "followers": args.followers,
        "stream_mb": args.megabytes,
        "rss_baseline_mib": round(baseline / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_after_close_mib": round(after / 1024, 1),
        "cpu_seconds_while_held": round((ticks[-1] - ticks[0]) / 100, 2),
        "held_seconds": round(args.hold, 1),
        "samples": samples[:: max(1, len(samples) // 12)],
    }


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def run(args: argparse.Namespace) -> dict[str, object]:
    ports = {"proxy": free_port(), "admin": free_port(), "upstream": free_port()}
    with tempfile.TemporaryDirectory(prefix="tproxy-stalled-") as tmp:
        config = Path(tmp) / "tproxy.toml"
        config.write_text(
            f'[cache]\ndir = "{tmp}/store"\n\n'
            f'[upstreams.bench]\nurl = "http://127.0.0.1:{ports["upstream"]}"\n'
        )
        upstream = subprocess.Popen(
            [
                *(sys.executable, __file__, "--serve-upstream", str(ports["upstream"])),
                *("--megabytes", str(args.megabytes)),
            ]
        )
        tproxy = subprocess.Popen(
            [
                *(sys.executable, "-m", "tproxy", "serve", "--config", str(config)),
                *("--listen", f"127.0.0.1:{ports['proxy']}"),
                *("--admin-listen", f"127.0.0.1:{ports['admin']}"),
            ],
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            return trio.run(drive, args, ports, tproxy.pid)
        finally:
            for process in (tproxy, upstream):
                process.terminate()
            tproxy.wait(timeout=30)
            upstream.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--megabytes", type=int, default=24, help="length of the stream")
    parser.add_argument("--join-every", type=float, default=0.25, help="seconds between joins")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the clients hang on")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after they close")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.megabytes)
        return
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
