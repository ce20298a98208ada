"""``/metrics`` of a running server, scraped over HTTP after real requests.

What Prometheus reads is checked by Prometheus' own tool: ``promtool check metrics``. Where
promtool is not installed the check is skipped, unless ``TPROXY_REQUIRE_PROMTOOL=1`` (CI sets
it, and installs promtool) makes its absence a failure.
"""

from __future__ import annotations

import os
import shutil

import httpx2
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "one two three"}]}


async def scrape_after_traffic(proxy: RunningProxy, client: httpx2.AsyncClient) -> httpx2.Response:
    """A miss, its hit, a stream and a refusal, then the admin listener's /metrics."""
    miss = await client.post("/v1/chat/completions", json=CHAT)
    assert miss.headers["cache-status"] == "tproxy; fwd=miss"
    await proxy.flush()
    hit = await client.post("/v1/chat/completions", json=CHAT)
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert streamed.status_code == 200
    refused = await client.get("/v1/%2e%2e/models")  # a dot segment: refused before routing
    assert refused.status_code == 400
    await proxy.flush()
    async with httpx2.AsyncClient(base_url=proxy.admin_url, timeout=10.0) as admin:
        return await admin.get("/metrics")


def sample_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_scrape_says_its_format_and_counts_what_the_requests_did(
    proxy: RunningProxy, client: httpx2.AsyncClient
) -> None:
    scrape = await scrape_after_traffic(proxy, client)
    assert scrape.status_code == 200
    assert scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = sample_values(scrape.text)

    def labels(**pairs: str) -> frozenset[tuple[str, str]]:
        return frozenset(pairs.items())

    requests = "tproxy_requests_total"
    hit = labels(state="completed", cache="hit", route="default", upstream="none")
    assert found[requests, hit] == 1
    miss = labels(state="completed", cache="miss", route="default", upstream="default")
    assert found[requests, miss] == 2  # the JSON answer and the stream
    refused = labels(state="rejected", cache="none", route="none", upstream="none")
    assert found[requests, refused] == 1
    # "one two three": the fake model reports 3 prompt and 3 completion tokens.
    assert found["tproxy_tokens_total", labels(model="m1", kind="prompt")] == 3
    saved = labels(model="m1", kind="completion", cache="hit")
    assert found["tproxy_tokens_saved_total", saved] == 3
    assert found["process_open_fds", labels()] > 0
    assert not [name for name, _ in found if name.endswith("_created")]


PROMTOOL = shutil.which("promtool")
REQUIRED = os.environ.get("TPROXY_REQUIRE_PROMTOOL") == "1"


@pytest.mark.skipif(
    PROMTOOL is None and not REQUIRED,
    reason="promtool is not installed (Debian: the prometheus package)",
)
async def test_promtool_finds_a_scrape_clean(
    proxy: RunningProxy, client: httpx2.AsyncClient
) -> None:
    assert PROMTOOL is not None, "TPROXY_REQUIRE_PROMTOOL=1 but promtool is not on PATH"
    scrape = await scrape_after_traffic(proxy, client)
    checked = await trio.run_process(
        [PROMTOOL, "check", "metrics"],
        stdin=scrape.content,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    report = (checked.stdout + checked.stderr).decode()
    assert (checked.returncode, report) == (0, ""), report
