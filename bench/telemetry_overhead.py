"""Does the payload log cost a client anything? Issue 5's side-by-side benchmark.

    .venv/bin/python bench/telemetry_overhead.py           # 3 rounds, about 4 minutes
    .venv/bin/python bench/telemetry_overhead.py --quick   # 1 short round: a smoke test

It starts the benchmark upstream and four tproxy processes with the cache off, which differ only
in their payload log: (a) off, the baseline; (b) POSTing to an HTTP sink that takes 5 s to answer
each POST (served by this script, ``--slow-sink-port``); (c) POSTing to a port that refuses
connections; (d) writing a JSON-lines file. Paced streams (50 events 10 ms apart) are measured
at 1 client and at 8 concurrent clients against each configuration in turn, round after round,
so drift of the machine lands on all of them alike. Every figure of (b), (c) and (d) is divided
by the baseline's in the same round before the median over the rounds is taken.

The payload sinks get a small queue (``QUEUE_SIZE``) so that the slow and the down sink fall
behind within seconds: the streams measured then run while records are being dropped, which is
the path issue 5 asks about. After each measurement the configuration's ``/metrics`` is read,
and its sinks' written and dropped counters go into the report.

The load is ``load.py``'s; the server plumbing and the table helpers are ``run.py``'s. The
analysis section of the report (between the ``analysis`` markers) is written by hand and kept
when the file is regenerated.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from pathlib import Path

import trio
from load import LoadPool, LoadStuckError, Measurement, Mode, percentile
from prometheus_client.parser import text_string_to_metric_families
from run import (
    BENCH,
    ROOT,
    BenchError,
    Server,
    Servers,
    analysis_section,
    cpu_in_window,
    fmt_load,
    free_ports,
    git_revision,
    healthy,
    machine,
    port_open,
    post,
    python_as_invoked,
    ratio,
    spread,
    table,
    tproxy_command,
    wait_until,
)
from upstream import EVENTS

sys.path.insert(0, str(ROOT))  # for the fakes' HTTP/1.1 peer (tests/h11peer.py)

from tests.h11peer import Peer, SeenRequest, connection_handler

DEFAULT_OUT = ROOT / "docs" / "benchmarks-telemetry.md"
SINK_DELAY = 5.0  # seconds the slow sink takes to answer each POST
INTERVAL_MS = 10.0
QUEUE_SIZE = 16  # per payload sink: small, so that a stalled sink drops within seconds
BATCH_SIZE = 4


# --- the slow sink: a trio + h11 server that reads a POST, then waits before answering 200 -----


async def _slow_answer(delay: float, peer: Peer, request: SeenRequest) -> None:
    """Wait ``delay``, then answer 200 and close (tproxy sends one request per connection)."""
    await trio.sleep(delay)
    await peer.respond(200, [(b"content-length", b"0"), (b"connection", b"close")])


def serve_slow_sink(port: int, delay: float) -> None:
    handler = connection_handler(partial(_slow_answer, delay), keep_alive=False)
    trio.run(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))


# --- what is measured ------------------------------------------------------------------------


class Config(Enum):
    """The tproxy configurations, in the order they are measured within a round."""

    OFF = "(a) payload log off"
    SLOW = "(b) HTTP sink, 5 s per POST"
    DOWN = "(c) HTTP sink down"
    FILE = "(d) JSON-lines file"


@dataclass(frozen=True, slots=True)
class Test:
    key: str
    connections: int
    duration: float


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    warmup: float
    tests: tuple[Test, ...]


def make_plan(quick: bool, rounds: int | None) -> Plan:
    one, eight = (3.0, 2.0) if quick else (12.0, 5.0)
    stream_seconds = EVENTS * INTERVAL_MS / 1000
    return Plan(
        rounds=rounds or (1 if quick else 3),
        warmup=stream_seconds,  # the connections' first requests are spread over one stream
        tests=(Test("paced-1", 1, one), Test("paced-8", 8, eight)),
    )


@dataclass(frozen=True, slots=True)
class Counters:
    """A configuration's telemetry counters, read from its ``/metrics``."""

    requests: int  # tproxy_requests_total, every label summed
    written: dict[str, int]  # sink -> records
    dropped: dict[tuple[str, str], int]  # (sink, reason) -> records
    queued: dict[str, int]  # sink -> records waiting


@dataclass(frozen=True, slots=True)
class Sample:
    measurement: Measurement
    server_cpu_seconds: float  # of the tproxy process, inside the measured window
    counters: Counters  # read right after the measurement


@dataclass(frozen=True, slots=True)
class Target:
    config: Config
    url: str
    admin_port: int
    server: Server


Results = dict[str, dict[Config, list[Sample]]]  # test key -> config -> one per round


def config_text(config: Config, sink_port: int, down_port: int, workdir: Path) -> str:
    text = "[cache]\nenabled = false\n"
    if config is Config.OFF:
        return text
    text += (
        f"\n[payload_log]\nenabled = true\nqueue_size = {QUEUE_SIZE}\nbatch_size = {BATCH_SIZE}\n"
    )
    if config is Config.SLOW:
        return text + f'http_url = "http://127.0.0.1:{sink_port}/events"\n'
    if config is Config.DOWN:
        return text + f'http_url = "http://127.0.0.1:{down_port}/events"\n'
    return text + f'file = "{workdir / "payloads" / "payloads.jsonl"}"\n'


def start_targets(servers: Servers) -> list[Target]:
    up, sink, down, *ports = free_ports(3 + 2 * len(Config))
    upstream_url = f"http://127.0.0.1:{up}"
    upstream = servers.start(
        "upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(up)]
    )
    wait_until(lambda: port_open(up), upstream)
    slow = servers.start(
        "slow sink", [sys.executable, str(Path(__file__).resolve()), "--slow-sink-port", str(sink)]
    )
    wait_until(lambda: port_open(sink), slow)
    if port_open(down):
        raise BenchError(f"port {down}, meant to refuse connections, accepts them")
    targets = []
    for number, config in enumerate(Config):
        port, admin = ports[2 * number], ports[2 * number + 1]
        slug = config.name.lower()
        path = servers.workdir / f"tproxy-{slug}.toml"
        path.write_text(config_text(config, sink, down, servers.workdir))
        server = servers.start(
            f"tproxy {slug}",
            [
                *tproxy_command(),
                "serve",
                "--workers",
                "1",
                "--config",
                str(path),
                "--upstream",
                upstream_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--cache-dir",
                str(servers.workdir / f"store-{slug}"),
            ],
        )
        wait_until(partial(healthy, admin), server)
        status, _, body = post(port, Mode.PACED, INTERVAL_MS)
        if status != 200 or not body.endswith(b"data: [DONE]\n\n"):
            raise BenchError(f"{config.value}: a paced stream answered {status}: {body[:200]!r}")
        targets.append(Target(config, f"http://127.0.0.1:{port}", admin, server))
    return targets


def read_counters(admin_port: int) -> Counters:
    """The request and sink counters of one tproxy, parsed with prometheus-client's parser."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
    except OSError as error:
        raise BenchError(f"/metrics on port {admin_port}: {error}") from error
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"/metrics on port {admin_port} answered {response.status}")
    requests = 0
    written: dict[str, int] = {}
    dropped: dict[tuple[str, str], int] = {}
    queued: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            if sample.name == "tproxy_requests_total":
                requests += value
            elif sample.name == "tproxy_log_records_written_total":
                written[labels["sink"]] = value
            elif sample.name == "tproxy_log_records_dropped_total":
                dropped[labels["sink"], labels["reason"]] = value
            elif sample.name == "tproxy_log_queue_records":
                queued[labels["sink"]] = value
    return Counters(requests, written, dropped, queued)


def run_rounds(pool: LoadPool, targets: list[Target], plan: Plan) -> Results:
    results: Results = {t.key: {} for t in plan.tests}
    for number in range(1, plan.rounds + 1):
        for test in plan.tests:
            for target in targets:
                target.server.check_alive()
                running = pool.start(
                    target.url,
                    Mode.PACED,
                    test.connections,
                    duration=test.duration,
                    warmup=plan.warmup,
                    interval_ms=INTERVAL_MS,
                    stagger=plan.warmup,
                )
                cpu = cpu_in_window(target.server.cpu_seconds, running.window)
                measurement = running.wait()
                counters = read_counters(target.admin_port)
                results[test.key].setdefault(target.config, []).append(
                    Sample(measurement, cpu, counters)
                )
                errors = f" errors {measurement.errors}" if measurement.errors else ""
                print(
                    f"round {number}/{plan.rounds} {test.key} {target.config.value:<28}"
                    f" ttfb p50 {percentile(measurement.ttfbs, 0.5):6.2f} ms"
                    f" delay p99 {percentile(measurement.event_delays, 0.99):6.2f} ms"
                    f" dropped {sum(counters.dropped.values())}{errors}",
                    flush=True,
                )
    return results


# --- the report ------------------------------------------------------------------------------

FIGURES = (
    ("TTFB p50", "ttfbs", 0.5),
    ("TTFB p99", "ttfbs", 0.99),
    ("event delay p50", "event_delays", 0.5),
    ("event delay p99", "event_delays", 0.99),
)


def figure(sample: Sample, samples: str, q: float) -> float:
    values: list[int] = getattr(sample.measurement, samples)
    return percentile(values, q)


def values_of(results: Results, key: str, config: Config, samples: str, q: float) -> list[float]:
    return [figure(s, samples, q) for s in results[key].get(config, [])]


def ratios_of(results: Results, key: str, config: Config, samples: str, q: float) -> list[float]:
    mine = values_of(results, key, config, samples, q)
    base = values_of(results, key, Config.OFF, samples, q)
    return [ratio(a, b) for a, b in zip(mine, base, strict=False)]


def cpu_per_stream_us(sample: Sample) -> float:
    completed = sample.measurement.completed
    return sample.server_cpu_seconds / completed * 1e6 if completed else float("nan")


def latency_section(results: Results, test: Test) -> list[str]:
    rows = []
    for config in Config:
        samples = results[test.key].get(config, [])
        rows.append(
            [
                config.value,
                *(spread(values_of(results, test.key, config, s, q), 2) for _, s, q in FIGURES),
                spread([float(len(x.measurement.ttfbs)) for x in samples], 0),
                spread([float(len(x.measurement.event_delays)) for x in samples], 0),
            ]
        )
    header = ["configuration", *(f"{label}, ms" for label, _, _ in FIGURES)]
    out = table([*header, "streams", "events"], rows)
    out += ["", "Ratio to (a) in the same round:", ""]
    rows = [
        [
            config.value,
            *(spread(ratios_of(results, test.key, config, s, q), 2, "×") for _, s, q in FIGURES),
        ]
        for config in Config
        if config is not Config.OFF
    ]
    return out + table(["configuration", *(label for label, _, _ in FIGURES)], rows)


def counters_section(results: Results, plan: Plan) -> list[str]:
    rows = []
    for config in Config:
        for number in range(plan.rounds):
            for test in plan.tests:
                samples = results[test.key].get(config, [])
                if number >= len(samples):
                    continue
                c = samples[number].counters
                sinks = sorted(s for s in c.written if s != "access")
                dropped = {
                    sink: ", ".join(
                        f"{reason} {count}"
                        for (name, reason), count in sorted(c.dropped.items())
                        if name == sink and count
                    )
                    or "0"
                    for sink in sinks
                }
                rows.append(
                    [
                        config.value,
                        f"{number + 1}, after {test.key}",
                        str(c.requests),
                        "; ".join(f"{s}: {c.written[s]}" for s in sinks) or "—",
                        "; ".join(f"{s}: {dropped[s]}" for s in sinks) or "—",
                        "; ".join(f"{s}: {c.queued.get(s, 0)}" for s in sinks) or "—",
                        str(c.written.get("access", 0)),
                    ]
                )
    header = [
        "configuration",
        "round",
        "requests",
        "payload written",
        "payload dropped",
        "queued",
        "access lines written",
    ]
    return table(header, rows)


def render(
    results: Results, plan: Plan, stamp: str, command: str, facts: dict[str, str], previous: str
) -> str:
    one, eight = plan.tests
    out = [
        "# Benchmark: what the payload log costs a client",
        "",
        f"Generated by `bench/telemetry_overhead.py` on {stamp} in {facts['minutes']} minutes "
        "(issue 5). Everything but the analysis section is rewritten by each run; "
        "`bench/README.md` says how it is measured.",
        "",
        f"Command: `{command}`",
        "",
        "## Machine and method",
        "",
        *machine(facts["revision"]),
        f"- Load average (1, 5, 15 min) before the run: {facts['load_before']}; after it: "
        f"{facts['load_after']}. Other work on the machine competes with every configuration "
        "alike (interleaved rounds), but widens the ranges.",
        f"- Four tproxy processes, `[cache] enabled = false`, default settings otherwise "
        "(access log on, to a file), differing only in `[payload_log]`: (a) off; (b) `http_url` "
        f"to a trio + h11 server that reads each POST and waits {SINK_DELAY:g} s before "
        "answering 200; (c) `http_url` to a port that refuses connections (3 retries, backoff "
        f"from 1 s: the defaults); (d) `file` in a temporary directory. (b)–(d) use "
        f"`queue_size = {QUEUE_SIZE}` and `batch_size = {BATCH_SIZE}` so that the slow and the "
        "down sink fall behind within seconds and the streams are measured while records are "
        "dropped; with the defaults (256, 64) they would absorb this benchmark's few records "
        "per second and never drop.",
        f"- Paced streams through `bench/upstream.py`: {EVENTS} events {INTERVAL_MS:g} ms apart "
        f"(`x-bench-interval-ms`), at 1 client for {one.duration:g} s and at 8 concurrent "
        f"clients for {eight.duration:g} s, each after a warm-up of one stream's length "
        f"({plan.warmup:g} s) over which the clients' first requests are spread. {plan.rounds} "
        "round(s); in each, every measurement runs against (a), (b), (c), (d) in turn.",
        "- TTFB: request written → first event read. Event delay: the client's receive time "
        'minus the `"t"` the upstream wrote into the event, for every event. Cells are the '
        "median over the rounds, the range in parentheses; ratios are taken within a round, "
        "then summarised. At 1 client a round holds only ~20 streams, so its TTFB p99 is the "
        "slowest one.",
        "",
        "## 1 client",
        "",
        *latency_section(results, one),
        "",
        "## 8 concurrent clients",
        "",
        *latency_section(results, eight),
        "",
        "## tproxy CPU per stream",
        "",
        "CPU time of the tproxy process inside the measured window divided by the streams "
        "completed in it, in microseconds: what building and handing off the payload records "
        "costs, on the event loop and in worker threads together.",
        "",
    ]
    rows = [
        [
            config.value,
            *(
                spread([cpu_per_stream_us(s) for s in results[t.key].get(config, [])], 0)
                for t in plan.tests
            ),
        ]
        for config in Config
    ]
    out += table(["configuration", "1 client", "8 clients"], rows)
    out += [
        "",
        "## Payload sink counters",
        "",
        "Read from each configuration's `/metrics` right after each of its measurements "
        "(cumulative since the process started; the check request at start is included). "
        "`tproxy_log_records_written_total` and `tproxy_log_records_dropped_total` by sink "
        "(`http`, `file`) and reason; `queued` is `tproxy_log_queue_records`.",
        "",
        *counters_section(results, plan),
    ]
    errors = [
        f"- {test.key}, {config.value}, round {number}: {sample.measurement.errors}"
        for test in plan.tests
        for config in Config
        for number, sample in enumerate(results[test.key].get(config, []), start=1)
        if sample.measurement.errors
    ]
    out += ["", "## Errors", ""]
    out += errors or ["No request failed, timed out or got a status other than 200."]
    out += analysis_section(previous, stamp)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure the payload log's cost to clients.")
    parser.add_argument("--quick", action="store_true", help="one short round (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown file to write")
    parser.add_argument(
        "--processes",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="load generator processes (default: nproc)",
    )
    parser.add_argument("--slow-sink-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slow_sink_port is not None:
        serve_slow_sink(args.slow_sink_port, SINK_DELAY)
        return 0
    plan = make_plan(args.quick, args.rounds)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = fmt_load(os.getloadavg())
    revision = git_revision()
    pool = LoadPool(args.processes)
    with tempfile.TemporaryDirectory(prefix="tproxy-bench-telemetry-") as workdir:
        servers = Servers(Path(workdir))
        try:
            targets = start_targets(servers)
            results = run_rounds(pool, targets, plan)
        except (BenchError, LoadStuckError) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        finally:
            pool.close()
            servers.stop_all()
    facts = {
        "revision": revision,
        "load_before": load_before,
        "load_after": fmt_load(os.getloadavg()),
        "minutes": f"{(time.monotonic() - started) / 60:.1f}",
    }
    command = " ".join([python_as_invoked(), "bench/telemetry_overhead.py", *sys.argv[1:]])
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(render(results, plan, stamp, command, facts, previous))
    print(f"wrote {args.out} ({facts['minutes']} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
