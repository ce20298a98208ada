"""Client keys end to end: 401 without an accepted key, nothing reaches the upstream, and the
proxy's key is never passed on to the upstream."""

from __future__ import annotations

import httpx2
import pytest

from tests.conftest import StartProxy
from tests.fakeupstream import FakeUpstream
from tproxy.core.clientauth import hash_key

CHAT = "/v1/chat/completions"
BODY = {"model": "fake", "messages": [{"role": "user", "content": "let me in"}]}


def auth_toml(*keys: str) -> str:
    hashes = ", ".join(f'"{hash_key(key)}"' for key in keys)
    return f"[auth]\nclient_keys = [{hashes}]\n"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Basic c2stZ29vZA=="},
        {"x-api-key": "wrong"},
        {"authorization": "Bearer sk-good", "x-api-key": "wrong"},
    ],
    ids=["none", "wrong-bearer", "basic", "wrong-x-api-key", "one-good-one-wrong"],
)
async def test_a_request_without_an_accepted_key_is_refused_with_401(
    start_proxy: StartProxy, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    proxy = await start_proxy(auth_toml("sk-good"))
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.post(CHAT, json=BODY, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "sk-good" not in response.text
    assert upstream.requests == []


@pytest.mark.parametrize(
    "headers",
    [{"authorization": "Bearer sk-good"}, {"api-key": "sk-other"}, {"x-api-key": "sk-good"}],
)
async def test_an_accepted_key_is_served_and_not_passed_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    proxy = await start_proxy(auth_toml("sk-good", "sk-other"))
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.post(CHAT, json=BODY, headers=headers)
    assert response.status_code == 200
    seen = upstream.requests[-1].headers
    assert not {"authorization", "api-key", "x-api-key"} & seen.keys()
