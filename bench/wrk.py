"""wrk, the C load generator, for measurements where the load must cost the machine little.

Python's load generator (``load.py``) spends about as much CPU per request as the proxy it
loads; on a 2-core machine that leaves the proxy one core whatever it could use. wrk spends a
small fraction of that, so what two tproxy workers do with two cores becomes measurable.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import debian
from load import Mode, request_body

PACKAGES = ("wrk",)
OVERRUN = 30.0  # seconds past its duration before a wrk run counts as stuck


@dataclass(frozen=True, slots=True)
class Result:
    rate: float  # answers per second over the run
    completed: int
    errors: int  # socket errors, timeouts and answers other than 2xx or 3xx


def _version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split(" [", 1)[0].removeprefix("wrk ").strip()


def find_or_install() -> debian.Found:
    return debian.find_or_install("wrk", PACKAGES, _version)


def post_script(directory: Path, mode: Mode) -> Path:
    """The Lua script that makes every wrk request the load's POST of ``mode``."""
    body = request_body(mode).decode()
    script = directory / f"post-{mode.value}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def run(binary: str, url: str, script: Path, connections: int, duration: float) -> Result:
    """One wrk run of ``duration`` seconds on one thread with ``connections`` connections."""
    done = subprocess.run(
        [binary, "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=duration + OVERRUN,
        check=True,
    )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    completed = re.search(r"(\d+) requests in", done.stdout)
    if rate is None or completed is None:
        raise RuntimeError(f"wrk printed no rate: {done.stdout!r}")
    socket_errors = re.search(r"Socket errors: (.*)", done.stdout)
    errors = sum(map(int, re.findall(r"\d+", socket_errors[1]))) if socket_errors else 0
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    errors += int(refused[1]) if refused else 0
    return Result(float(rate[1]), int(completed[1]), errors)
