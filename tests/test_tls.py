"""Certificates and keys are checked before use, and the upstream's TLS context trusts what it
is told to: a private CA, a client certificate, or (on purpose) anything.

The CAs are made by the tests (trustme); handshakes run over loopback sockets with Trio.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme

from tests.tlsfiles import server_context, write_ca, write_pair
from tproxy.tls import (
    TLSFileError,
    check_ca_file,
    check_certificate_pair,
    read_certificate,
    reload_cert_chain,
    upstream_context,
)

NOW = datetime.datetime.now(datetime.UTC)


def problems(cert: Path, key: Path, now: datetime.datetime = NOW) -> list[tuple[str, str]]:
    return check_certificate_pair(
        cert, key, now=now, cert_setting="server.tls_cert", key_setting="server.tls_key"
    )


def test_a_good_pair_has_no_problem(tmp_path: Path) -> None:
    cert, key = write_pair(trustme.CA().issue_cert("localhost"), tmp_path)
    assert problems(cert, key) == []


def test_a_world_readable_key_is_refused_and_the_fix_is_named(tmp_path: Path) -> None:
    cert, key = write_pair(trustme.CA().issue_cert("localhost"), tmp_path)
    key.chmod(0o644)
    [(setting, reason)] = problems(cert, key)
    assert setting == "server.tls_key"
    assert "every user" in reason
    assert f"chmod 600 {key}" in reason


def test_a_key_of_another_certificate_is_reported_against_the_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, _ = write_pair(ca.issue_cert("localhost"), tmp_path, "one")
    _, other_key = write_pair(ca.issue_cert("localhost"), tmp_path, "two")
    [(setting, reason)] = problems(cert, other_key)
    assert setting == "server.tls_key"
    assert "does not belong to" in reason


def test_an_expired_certificate_says_when_it_expired(tmp_path: Path) -> None:
    expired = trustme.CA().issue_cert(
        "localhost",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    cert, key = write_pair(expired, tmp_path)
    [(setting, reason)] = problems(cert, key)
    assert setting == "server.tls_cert"
    assert "expired on" in reason


def test_a_certificate_not_yet_valid_is_reported(tmp_path: Path) -> None:
    cert, key = write_pair(trustme.CA().issue_cert("localhost"), tmp_path)
    before = read_certificate(cert).not_before - datetime.timedelta(days=1)
    [(setting, reason)] = problems(cert, key, now=before)
    assert setting == "server.tls_cert"
    assert "not valid before" in reason


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    cert, key = tmp_path / "nope.pem", tmp_path / "nope.key"
    found = dict(problems(cert, key))
    assert str(cert) in found["server.tls_cert"]
    assert str(key) in found["server.tls_key"]


def test_a_file_without_a_certificate_is_not_a_certificate(tmp_path: Path) -> None:
    _, key = write_pair(trustme.CA().issue_cert("localhost"), tmp_path)
    [(setting, reason)] = problems(key, key)
    assert setting == "server.tls_cert"
    assert "no PEM certificate" in reason


def test_a_ca_bundle_is_checked(tmp_path: Path) -> None:
    bundle = write_ca(trustme.CA(), tmp_path / "ca.pem")
    assert check_ca_file(bundle, setting="upstreams.a.ca_file") == []
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    [(setting, _)] = check_ca_file(garbage, setting="upstreams.a.ca_file")
    assert setting == "upstreams.a.ca_file"
    [(_, reason)] = check_ca_file(tmp_path / "absent.pem", setting="upstreams.a.ca_file")
    assert "cannot read" in reason


def test_read_certificate_names_the_subject_and_validity(tmp_path: Path) -> None:
    cert, _ = write_pair(trustme.CA().issue_cert("localhost"), tmp_path)
    info = read_certificate(cert)
    assert info.not_before < NOW < info.not_after
    assert info.problem_at(NOW) is None


# --- handshakes over loopback ----------------------------------------------------------------


async def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str = "localhost"
) -> tuple[str | None, dict[str, object] | None]:
    """One TLS handshake and a byte each way over loopback; returns the client's error (None on
    success) and the certificate the client saw."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tls_listener = trio.SSLListener(listeners[0], server, https_compatible=True)

    async def serve_one() -> None:
        stream = await tls_listener.accept()
        try:
            await stream.do_handshake()
            await stream.receive_some(1)
            await stream.send_all(b"y")
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    failure: str | None = None
    seen: dict[str, object] | None = None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, client, server_hostname=server_name)
            try:
                await stream.do_handshake()
                await stream.send_all(b"x")
                # TLS 1.3 reports a refused client certificate after the handshake: read once.
                answer = await stream.receive_some(1)
                if answer == b"y":
                    seen = stream.getpeercert()
                else:
                    failure = "the server closed the connection"
            except (trio.BrokenResourceError, ssl.SSLError) as error:
                cause = error.__cause__ if error.__cause__ is not None else error
                failure = str(cause)
            finally:
                await trio.aclose_forcefully(stream)
        await tls_listener.aclose()
    return failure, seen


def system_roots() -> ssl.SSLContext:
    return ssl.create_default_context()


def context_for(
    *,
    ca_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    verify: bool = True,
    roots: Callable[[], ssl.SSLContext] = system_roots,
) -> ssl.SSLContext:
    return upstream_context(
        roots, ca_file=ca_file, client_cert=client_cert, client_key=client_key, verify=verify
    )


async def test_a_private_ca_is_trusted_with_ca_file_and_refused_without(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path)
    bundle = write_ca(ca, tmp_path / "ca.pem")
    failure, _ = await handshake(server_context(cert, key), context_for(ca_file=bundle))
    assert failure is None
    failure, _ = await handshake(server_context(cert, key), context_for())
    assert failure is not None
    assert "CERTIFICATE_VERIFY_FAILED" in failure


async def test_a_client_certificate_is_presented_when_configured(tmp_path: Path) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_pair(server_ca.issue_cert("localhost"), tmp_path)
    client_cert, client_key = write_pair(client_ca.issue_cert("tproxy"), tmp_path, "client")
    bundle = write_ca(server_ca, tmp_path / "ca.pem")
    requiring = server_context(cert, key, client_ca=client_ca)
    with_cert = context_for(ca_file=bundle, client_cert=client_cert, client_key=client_key)
    failure, _ = await handshake(requiring, with_cert)
    assert failure is None
    failure, _ = await handshake(requiring, context_for(ca_file=bundle))
    assert failure is not None


async def test_verify_false_accepts_any_certificate(tmp_path: Path) -> None:
    cert, key = write_pair(trustme.CA().issue_cert("elsewhere.example"), tmp_path)
    failure, _ = await handshake(server_context(cert, key), context_for(verify=False))
    assert failure is None


def test_an_unusable_ca_file_or_client_certificate_is_named(tmp_path: Path) -> None:
    with pytest.raises(TLSFileError, match=r"absent\.pem"):
        context_for(ca_file=tmp_path / "absent.pem")
    with pytest.raises(TLSFileError, match=r"client\.pem"):
        context_for(client_cert=tmp_path / "client.pem")


async def test_a_reload_presents_the_new_certificate_to_new_handshakes(tmp_path: Path) -> None:
    ca = trustme.CA()
    old_cert, old_key = write_pair(ca.issue_cert("localhost", common_name="old"), tmp_path, "old")
    new_cert, new_key = write_pair(ca.issue_cert("localhost", common_name="new"), tmp_path, "new")
    bundle = write_ca(ca, tmp_path / "ca.pem")
    live = server_context(old_cert, old_key)
    client = context_for(ca_file=bundle)
    _, seen = await handshake(live, client)
    assert seen is not None
    assert "old" in str(seen["subject"])
    reload_cert_chain(live, new_cert, new_key)
    _, seen = await handshake(live, client)
    assert seen is not None
    assert "new" in str(seen["subject"])


def test_a_reload_with_unusable_files_keeps_the_old_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path)
    _, other_key = write_pair(ca.issue_cert("localhost"), tmp_path, "other")
    live = server_context(cert, key)
    with pytest.raises(TLSFileError, match="cannot load"):
        reload_cert_chain(live, cert, other_key)
    other_key.chmod(0o644)
    with pytest.raises(TLSFileError, match="chmod 600"):
        reload_cert_chain(live, cert, other_key)
