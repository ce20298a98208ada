"""TLS both ways, end to end: clients reach tproxy over HTTPS (HTTP/1.1 and HTTP/2), and tproxy
reaches upstreams behind a private CA, with a client certificate, by another name, or over
HTTP/2.

The CAs are made here (trustme). Upstreams are real TLS servers on loopback: the fake
OpenAI-compatible upstream on Trio's TLS streams, and, for HTTP/2, Hypercorn itself serving a
small streaming app. The client is the real `openai` SDK.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve

from tests.conftest import StartProxy, access_lines, tolerate_sdk_generators
from tests.fakeupstream import FakeUpstream, stream_events
from tests.tlsfiles import server_context, write_ca, write_pair
from tproxy.config import Overrides, load_settings
from tproxy.server import Listening, serve_tproxy

pytestmark = tolerate_sdk_generators

NO_CACHE = "[cache]\nenabled = false\n"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "over tls"}], "stream": True}


@dataclass
class TLSFakeUpstream(FakeUpstream):
    """The fake upstream behind TLS, at ``https://127.0.0.1:PORT``."""

    tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.tls is not None
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        secured = [trio.SSLListener(listener, self.tls) for listener in listeners]
        await trio.serve_listeners(self._connection, secured)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def start_tls_upstream(
    nursery: trio.Nursery,
    ca: trustme.CA,
    folder: Path,
    *,
    identity: str = "127.0.0.1",
    client_ca: trustme.CA | None = None,
) -> TLSFakeUpstream:
    cert, key = write_pair(ca.issue_cert(identity), folder / "upstream", "upstream")
    upstream = TLSFakeUpstream(tls=server_context(cert, key, client_ca))
    await nursery.start(upstream.serve)
    return upstream


def upstream_toml(url: str, settings: str, *, cache: bool = True) -> str:
    """One upstream with these settings; ``cache=False`` for a second proxy in a test, which
    must neither open the first one's store nor answer from it."""
    return ("" if cache else NO_CACHE) + f'[upstreams.model]\nurl = "{url}"\n{settings}'


async def post_twice(url: str, verify: ssl.SSLContext | bool = True) -> list[httpx2.Response]:
    async with httpx2.AsyncClient(base_url=url, verify=verify, timeout=10) as client:
        return [await client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]


# --- clients to tproxy over HTTPS ------------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_the_openai_sdk_streams_from_tproxy_over_https(
    start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, http2: bool
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "listener")
    proxy = await start_proxy(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert proxy.url.startswith("https://")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with httpx2.AsyncClient(verify=trusting, http2=http2, timeout=10) as http:
        sdk = openai.AsyncOpenAI(
            base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, http_client=http
        )
        stream = await sdk.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "secret words"}], stream=True
        )
        async with stream:
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
        assert "".join(pieces) == "secret words"
        models = await http.get(proxy.url + "/healthz-not-here")
    assert models.http_version == ("HTTP/2" if http2 else "HTTP/1.1")


async def test_a_client_without_a_certificate_is_refused_when_tls_client_ca_is_set(
    start_proxy: StartProxy, upstream: FakeUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "listener")
    clients = trustme.CA()
    bundle = write_ca(clients, tmp_path / "clients.pem")
    proxy = await start_proxy(
        f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{bundle}"\n'
    )
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with pytest.raises(httpx2.TransportError):
        await post_twice(proxy.url, trusting)
    clients.issue_cert("laptop").configure_cert(trusting)
    first, second = await post_twice(proxy.url, trusting)
    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert upstream.calls["/v1/chat/completions"] == 1


# --- tproxy to upstreams over TLS ------------------------------------------------------------


async def test_an_upstream_signed_by_a_private_ca_works_with_ca_file_and_not_without(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    upstream = await start_tls_upstream(nursery, ca, tmp_path)
    bundle = write_ca(ca, tmp_path / "company-ca.pem")
    trusted = await start_proxy(
        upstream_toml(upstream.url, f'ca_file = "{bundle}"\n'), upstream_flag=False
    )
    first, second = await post_twice(trusted.url)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "tproxy; fwd=miss"
    assert second.content == first.content
    assert upstream.calls["/v1/chat/completions"] == 1

    untrusted = await start_proxy(upstream_toml(upstream.url, "", cache=False), upstream_flag=False)
    refused, _ = await post_twice(untrusted.url)
    assert refused.status_code == 502
    assert refused.json()["error"]["message"]
    assert upstream.calls["/v1/chat/completions"] == 1


async def test_tls_server_name_checks_the_certificate_of_an_upstream_named_by_address(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    upstream = await start_tls_upstream(nursery, ca, tmp_path, identity="model.internal")
    bundle = write_ca(ca, tmp_path / "ca.pem")
    named = await start_proxy(
        upstream_toml(upstream.url, f'ca_file = "{bundle}"\ntls_server_name = "model.internal"\n'),
        upstream_flag=False,
    )
    answered, _ = await post_twice(named.url)
    assert answered.status_code == 200
    unnamed = await start_proxy(
        upstream_toml(upstream.url, f'ca_file = "{bundle}"\n', cache=False), upstream_flag=False
    )
    mismatched, _ = await post_twice(unnamed.url)
    assert mismatched.status_code == 502


async def test_an_upstream_that_requires_a_client_certificate(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    upstream = await start_tls_upstream(nursery, ca, tmp_path, client_ca=client_ca)
    bundle = write_ca(ca, tmp_path / "ca.pem")
    cert, key = write_pair(client_ca.issue_cert("tproxy"), tmp_path / "client", "client")
    without = await start_proxy(
        upstream_toml(upstream.url, f'ca_file = "{bundle}"\n', cache=False), upstream_flag=False
    )
    refused, _ = await post_twice(without.url)
    assert refused.status_code == 502
    with_cert = await start_proxy(
        upstream_toml(
            upstream.url,
            f'ca_file = "{bundle}"\nclient_cert = "{cert}"\nclient_key = "{key}"\n',
        ),
        upstream_flag=False,
    )
    first, second = await post_twice(with_cert.url)
    assert first.status_code == 200
    assert second.content == first.content
    assert upstream.calls["/v1/chat/completions"] == 1


@dataclass
class HTTP2Upstream:
    """A streaming chat upstream served by Hypercorn over TLS with HTTP/2 (ALPN)."""

    versions: list[str]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.versions.append(scope["http_version"])
        stalls = (b"x-stall", b"1") in scope["headers"]
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for event in stream_events(json.loads(body)):
            await send({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
            if stalls:  # silent after the first event, its stream open, until the test ends
                await trio.sleep_forever()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def start_http2_upstream(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> tuple[HTTP2Upstream, str]:
    """The HTTP/2 upstream and the settings of an upstream table reaching it."""
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "h2", "upstream")
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile, config.keyfile = str(cert), str(key)
    config.accesslog = None
    app = HTTP2Upstream([])
    binds: list[str] = await nursery.start(serve, app, config)
    bundle = write_ca(ca, tmp_path / "ca.pem")
    return app, upstream_toml(binds[0], f'ca_file = "{bundle}"\nhttp2 = true\n')


async def test_an_http2_upstream_over_tls_streams_and_is_cached(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    app, toml = await start_http2_upstream(nursery, ca, tmp_path)
    proxy = await start_proxy(toml, upstream_flag=False)
    first, second = await post_twice(proxy.url)
    assert app.versions == ["2"]
    assert first.status_code == 200
    assert first.headers["content-type"] == "text/event-stream"
    assert b"data: [DONE]" in first.content
    assert second.content == first.content


async def test_an_http2_upstream_silent_mid_stream_is_cut_at_its_idle_timeout(
    nursery: trio.Nursery,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reader's idle deadline cuts an HTTP/2 stream too (httpcore2 has no read timeout set,
    and no scope per chunk), and the connection's other streams go on: the next request is
    answered whole."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    app, toml = await start_http2_upstream(nursery, ca, tmp_path)
    proxy = await start_proxy(toml + "idle_timeout = 0.3\n", upstream_flag=False)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with trio.fail_after(10):
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.post("/v1/chat/completions", json=CHAT, headers={"x-stall": "1"})
            whole = await http.post("/v1/chat/completions", json={**CHAT, "n": 1})
    assert whole.status_code == 200
    assert whole.text.endswith("data: [DONE]\n\n")
    assert app.versions == ["2", "2"]
    await proxy.flush()
    (cut,) = [line for line in access_lines(caplog) if line["state"] != "completed"]
    assert (cut["state"], cut["reason"]) == ("timed_out", "timeout:idle")


async def test_an_https_upstream_silent_mid_stream_is_cut_and_its_connection_closed(
    nursery: trio.Nursery,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over httpcore2's HTTP/1.1 too, with no read timeout set: the reader's idle deadline cuts
    the body, and the connection, mid-body, is closed rather than pooled."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    upstream = await start_tls_upstream(nursery, ca, tmp_path)
    bundle = write_ca(ca, tmp_path / "ca.pem")
    toml = upstream_toml(upstream.url, f'ca_file = "{bundle}"\nidle_timeout = 0.3\n')
    proxy = await start_proxy(toml, upstream_flag=False)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with trio.fail_after(10):
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.post(
                    "/v1/chat/completions", json=CHAT, headers={"x-fake-stall-after": "1"}
                )
            await upstream.disconnected.wait()
            whole = await http.post("/v1/chat/completions", json={**CHAT, "n": 1})
    assert whole.text.endswith("data: [DONE]\n\n")
    await proxy.flush()
    (cut,) = [line for line in access_lines(caplog) if line["state"] != "completed"]
    assert (cut["state"], cut["reason"]) == ("timed_out", "timeout:idle")


# --- certificate rotation ----------------------------------------------------------------------


async def certificate_expiry(admin_url: str) -> float:
    """The proxy listener's certificate expiry, as /metrics reports it."""
    async with httpx2.AsyncClient(base_url=admin_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    found = re.search(
        r'^tproxy_tls_certificate_expiry_timestamp_seconds{listener="proxy"} (\S+)$', text, re.M
    )
    assert found is not None
    return float(found.group(1))


async def test_reloading_certificates_presents_the_new_one_to_new_connections(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    folder = tmp_path / "listener"
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    later = soon + datetime.timedelta(days=60)
    write_pair(ca.issue_cert("127.0.0.1", common_name="before", not_after=soon), folder)
    config = tmp_path / "tproxy.toml"
    config.write_text(
        f'[server]\ntls_cert = "{folder / "server.pem"}"\ntls_key = "{folder / "server.key"}"\n'
    )
    settings = load_settings(
        config,
        Overrides(
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            upstream="http://127.0.0.1:9",
            cache_dir=tmp_path / "store",
        ),
    )
    stop = trio.Event()
    listening: Listening = await nursery.start(serve_tproxy, settings, stop)
    port = int(listening.proxy[0].rsplit(":", 1)[1])

    async def common_name() -> str:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=trusting, https_compatible=True
        )
        await stream.do_handshake()
        subject = stream.getpeercert()["subject"]
        await stream.aclose()
        return str(subject)

    assert "before" in await common_name()
    assert await certificate_expiry(listening.admin[0]) == int(soon.timestamp())
    write_pair(ca.issue_cert("127.0.0.1", common_name="after", not_after=later), folder)
    listening.reload_certificates()
    assert "after" in await common_name()
    assert await certificate_expiry(listening.admin[0]) == int(later.timestamp())
    stop.set()
