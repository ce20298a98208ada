"""A command the benchmarks need, found on PATH or installed from Debian's packages.

Benchmarks run on demand, on machines set up by hand or fresh: when a tool such as nginx or wrk
is missing and this runs as root with ``apt-get``, it is installed; otherwise the caller skips
what needs it and says why. Nothing here raises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

APT_TIMEOUT = 300.0  # seconds for one apt-get call: a slow mirror must not hang the run
SBIN = "/usr/sbin:/usr/local/sbin"


@dataclass(frozen=True, slots=True)
class Found:
    """The binary to run (None: skip what needs it) and what the report says of it."""

    binary: str | None
    note: str


def on_path(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path=SBIN)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=APT_TIMEOUT,
        check=False,
    )


def find_or_install(
    command: str, packages: tuple[str, ...], version: Callable[[str], str]
) -> Found:
    """``command`` from PATH, else from the first of ``packages`` that installs.

    ``version(binary)`` says which version it is: each tool prints it its own way.
    """
    binary = on_path(command)
    if binary is not None:
        return Found(binary, f"{command}: {version(binary)} ({binary})")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return Found(None, f"{command}: not installed, and installing needs root and apt-get")
    print(f"bench: {command} not found, installing it from Debian's packages", flush=True)
    failure = ""
    try:
        for update_first in (False, True):  # a fresh machine may have no package lists yet
            if update_first:
                _apt("update")
            for package in packages:
                done = _apt("install", "-y", "--no-install-recommends", package)
                binary = on_path(command)
                if done.returncode == 0 and binary is not None:
                    installed = f"installed by this run (Debian's {package})"
                    return Found(binary, f"{command}: {version(binary)}, {installed}")
                failure = (done.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = str(error)
    return Found(None, f"{command}: could not be installed ({failure}); what needs it is skipped")
