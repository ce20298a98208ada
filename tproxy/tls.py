"""Certificates and keys: checked before they are used, and the client TLS contexts tproxy makes.

Theory of operation. A TLS setting names files (PEM). Everything that can be wrong with them is
found at once, before anything listens or connects, and reported against the setting that names
the file: a file that cannot be read, a private key that other users may read (it would be a
secret in the open: refused, as ssh refuses such keys), a file that holds no certificate, a key
that does not belong to its certificate, a certificate that has expired or is not valid yet.
:func:`check_certificate_pair` and :func:`check_ca_file` return those problems as
``(setting, reason)`` pairs, never raising, for ``check-config`` and for the start of ``serve``.

The listening side's context is Hypercorn's (``serving/``); :func:`reload_cert_chain` loads a
renewed certificate into that same context, so handshakes after a reload present the new one
while connections already open keep theirs. :func:`upstream_context` builds the client
contexts of the upstreams and of the shared tier's ``rediss://`` server, in one way: the
system's trusted roots (the caller's default) or a private CA bundle, an optional client
certificate, and verification that can be turned off only on purpose (the caller warns).

X.509 is parsed with the ``cryptography`` package: validity dates are not reachable through the
standard library's public API.
"""

from __future__ import annotations

import datetime
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = [
    "CertificateInfo",
    "TLSFileError",
    "check_ca_file",
    "check_certificate_pair",
    "read_certificate",
    "reload_cert_chain",
    "upstream_context",
]

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class TLSFileError(ValueError):
    """A certificate, key or CA file cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a person needs to know about a certificate: whom it names and when it is valid."""

    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    def problem_at(self, now: datetime.datetime) -> str | None:
        """Why the certificate cannot be used at ``now``, or None when it can."""
        if now > self.not_after:
            return f"the certificate expired on {self.not_after:%Y-%m-%d %H:%M} UTC"
        if now < self.not_before:
            return f"the certificate is not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
        return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSFileError(f"cannot read the {what} {path}: {error.strerror or error}") from None


def read_certificate(path: Path) -> CertificateInfo:
    """The first certificate of a PEM file. Raises :class:`TLSFileError`."""
    data = _read(path, "certificate")
    if _PEM_CERTIFICATE not in data:
        raise TLSFileError(f"{path} holds no PEM certificate")
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise TLSFileError(f"{path}: not a readable certificate ({error})") from None
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
    )


def _key_problem(path: Path) -> str | None:
    """Why a private key file must not be used, or None. Never raises."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return f"cannot read the key {path}: {error.strerror or error}"
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return (
            f"the key {path} may be read by every user of this machine"
            f" (mode {stat.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
        )
    return None


def check_certificate_pair(
    cert: Path, key: Path, *, now: datetime.datetime, cert_setting: str, key_setting: str
) -> list[tuple[str, str]]:
    """Every problem with a certificate and its key, as ``(setting, reason)``; never raises."""
    problems: list[tuple[str, str]] = []
    key_problem = _key_problem(key)
    if key_problem is not None:
        problems.append((key_setting, key_problem))
    try:
        info = read_certificate(cert)
    except TLSFileError as error:
        problems.append((cert_setting, str(error)))
        return problems
    expiry = info.problem_at(now)
    if expiry is not None:
        problems.append((cert_setting, f"{cert}: {expiry}"))
    if key_problem is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as error:
            problems.append((key_setting, f"{key} does not belong to {cert}: {error.reason}"))
        except OSError as error:
            problems.append((key_setting, f"cannot load {key}: {error.strerror or error}"))
    return problems


def check_ca_file(path: Path, *, setting: str) -> list[tuple[str, str]]:
    """Problems with a CA bundle (readable, holds at least one certificate); never raises."""
    try:
        read_certificate(path)
    except TLSFileError as error:
        return [(setting, str(error))]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        return [(setting, f"{path}: not a usable CA bundle ({error.reason})")]
    return []


def reload_cert_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a renewed certificate and key into a live server context.

    Handshakes that start afterwards present the new certificate; open connections are not
    touched. Raises :class:`TLSFileError` and leaves the context as it was when the files
    cannot be used.
    """
    key_problem = _key_problem(key)
    if key_problem is not None:
        raise TLSFileError(key_problem)
    trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        trial.load_cert_chain(cert, key)
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        raise TLSFileError(f"cannot load {cert} with {key}: {error}") from None


def upstream_context(
    system_roots: Callable[[], ssl.SSLContext],
    *,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    verify: bool,
) -> ssl.SSLContext:
    """The client context for one upstream (an HTTP upstream, or the shared tier's server).

    ``system_roots`` makes a new context that trusts the usual roots (the client library's
    default). ``ca_file`` trusts a private CA bundle instead; ``client_cert`` (with
    ``client_key``, or a key inside the same file) is presented to upstreams that require one;
    ``verify=False`` accepts any certificate. Raises :class:`TLSFileError`.
    """
    if ca_file is None:
        context = system_roots()
    else:
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        except (ssl.SSLError, OSError) as error:
            raise TLSFileError(f"cannot load the CA bundle {ca_file}: {error}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (ssl.SSLError, OSError) as error:
            raise TLSFileError(
                f"cannot load the client certificate {client_cert}: {error}"
            ) from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
