"""Secrets: client credentials and the upstream's key appear nowhere at rest, in no log line and
in no answer; the store is readable by its owner only.

Each test runs the same mix of requests (streamed and whole answers, hits, upstream errors,
refusals, a client that leaves) with credentials in every header that carries one, then searches
the store's files, the captured log records and the process's output for the secret bytes.
"""

from __future__ import annotations

import logging
import os
import stat
from contextlib import aclosing
from pathlib import Path

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import FakeUpstream

CHAT = "/v1/chat/completions"
SECRETS = {
    "authorization": "sk-proj-AUTHORIZATION-7d1c52e0a9",
    "api-key": "sk-proj-APIKEY-4be0f6c2d3",
    "x-api-key": "sk-proj-XAPIKEY-91a7c6e5b8",
}
UPSTREAM_KEY = "sk-upstream-INJECTED-3f9e1b7a20"
UPSTREAM_KEY_ENV = "TPROXY_TEST_UPSTREAM_KEY"


def credentials(name: str) -> dict[str, str]:
    value = SECRETS[name]
    return {name: f"Bearer {value}" if name == "authorization" else value}


def chat(content: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


async def exercise(proxy: RunningProxy) -> None:
    """Every kind of exchange, once per credential header, then wait until all is stored."""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        for name in SECRETS:
            headers = credentials(name)
            for stream in (True, False):
                for _ in range(2):  # a miss that is stored, then a hit
                    await http.post(CHAT, json=chat(f"{name} asks", stream=stream), headers=headers)
                    await proxy.flush()
            await http.post(CHAT, json=chat("fail"), headers={**headers, "x-fake-status": "500"})
            await http.post(CHAT, content=b"x" * 2000, headers=headers)  # 413
            await http.post(CHAT, content=b"not json", headers=headers)
            await http.get("/v1/models", headers=headers)
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.post(
                    CHAT, json=chat("a b c d e"), headers={**headers, "x-fake-break-after": "2"}
                )
            async with (
                http.stream("POST", CHAT, json=chat(f"{name} leaves"), headers=headers) as left,
                aclosing(left.aiter_raw()) as chunks,
            ):
                await anext(chunks)
    with trio.fail_after(10):
        await proxy.flush()


def secret_bytes() -> list[bytes]:
    return [value.encode() for value in (*SECRETS.values(), UPSTREAM_KEY)]


async def stop(proxy: RunningProxy) -> None:
    proxy.stop.set()
    with trio.fail_after(10):
        await proxy.stopped.wait()


@pytest.fixture
async def keyed_proxy(start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch) -> RunningProxy:
    """A proxy that injects its own key for the upstream, caps bodies at 1000 bytes, and lets
    the libraries under it log at DEBUG (by default they are held at WARNING)."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    return await start_proxy(
        f'[upstreams.default]\napi_key_env = "{UPSTREAM_KEY_ENV}"\n'
        '[server]\nmax_body_bytes = 1000\n[log]\nlibraries = "debug"\n'
    )


async def test_no_credential_is_written_to_the_store(keyed_proxy: RunningProxy) -> None:
    await exercise(keyed_proxy)
    await stop(keyed_proxy)
    files = [path for path in keyed_proxy.settings.cache.dir.rglob("*") if path.is_file()]
    assert files  # the store was written: its data file holds the answers
    for path in files:
        content = path.read_bytes()
        for secret in secret_bytes():
            assert secret not in content, f"{secret!r} found in {path}"


async def test_no_credential_reaches_a_log_line_or_the_output(
    keyed_proxy: RunningProxy,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: tproxy, hypercorn, httpx2, httpcore2
    await exercise(keyed_proxy)
    await stop(keyed_proxy)
    output = capsys.readouterr()
    assert len(caplog.records) > len(SECRETS)
    assert any(record.name.startswith("httpcore2") for record in caplog.records)
    for record in caplog.records:
        logged = repr(vars(record)) + record.getMessage()
        for secret in secret_bytes():
            assert secret.decode() not in logged, f"{secret!r} logged by {record.name}"
    for secret in secret_bytes():
        assert secret.decode() not in caplog.text
        assert secret.decode() not in output.out + output.err


async def test_the_upstream_key_replaces_the_clients_and_is_never_revealed(
    keyed_proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    async with httpx2.AsyncClient(base_url=keyed_proxy.url, timeout=10) as http:
        answers = [
            await http.post(CHAT, json=chat("who am I", stream=stream), headers=credentials(name))
            for name in SECRETS
            for stream in (True, False)
        ]
    for seen in upstream.requests:
        assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "api-key" not in seen.headers
        assert "x-api-key" not in seen.headers
    for answer in answers:
        shown = answer.content + repr(answer.headers.raw).encode()
        assert UPSTREAM_KEY.encode() not in shown


async def test_without_an_upstream_key_the_clients_credential_goes_upstream_unchanged(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """The other way round: tproxy passes a client's credential on when it has none of its own
    (upstreams that check keys themselves), and only to the upstream."""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        answer = await http.post(CHAT, json=chat("mine"), headers=credentials("authorization"))
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SECRETS['authorization']}"
    assert SECRETS["authorization"].encode() not in answer.content + repr(answer.headers).encode()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_store_is_readable_by_its_owner_only_whatever_the_umask(
    start_proxy: StartProxy,
) -> None:
    previous = os.umask(0)  # the most permissive umask: only tproxy's own modes protect the store
    try:
        proxy = await start_proxy()
    finally:
        os.umask(previous)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        await http.post(CHAT, json=chat("keep this private"))
    await proxy.flush()
    await stop(proxy)
    store = proxy.settings.cache.dir
    assert mode(store) == 0o700
    files = list(store.rglob("*"))
    assert files
    for path in files:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
