"""The ``tproxy`` command line: what each command prints and the exit codes it promises."""

from __future__ import annotations

import gc
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy import __version__
from tproxy.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "conf" / "tproxy.toml"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """``serve`` configures the root logger for the process; give the next test its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == EXIT_OK
    assert capsys.readouterr().out == f"tproxy {__version__}\n"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == EXIT_OK
    out = capsys.readouterr().out
    for command in ("serve", "demo", "check-config", "cache"):
        assert command in out


def test_python_dash_m_tproxy_is_the_same_command() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "tproxy", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert finished.returncode == EXIT_OK
    assert finished.stdout == f"tproxy {__version__}\n"


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "usage: tproxy" in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serv"])
    assert exited.value.code == EXIT_USAGE
    assert "invalid choice: 'serv'" in capsys.readouterr().err


def test_check_config_accepts_the_example_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == f"{EXAMPLE}: ok\n"
    assert captured.err == ""


def test_check_config_says_a_path_of_no_known_family_is_cached_only_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text(
        '[cache]\npaths = ["/v1/messages", "/v2/generate"]\n\n'
        '[upstreams.local]\nurl = "http://127.0.0.1:8000"\n'
    )
    assert main(["check-config", str(config)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{config}: ok"
    assert len(lines) == 2
    assert "/v2/generate" in lines[1]
    assert "only as whole JSON" in lines[1]


def test_check_config_reports_every_problem_on_stderr_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text(
        '[server]\ngraceful_timeout = -1\nlisten = "nowhere"\n\n'
        '[upstreams.local]\nurl = "http://127.0.0.1:8000"\nconect_timeout = 5\n'
    )
    assert main(["check-config", str(config)]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    problems = captured.err.splitlines()
    assert len(problems) == 3
    assert all(problem.startswith(f"{config}: ") for problem in problems)
    assert any("server.graceful_timeout" in problem for problem in problems)
    assert any("server.listen" in problem for problem in problems)
    assert any('did you mean "connect_timeout"' in problem for problem in problems)


def test_check_config_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(tmp_path / "absent.toml")]) == EXIT_USAGE
    assert "absent.toml" in capsys.readouterr().err


def test_serve_with_a_bad_config_exits_2_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text("[cache]\nmax_total_bytes = 0\n")
    code = main(["serve", "--config", str(config), "--upstream", "http://127.0.0.1:1"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"tproxy: {config}: cache.max_total_bytes: ")


def test_serve_with_a_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--upstream", "ftp://example.test", "--listen", "8080"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--upstream: " in err
    assert "--listen: " in err


def test_serve_on_an_address_in_use_exits_1_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                "127.0.0.1:0",
                "--cache-dir",
                str(tmp_path / "store"),
            ]
        )
    gc.collect()  # a socket whose bind failed and was left open would warn here, and fail
    assert code == EXIT_FAILURE
    assert f"cannot listen on 127.0.0.1:{port}: [Errno " in capsys.readouterr().err


def test_serve_with_a_cache_dir_that_is_a_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_directory = tmp_path / "store"
    not_a_directory.write_text("")
    code = main(
        [
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--cache-dir",
            str(not_a_directory),
        ]
    )
    assert code == EXIT_FAILURE
    assert f"cannot open the cache store at {not_a_directory}: " in capsys.readouterr().err


@pytest.mark.parametrize("delay", ["0", "-1", "soon", "11"])
def test_demo_refuses_a_token_delay_out_of_range(
    delay: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--token-delay", delay])
    assert exited.value.code == EXIT_USAGE
    assert "expected seconds between 0 and 10" in capsys.readouterr().err


def test_check_config_and_serve_refuse_an_upstream_url_ending_in_v1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text('[upstreams.local]\nurl = "http://127.0.0.1:8000/v1"\n')
    assert main(["check-config", str(config)]) == EXIT_USAGE
    [problem] = capsys.readouterr().err.splitlines()
    assert problem.startswith(f"{config}: upstreams.local.url: ends in /v1")
    assert problem.endswith('write "http://127.0.0.1:8000"')
    assert main(["serve", "--config", str(config)]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [f"tproxy: {problem}"]


def admin_endpoints() -> list[str]:
    """The endpoints of the admin listener, as docs/telemetry.md's table lists them."""
    text = (REPO / "docs" / "telemetry.md").read_text()
    section = text.partition("## The admin listener")[2].partition("\n## ")[0]
    return re.findall(r"^\| `(/\w+)` \|", section, re.M)


def test_the_admin_listen_help_and_the_example_file_name_every_admin_endpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoints = admin_endpoints()
    assert {"/healthz", "/readyz", "/metrics", "/inflight"} <= set(endpoints)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.rpartition("--admin-listen HOST:PORT")[2].split())
    example = EXAMPLE.read_text().partition("\nadmin_listen =")[0].rpartition("\nlisten =")[2]
    for endpoint in endpoints:
        assert endpoint in help_text.partition(" -")[0], endpoint
        assert endpoint in example, endpoint
