"""A real redis-server for tests, on a free loopback port, started and stopped by the test.

Debian's ``redis-server`` (``.ci/run`` installs it when missing); nothing is saved to disk
(``--save ''``, no AOF). Faults are injected for real: :meth:`RedisServer.kill`,
:meth:`~RedisServer.pause` (SIGSTOP) and :meth:`~RedisServer.resume`, and commands such as
``DEBUG SLEEP`` or ``CONFIG SET maxmemory`` sent with :meth:`~RedisServer.command`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
READY = "Ready to accept connections"
# Seconds a PING may go unanswered before a stall is taken as begun.
STALL_PROBE = 0.3

# Skipped where redis-server is missing, unless TPROXY_REQUIRE_REDIS=1 (CI sets it, and installs
# the package) makes its absence a failure.
needs_redis = pytest.mark.skipif(
    (shutil.which("redis-server") is None or shutil.which("redis-cli") is None)
    and os.environ.get("TPROXY_REQUIRE_REDIS") != "1",
    reason="redis-server is not installed (.ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def free_cluster_port() -> int:
    """A free port P with P + 10000 free too (a cluster node's bus), so P is at most 55535."""
    for candidate in random.sample(range(20000, 55535), 200):
        try:
            with socket.socket() as client, socket.socket() as bus:
                client.bind(("127.0.0.1", candidate))
                bus.bind(("127.0.0.1", candidate + 10000))
        except OSError:
            continue
        return candidate
    raise RuntimeError("no free pair of ports for a cluster node")


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and key for 127.0.0.1, and the CA that issued them (PEM files)."""

    cert: Path
    key: Path
    ca: Path

    @property
    def server_options(self) -> tuple[str, ...]:
        """TLS only, clients not asked for a certificate, the cluster bus over TLS too."""
        return (
            *("--port", "0", "--tls-auth-clients", "no", "--tls-cluster", "yes"),
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca)),
        )


class RedisServer:
    """One redis-server process on 127.0.0.1; :meth:`start` again after :meth:`kill` restarts
    it on the same port, empty. With ``tls``, its port is a TLS port and nothing is in the
    clear."""

    def __init__(
        self, directory: Path, port: int | None = None, tls: TlsFiles | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.directory = directory
        self.tls = tls
        # how redis-cli reaches it, and what the server is started with for TLS
        self.cli_options: tuple[str, ...] = ()
        self._tls_options: tuple[str, ...] = ()
        if tls is not None:
            self.cli_options = ("--tls", "--cacert", str(tls.ca))
            self._tls_options = ("--tls-port", str(self.port), *tls.server_options)
        self._process: subprocess.Popen[str] | None = None
        self._stalling: list[socket.socket] = []
        self._drain = threading.Thread()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        """Start the server and return once it accepts connections."""
        self._launch(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--enable-debug-command",
                "local",
                *self._tls_options,
                *extra,
            ],
            READY,
        )

    def _launch(self, command: list[str], ready: str) -> None:
        """Run ``command`` and return once its log has a line with ``ready`` in it."""
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._process = process
        watchdog = threading.Timer(START_TIMEOUT, process.kill)
        watchdog.start()
        assert process.stdout is not None
        seen: list[str] = []
        try:
            for line in process.stdout:
                seen.append(line)
                if ready in line:
                    break
        finally:
            watchdog.cancel()
        if not seen or ready not in seen[-1]:
            process.kill()
            process.wait(10)
            process.stdout.close()
            self._process = None
            raise RuntimeError("redis-server did not start:\n" + "".join(seen))
        # Keep reading its log, so that a full pipe never blocks the server.
        self._drain = threading.Thread(target=process.stdout.read, daemon=True)
        self._drain.start()

    def command(self, *words: str) -> str:
        """Run one command with redis-cli; its reply as text."""
        done = subprocess.run(
            self.cli_command(*words),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    def cli_command(self, *words: str) -> list[str]:
        """redis-cli sending ``words`` to this server (its options first)."""
        return ["redis-cli", *self.cli_options, "-h", "127.0.0.1", "-p", str(self.port), *words]

    def put(self, key: str, value: bytes, ttl_ms: int) -> None:
        """SET a binary value (through redis-cli's stdin) with a TTL."""
        subprocess.run(
            self.cli_command("-x", "SET", key),
            input=value,
            capture_output=True,
            timeout=10,
            check=True,
        )
        self.command("PEXPIRE", key, str(ttl_ms))

    def stall(self, seconds: int) -> None:
        """``DEBUG SLEEP``: the server stops answering for ``seconds``. Returns once a fresh
        connection's PING goes unanswered, so the stall has begun."""
        sleeper = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self._stalling.append(sleeper)
        sleeper.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as probe:
            probe.settimeout(STALL_PROBE)
            probe.sendall(b"PING\r\n")
            try:
                probe.recv(16)
            except TimeoutError:
                return
        raise RuntimeError("redis-server answered PING: DEBUG SLEEP did not stall it")

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, with everything it held."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._drain.join(10)
            assert self._process.stdout is not None
            self._process.stdout.close()
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        for connection in self._stalling:
            connection.close()
        if self._process is not None:
            self.resume()
            self.kill()


CREATE_OPTIONS = ("--cluster-replicas", "0", "--cluster-yes")


class RedisCluster:
    """A Redis Cluster of three primaries (no replicas) on free loopback ports; with ``tls``,
    nothing on them, the cluster bus included, is in the clear."""

    def __init__(self, directory: Path, size: int = 3, tls: TlsFiles | None = None) -> None:
        self.nodes = [RedisServer(directory, free_cluster_port(), tls) for _ in range(size)]
        self.directory = directory

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> None:
        """Start the nodes, join them, and return once every slot is served."""
        for node in self.nodes:
            config = self.directory / f"nodes-{node.port}.conf"
            node.start("--cluster-enabled", "yes", "--cluster-config-file", str(config))
        subprocess.run(
            self.nodes[0].cli_command("--cluster", "create", *self.addresses, *CREATE_OPTIONS),
            capture_output=True,
            timeout=60,
            check=True,
        )
        # `--cluster create` returns once the nodes agree on the slots; each node then learns
        # that the cluster is up within a few of its cron ticks. No event says so: ask, bounded.
        deadline = time.monotonic() + START_TIMEOUT
        while not all("cluster_state:ok" in node.command("CLUSTER", "INFO") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinel(RedisServer):
    """One Redis Sentinel watching ``primary`` under ``name``, alone in its quorum and quick to
    act: the primary is taken as down after half a second without an answer. It speaks TLS
    when the primary does."""

    def __init__(
        self,
        directory: Path,
        primary: RedisServer,
        name: str = "tproxy",
        primary_password: str | None = None,
    ) -> None:
        super().__init__(directory, tls=primary.tls)
        self.name = name
        self._primary_port = primary.port
        self._primary_password = primary_password

    def start(self, *extra: str) -> None:
        """Start watching; returns once the sentinel monitors the primary."""
        config = self.directory / f"sentinel-{self.port}.conf"  # a sentinel rewrites its file
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self._primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 500\n"
            f"sentinel failover-timeout {self.name} 5000\n"
        )
        if self._primary_password is not None:
            with config.open("a") as appended:
                appended.write(f"sentinel auth-pass {self.name} {self._primary_password}\n")
        # With TLS, it reaches the primary over TLS too ("replication" is its word for that).
        over_tls = () if self.tls is None else (*self._tls_options, "--tls-replication", "yes")
        command = ["redis-server", str(config), "--sentinel", *over_tls, *extra]
        self._launch(command, "+monitor master")

    def primary_port(self) -> int:
        """The port of the primary as the sentinel sees it now."""
        address = self.command("SENTINEL", "get-master-addr-by-name", self.name).split()
        return int(address[1])

    def wait_for_primary(self, promoted: RedisServer, timeout: float = 30.0) -> None:
        """Return once the sentinel names ``promoted`` as the primary and ``promoted`` says it
        is one (a failover has no event a test can wait on: ask, bounded)."""
        deadline = time.monotonic() + timeout
        while (
            self.primary_port() != promoted.port or promoted.command("ROLE").split()[0] != "master"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinel did not promote the server on {promoted.port}")
            time.sleep(0.1)
