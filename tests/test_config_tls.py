"""TLS settings in the file: what check-config and serve say about certificates and keys.

Every problem names the setting whose file is at fault; unsafe but allowed settings earn a
warning, never silence.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme

from tests.tlsfiles import write_ca, write_pair
from tproxy.cli import main
from tproxy.config import ConfigCheck, ListenerTLS, check_config, load_settings
from tproxy.config.schema import AdminSettings, ListenerKeys, ServerSettings, key_checks

UPSTREAM = '[upstreams.local]\nurl = "https://127.0.0.1:8443"\n'
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def check(text: str) -> ConfigCheck:
    path = Path("x.toml")
    path.write_text(text)
    return check_config(path)


def test_a_listener_with_a_good_pair_serves_https(ca: trustme.CA) -> None:
    write_pair(ca.issue_cert("localhost"), Path("tls"))
    path = Path("x.toml")
    path.write_text(UPSTREAM + '[server]\ntls_cert = "tls/server.pem"\ntls_key = "tls/server.key"')
    settings = load_settings(path)
    assert settings.server.tls == ListenerTLS(
        Path("tls/server.pem").absolute(), Path("tls/server.key").absolute(), None
    )
    assert settings.admin.tls is None


@pytest.mark.parametrize("table", ["server", "admin"])
def test_a_certificate_needs_its_key_and_the_reverse(table: str) -> None:
    assert check(UPSTREAM + f'[{table}]\ntls_cert = "c.pem"\n').problems == [
        f"x.toml: {table}.tls_key: required: tls_cert and tls_key are set together"
    ]
    assert check(UPSTREAM + f'[{table}]\ntls_key = "k.pem"\n').problems == [
        f"x.toml: {table}.tls_cert: required: tls_cert and tls_key are set together"
    ]
    assert check(UPSTREAM + f'[{table}]\ntls_client_ca = "ca.pem"\n').problems == [
        f"x.toml: {table}.tls_client_ca: requires tls_cert and tls_key (HTTPS)"
    ]


@pytest.mark.parametrize("cls", [ServerSettings, AdminSettings])
def test_both_listeners_take_their_tls_keys_from_one_statement(cls: type[ListenerKeys]) -> None:
    """A listener TLS key added to ListenerKeys is a key of [server] and of [admin], listed
    after each table's own keys."""
    listener = key_checks(ListenerKeys)
    assert list(listener) == ["tls_cert", "tls_key", "tls_client_ca"]
    keys = key_checks(cls)
    assert list(keys)[-len(listener) :] == list(listener)
    assert all(keys[name] is checker for name, checker in listener.items())


@pytest.mark.parametrize(
    ("table", "known"),
    [
        ("server", "workers, tls_cert, tls_key, tls_client_ca"),
        ("admin", "token_env, tls_cert, tls_key, tls_client_ca"),
    ],
)
def test_an_unknown_listener_key_lists_the_tls_keys_last(table: str, known: str) -> None:
    assert check(UPSTREAM + f'[{table}]\ntls_crt = "c.pem"\n').problems == [
        f'x.toml: {table}.tls_crt: unknown key (did you mean "tls_cert"?)'
    ]
    (problem,) = check(UPSTREAM + f"[{table}]\nzzz = 1\n").problems
    assert problem.startswith(f"x.toml: {table}.zzz: unknown key (known keys: ")
    assert problem.endswith(f"{known})")


def test_every_problem_with_the_files_is_named_at_once(ca: trustme.CA) -> None:
    expired = ca.issue_cert(
        "localhost",
        not_before=NOW - datetime.timedelta(days=9),
        not_after=NOW - datetime.timedelta(days=2),
    )
    cert, key = write_pair(expired, Path("tls"))
    key.chmod(0o644)
    found = check(
        UPSTREAM + f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        '[admin]\ntls_cert = "absent.pem"\ntls_key = "absent.key"\n'
    ).problems
    assert len(found) == 4
    assert found[0].startswith("x.toml: server.tls_key: the key ")
    assert "chmod 600" in found[0]
    assert found[1].startswith("x.toml: server.tls_cert: ")
    assert "expired on" in found[1]
    assert found[2].startswith("x.toml: admin.tls_key: cannot read the key ")
    assert found[3].startswith("x.toml: admin.tls_cert: cannot read the certificate ")


def test_a_key_that_is_not_the_certificates_is_named(ca: trustme.CA) -> None:
    cert, _ = write_pair(ca.issue_cert("localhost"), Path("tls"), "one")
    _, key = write_pair(ca.issue_cert("localhost"), Path("tls"), "two")
    [problem] = check(UPSTREAM + f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n').problems
    assert problem.startswith("x.toml: server.tls_key: ")
    assert "does not belong to" in problem


def test_upstream_tls_settings_apply_to_https_upstreams_only() -> None:
    text = '[upstreams.plain]\nurl = "http://127.0.0.1:8081"\nca_file = "ca.pem"\nverify = false\n'
    assert check(text).problems == [
        "x.toml: upstreams.plain.ca_file: applies to https:// upstreams only"
        " (http://127.0.0.1:8081)",
        "x.toml: upstreams.plain.verify: applies to https:// upstreams only"
        " (http://127.0.0.1:8081)",
    ]


def test_an_upstream_client_key_needs_its_certificate(ca: trustme.CA) -> None:
    _, key = write_pair(ca.issue_cert("tproxy"), Path("tls"), "client")
    assert check(UPSTREAM + f'client_key = "{key}"\n').problems == [
        "x.toml: upstreams.local.client_key: requires client_cert"
    ]


def test_an_upstream_ca_file_and_client_certificate_are_checked(ca: trustme.CA) -> None:
    bundle = write_ca(ca, Path("tls/ca.pem"))
    cert, key = write_pair(ca.issue_cert("tproxy"), Path("tls"), "client")
    good = UPSTREAM + f'ca_file = "{bundle}"\nclient_cert = "{cert}"\nclient_key = "{key}"\n'
    assert check(good) == ConfigCheck([], [])
    bad = UPSTREAM + 'ca_file = "tls/none.pem"\nclient_cert = "tls/none.pem"\n'
    problems = check(bad).problems
    assert [problem.split(": ")[1] for problem in problems] == [
        "upstreams.local.ca_file",
        "upstreams.local.client_cert",
        "upstreams.local.client_cert",
    ]


def test_verify_false_is_allowed_with_a_warning_from_check_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Path("x.toml").write_text(UPSTREAM + "verify = false\n")
    assert main(["check-config", "x.toml"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "x.toml: ok\n"
    assert captured.err.startswith("warning: upstreams.local.verify = false: ")
    assert "read and change its answers" in captured.err


def test_a_shared_store_ca_file_is_checked(ca: trustme.CA) -> None:
    bundle = write_ca(ca, Path("tls/ca.pem"))
    shared = '[shared_store]\nurl = "rediss://127.0.0.1:6380/0"\n'
    assert check(UPSTREAM + shared + f'ca_file = "{bundle}"\n').problems == []
    [problem] = check(UPSTREAM + shared + 'ca_file = "tls/absent.pem"\n').problems
    assert problem.startswith("x.toml: shared_store.ca_file: cannot read the certificate ")
