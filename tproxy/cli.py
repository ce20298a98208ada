"""The ``tproxy`` command: parse arguments, load settings, hand over. No business logic here.

Exit codes: 0 success, 1 a runtime failure (the store or an upstream key unusable), 2 bad usage or
bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
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
from tproxy.core.errors import ConfigError, TproxyError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
        "--admin-listen", metavar="HOST:PORT", help="admin address (/healthz, /readyz)"
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
    if args.command == "cache":
        return run_cache_command(args, default_cache_dir())
    parser.print_help()
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    overrides = Overrides(
        listen=args.listen,
        upstream=args.upstream,
        cache_dir=args.cache_dir,
        admin_listen=args.admin_listen,
    )
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as error:
        for problem in error.problems:
            print(f"tproxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log)
    from tproxy.server import run_until_signalled

    try:
        trio.run(run_until_signalled, settings)
    except TproxyError as error:
        logging.getLogger("tproxy").error("%s", error)
        return EXIT_FAILURE
    return EXIT_OK


def _check_config(path: Path) -> int:
    problems = check_config(path)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors and journald's JSON export expect."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"))


def configure_logging(settings: LogSettings) -> None:
    """Console lines on a terminal, JSON lines otherwise (``log.format`` decides)."""
    handler = logging.StreamHandler(sys.stderr)
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)-7s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
