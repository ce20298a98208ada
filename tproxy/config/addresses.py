"""``HOST:PORT`` addresses and upstream URLs: parsed, refused with a reason, written back."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from tproxy.config.messages import show

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _valid_host(host: str) -> bool:
    """An IP address, or a host name whose dot-separated labels are letters, digits, - and _."""
    if _is_ip(host):
        return True
    if _DOTTED_NUMBERS.fullmatch(host):
        return False  # looks like an IPv4 address but is not one: refuse rather than resolve it
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def format_host_port(host: str, port: int) -> str:
    """``HOST:PORT`` with an IPv6 host in brackets, as :func:`parse_host_port` reads it."""
    return f"{_bracketed(host)}:{port}"


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` into its host and port; raises ValueError saying what is wrong.

    The host is an IPv4 address, a host name, or an IPv6 address in brackets (``[::1]:8080``).
    A host is required: ``:8080`` is refused rather than read as "every interface", because
    exposing the proxy beyond this machine should be written down (``0.0.0.0:8080``). Port 0
    asks the system for a free port.
    """
    shown = show(text)
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
        if not separator:
            raise ValueError(
                f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {shown}"
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address inside the brackets, got {shown}") from None
    else:
        host, separator, port = text.rpartition(":")
        if not separator:
            raise ValueError(
                f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {shown}"
            )
        if not host:
            raise ValueError(
                f"a host is required: 127.0.0.1{text} for this machine only,"
                f" 0.0.0.0{text} for every IPv4 interface"
            )
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, as in [::1]:8080, got {shown}")
        if not _valid_host(host):
            raise ValueError(f"invalid host {show(host)} in {shown}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"invalid port {show(port)} in {shown}: expected 0 to 65535")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` listens on this machine only (127.0.0.0/8, ::1 or localhost)."""
    host, _port = parse_host_port(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def normalise_url(text: str) -> str:
    """``scheme://host[:port][/base]`` in lower case with no trailing slash; ValueError if not."""
    if not text.isprintable() or " " in text:
        raise ValueError(f"a URL must not contain spaces or control characters, got {show(text)}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid URL {show(text)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {show(text)}")
    if parts.username is not None or parts.password is not None:
        # Not echoed: it holds a credential.
        raise ValueError("a URL must not hold a user name or password; use api_key_env or headers")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"a URL must not have a query (?) or fragment (#), got {show(text)}")
    host = parts.hostname or ""
    if not _valid_host(host):
        raise ValueError(f"invalid host {show(host)} in URL {show(text)}")
    netloc = format_host_port(host, port) if port is not None else _bracketed(host)
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"
