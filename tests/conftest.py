"""Shared fixtures: a fake upstream on a real socket, and tproxy served by real Hypercorn.

Everything listens on 127.0.0.1 with a port the kernel picks; every test gets its own upstream,
its own proxy and its own LMDB directory, so no state is shared between tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import trio

from tests.fakeupstream import FakeUpstream
from tproxy.config import Overrides, Settings, load_settings
from tproxy.inflight import Inflight
from tproxy.pipeline import Exchanger
from tproxy.server import Listening, serve_tproxy
from tproxy.storewriter import StoreWriter
from tproxy.telemetry import ACCESS_FIELDS


@dataclass
class RunningProxy:
    settings: Settings
    url: str
    admin_url: str
    stop: trio.Event
    stopped: trio.Event
    store_writer: StoreWriter | None
    inflight: Inflight
    exchanger: Exchanger

    async def flush(self) -> None:
        """Wait until every request has finished, every answer to store is in the store, and every
        access line is written."""
        await self.inflight.wait_idle()
        await self.exchanger.wait_landed()
        if self.store_writer is not None:
            await self.store_writer.flush()
        await self.exchanger.telemetry.flush()


StartProxy = Callable[..., Awaitable[RunningProxy]]

# The openai SDK stops reading its own async generators (and httpx2's) at ``[DONE]`` without
# closing them; under Trio their finalizers warn when they are collected. Not ours to fix and
# harmless (the response is closed), so tests that use the SDK tolerate exactly that.
tolerate_sdk_generators = pytest.mark.filterwarnings(
    "ignore:Async generator:ResourceWarning",
    "ignore:Exception ignored in. <async_generator:pytest.PytestUnraisableExceptionWarning",
)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The fields of every access log line captured so far (after ``RunningProxy.flush``)."""
    return [
        getattr(record, ACCESS_FIELDS)
        for record in caplog.records
        if record.name == "tproxy.access" and hasattr(record, ACCESS_FIELDS)
    ]


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path) -> StartProxy:
    """Start a tproxy in front of ``upstream``; ``toml`` adds settings to its config file."""

    async def start(
        toml: str = "",
        *,
        upstream_url: str | None = None,
        upstream_flag: bool = True,
        store: str = "store",
    ) -> RunningProxy:
        """``upstream_flag=False`` leaves upstreams and routes to ``toml`` (as ``--upstream``
        would replace them); ``{upstream}`` in ``toml`` is the fake upstream's URL. ``store``
        names the LMDB directory: proxies started with different ones are different hosts."""
        config = tmp_path / "tproxy.toml"
        config.write_text(toml.replace("{upstream}", upstream.url))
        settings = load_settings(
            config,
            Overrides(
                listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                upstream=(upstream_url or upstream.url) if upstream_flag else None,
                cache_dir=tmp_path / store,
            ),
        )
        stop = trio.Event()
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[Listening]) -> None:
            try:
                await serve_tproxy(settings, stop, task_status=task_status)
            finally:
                stopped.set()

        listening: Listening = await nursery.start(run)
        return RunningProxy(
            settings,
            listening.proxy[0],
            listening.admin[0],
            stop,
            stopped,
            listening.store_writer,
            listening.inflight,
            listening.exchanger,
        )

    return start


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy()


@pytest.fixture
async def client(proxy: RunningProxy) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10.0) as http:
        yield http
