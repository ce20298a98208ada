"""Certificates for tests, made by a CA of the tests' own (trustme), written as PEM files the
way an operator keeps them: the key readable by its owner only."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


def write_pair(leaf: trustme.LeafCert, folder: Path, name: str = "server") -> tuple[Path, Path]:
    """The leaf's certificate chain (``NAME.pem``) and private key (``NAME.key``, mode 0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    return cert, key


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as a PEM bundle, to trust it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(cert: Path, key: Path, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A TLS server's context with this certificate; with ``client_ca``, clients must present a
    certificate that CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
