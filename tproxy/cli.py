"""The ``tproxy`` command: parse arguments, load settings, hand over. No business logic here.

Exit codes: 0 success (a drained or interrupted ``serve`` included), 1 a runtime failure (the
store or an upstream key unusable, an address already in use), 2 bad usage or bad configuration,
130 interrupted before the server could take over the signals.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from tproxy import __version__
from tproxy.cache_commands import add_cache_parser, run_cache_command
from tproxy.config import (
    LogSettings,
    Overrides,
    check_config,
    default_cache_dir,
    load_settings,
)
from tproxy.core.errors import ConfigError, TproxyError, leaf_errors

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("tproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tproxy",
        description="A streaming-aware caching reverse proxy for LLM and inference APIs.",
    )
    parser.add_argument("--version", action="version", version=f"tproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of one or more upstreams",
        description=("Run the proxy. Flags override the settings file."),
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="proxy address (127.0.0.1:8080)")
    serve.add_argument("--upstream", metavar="URL", help="the one upstream to forward to")
    serve.add_argument("--cache-dir", type=Path, metavar="DIR", help="LMDB cache directory")
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin address (/healthz, /readyz, /metrics, /inflight)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help='processes serving on the listen address: a number, or "auto": one per core',
    )
    # A worker started by the supervisor (tproxy.workers): its settings come on stdin.
    serve.add_argument("--worker", type=int, metavar="I", help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo",
        help="see the point in ten seconds: a demo model, tproxy, the same request twice",
        description=(
            "Start a paced demo model and tproxy in front of it on loopback ports, send the same "
            "streamed request twice, and show the time to the first token and the Cache-Status "
            "of the miss and the hit. Needs no model server and no network."
        ),
    )
    demo.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="keep the store in DIR (default: a temporary directory, removed at the end)",
    )
    demo.add_argument(
        "--token-delay",
        type=_positive_seconds,
        metavar="SECONDS",
        help="the demo model's pause between two tokens (default: 0.03, a brisk model)",
    )

    check = commands.add_parser(
        "check-config", help="validate a settings file and report every problem in it"
    )
    check.add_argument("file", type=Path, metavar="FILE")

    add_cache_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tproxy`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "demo":
        return _demo(args.cache_dir, args.token_delay)
    if args.command == "cache":
        return run_cache_command(args, default_cache_dir())
    parser.print_help()
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    if args.worker is not None:
        return _serve_worker(args.worker)
    overrides = Overrides(
        listen=args.listen,
        upstream=args.upstream,
        cache_dir=args.cache_dir,
        admin_listen=args.admin_listen,
        workers=args.workers,
    )
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as error:
        for problem in error.problems:
            print(f"tproxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log)
    for warning in settings.warnings:
        log.warning("%s", warning)
    from tproxy.workers import serve

    return _run(lambda: trio.run(serve, settings), "tproxy cannot serve: %s")


def _serve_worker(number: int) -> int:
    """One of ``tproxy serve --workers N``'s processes, on the settings its supervisor sent."""
    from tproxy.workers import read_settings, run_worker

    settings = read_settings(sys.stdin.buffer)
    configure_logging(settings.log, worker=number)
    return _run(lambda: trio.run(run_worker, settings), "tproxy worker cannot serve: %s")


def _run(action: Callable[[], object], failure: str) -> int:
    """Run ``action``; log each runtime failure it raises (Trio groups them) and return 1."""
    outcome = EXIT_OK
    try:
        action()
    except* (TproxyError, OSError) as group:
        for problem in leaf_errors(group):
            log.error(failure, problem)
        outcome = EXIT_FAILURE
    except* KeyboardInterrupt:
        outcome = EXIT_INTERRUPTED
    return outcome


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 10:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 10, got {text!r}")
    return value


def _demo(cache_dir: Path | None, token_delay: float | None) -> int:
    configure_logging(LogSettings(level="warning", format="console"))
    from tproxy.demo import TOKEN_DELAY, demo

    delay = TOKEN_DELAY if token_delay is None else token_delay
    shown = False

    def run() -> None:
        nonlocal shown
        shown = demo(sys.stdout, cache_dir, token_delay=delay)

    outcome = _run(run, "tproxy demo failed: %s")
    return EXIT_FAILURE if outcome == EXIT_OK and not shown else outcome


def _check_config(path: Path) -> int:
    """Print every problem of the file (exit 2), or its warnings, "ok" and its notes."""
    checked = check_config(path)
    for problem in checked.problems:
        print(problem, file=sys.stderr)
    if checked.problems:
        return EXIT_USAGE
    for warning in checked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok")
    for note in checked.notes:
        print(f"note: {note}")
    return EXIT_OK


def configure_logging(settings: LogSettings, *, worker: int | None = None) -> None:
    """Console lines on a terminal, JSON lines otherwise (``log.format`` decides); a worker's
    lines carry its number."""
    from tproxy.telemetry import log_formatter  # not at the top: keeps --version quick

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(settings, terminal=sys.stderr.isatty(), worker=worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
