"""What the libraries under tproxy log: nothing below WARNING unless ``log.libraries`` asks.

httpx2 (tproxy's client until issue 16) logged an INFO line per upstream request: it doubled the
log (the access line already says it) and carried the upstream URL whole, query string included,
where clients put keys (``?api-key=...``); httpcore2 logs each step of a request at DEBUG, and
hpack logs header values at DEBUG. No log record emitted while serving a
request may hold its query string, whatever the level (docs/telemetry.md promises paths without
query strings).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
import trustme

from tests.conftest import StartProxy
from tests.security.rawhttp import raw_request
from tests.test_tls_end_to_end import start_tls_upstream
from tests.tlsfiles import write_ca

SECRET = "sk-query-secret-7f3a"


def request(path: str, body: dict[str, object], *extra: bytes) -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1".encode(), b"Host: tproxy", b"Connection: close", *extra]
    head += [b"Content-Type: application/json", b"Content-Length: %d" % len(data)]
    return b"\r\n".join(head) + b"\r\n\r\n" + data


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def holding(records: list[logging.LogRecord], text: str) -> list[logging.LogRecord]:
    """The records in which ``text`` appears: in the message, its arguments or any extra."""
    return [
        record for record in records if text in record.getMessage() or text in repr(vars(record))
    ]


async def test_no_log_record_at_any_level_holds_a_query_string(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy()
    path = f"/v1/chat/completions?api-key={SECRET}"
    for body, extra in [
        (chat("a json miss"), ()),
        (chat("a json miss"), ()),  # and its hit
        (chat("a stream", stream=True), ()),
        (chat("hang up"), (b"X-Fake-Hang-Up: 1",)),  # a 502
    ]:
        await raw_request(proxy.url, request(path, body, *extra))
        await proxy.flush()

    assert any(record.name == "tproxy.access" for record in caplog.records)
    assert holding(caplog.records, SECRET) == []
    assert [r.name for r in caplog.records if r.name.startswith("httpcore2")] == []


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_library_logs_come_back_at_the_level_the_settings_ask(
    level: str,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """httpcore2 logs each step of a request at DEBUG: shown at ``debug``, not at ``info``. The
    upstream is ``https://``: httpcore2 is the client there (a plain ``http://`` upstream goes
    through tproxy's own h11 client, which logs nothing)."""
    caplog.set_level(logging.DEBUG)
    ca = trustme.CA()
    upstream = await start_tls_upstream(nursery, ca, tmp_path)
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    proxy = await start_proxy(
        f'[upstreams.default]\nca_file = "{ca_file}"\n[log]\nlibraries = "{level}"\n',
        upstream_url=upstream.url,
    )
    await raw_request(proxy.url, request("/v1/chat/completions", chat("loud")))
    await proxy.flush()

    shown = [r.levelno for r in caplog.records if r.name.startswith("httpcore2")]
    assert shown if level == "debug" else not shown
