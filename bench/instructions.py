"""Instructions per answer, counted by callgrind: a repeatable A/B where CPU ratios are noise.

    .venv/bin/python bench/instructions.py                       # the working tree, paced streams
    .venv/bin/python bench/instructions.py --revision 0dea025    # tproxy at a revision
    .venv/bin/python bench/instructions.py --minimal             # bench/minimal_proxy.py
    .venv/bin/python bench/instructions.py --interval 0          # unpaced streams
    .venv/bin/python bench/instructions.py --json 100            # 100 small JSON answers

The server (tproxy cache off, ``--workers 1``, or the minimal proxy) runs under
``valgrind --tool=callgrind --instr-atstart=no``; after three warm-up answers its instrumentation
is switched on (``callgrind_control -i on``) for the counted answers, asked one at a time on one
kept-alive connection, then off, and the count dumped. Streams are paced 30 ms apart by default,
so that the slowed server still gets one event per read. The count is the process's user-space
instructions: not its system calls' kernel side, so it is not CPU time, but the same code gives
the same count within about 1 % (where ``ab.py``'s CPU ratios move by 2-4 % on a shared
machine). It needs valgrind (Debian: ``valgrind``) and takes about half a minute per run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab import export
from load import Mode, request_body
from run import BENCH, ROOT, free_ports, healthy, port_open

WARM_UP = 3


def ask(connection: http.client.HTTPConnection, mode: Mode, interval_ms: float) -> int:
    """One answer; the number of SSE frames it held (0 for JSON)."""
    headers = {"Content-Type": "application/json", "X-Bench-Interval-Ms": f"{interval_ms:g}"}
    connection.request("POST", "/v1/chat/completions", request_body(mode), headers)
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"status {response.status}: {body[:200]!r}")
    return body.count(b"\n\n") if mode is not Mode.JSON else 0


def server_command(args: argparse.Namespace, work: Path, upstream: int, port: int) -> list[str]:
    out = work / "callgrind.out"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    command += [f"--callgrind-out-file={out}", sys.executable]
    if args.minimal:
        command += [str(BENCH / "minimal_proxy.py"), "--upstream", f"http://127.0.0.1:{upstream}"]
        return [*command, "--listen", f"127.0.0.1:{port}"]
    config = work / "off.toml"
    config.write_text("[cache]\nenabled = false\n")
    command += ["-P", "-m", "tproxy", "serve", "--workers", "1", "--config", str(config)]
    command += ["--upstream", f"http://127.0.0.1:{upstream}", "--listen", f"127.0.0.1:{port}"]
    return [*command, "--admin-listen", f"127.0.0.1:{args.admin}", "--cache-dir", str(work / "s")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--revision", help="tproxy at this git revision (default: working tree)")
    parser.add_argument("--minimal", action="store_true", help="bench/minimal_proxy.py instead")
    parser.add_argument("--streams", type=int, default=8, help="streams counted")
    parser.add_argument("--interval", type=float, default=30.0, help="ms between two events")
    parser.add_argument("--json", type=int, default=0, help="count this many JSON answers instead")
    args = parser.parse_args()
    mode = Mode.JSON if args.json else Mode.PACED
    count = args.json or args.streams
    with tempfile.TemporaryDirectory(prefix="tproxy-instructions-") as tmp:
        work = Path(tmp)
        source = ROOT if args.revision is None else export(args.revision, work / "source")
        upstream, port, args.admin = free_ports(3)
        up = subprocess.Popen(
            [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with (work / "server.log").open("wb") as log:
            server = subprocess.Popen(
                server_command(args, work, upstream, port),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                env={**os.environ, "PYTHONPATH": str(source)},
            )
        try:
            deadline = time.monotonic() + 120
            while not (port_open(upstream) and port_open(port)) or not (
                args.minimal or healthy(args.admin)
            ):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "server.log").read_text())
                time.sleep(0.5)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for _ in range(WARM_UP):
                ask(connection, mode, args.interval)
            control = ["callgrind_control", "-i", "on", str(server.pid)]
            subprocess.run(control, check=True, capture_output=True)
            frames = sum(ask(connection, mode, args.interval) for _ in range(count))
            control[2] = "off"
            subprocess.run(control, check=True, capture_output=True)
            dump_now = ["callgrind_control", "-d", str(server.pid)]
            subprocess.run(dump_now, check=True, capture_output=True)
            connection.close()
            dump = (work / "callgrind.out.1").read_text(errors="replace")
            found = re.search(r"^totals: (\d+)", dump, re.MULTILINE)
            if found is None:
                raise SystemExit("no totals in callgrind's dump")
            total = int(found.group(1))
        finally:
            server.terminate()
            up.terminate()
            server.wait()
            up.wait()
    what = "minimal proxy" if args.minimal else f"tproxy {args.revision or 'working tree'}"
    line = f"{what}: {count} answers, {total:,} instructions, {total / count:,.0f} per answer"
    if frames:
        line += f", {total / frames:,.0f} per SSE frame ({frames} frames)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
