"""``server.reuse_port``: several tproxy servers on one address, the kernel spreading connections.

Two servers run in this test's process (each with its own store: LMDB opens a directory once per
process; several processes sharing one store is tested in ``tests/test_store.py``).
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
import trio

from tests.fakeupstream import FakeUpstream
from tproxy.config import Overrides, Settings, load_settings
from tproxy.server import ListenError, Listening, serve_tproxy

CONNECTIONS = 40


def settings_for(
    tmp_path: Path, name: str, listen: str, upstream: FakeUpstream, *, reuse_port: bool = True
) -> Settings:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"[server]\nreuse_port = {str(reuse_port).lower()}\n")
    return load_settings(
        config,
        Overrides(
            listen=listen,
            admin_listen="127.0.0.1:0",
            upstream=upstream.url,
            cache_dir=tmp_path / f"store-{name}",
        ),
    )


async def start_first(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path, stop: trio.Event
) -> tuple[Listening, str]:
    """A server with reuse_port on a free port, and its ``host:port``."""
    first: Listening = await nursery.start(
        serve_tproxy, settings_for(tmp_path, "first", "127.0.0.1:0", upstream), stop
    )
    return first, first.proxy[0].removeprefix("http://")


async def test_two_servers_share_one_port_and_both_answer(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    stop = trio.Event()
    first, address = await start_first(nursery, upstream, tmp_path, stop)
    second: Listening = await nursery.start(
        serve_tproxy, settings_for(tmp_path, "second", address, upstream), stop
    )
    assert second.proxy == first.proxy
    with trio.fail_after(20):
        for index in range(CONNECTIONS):  # a new connection each time: the kernel picks a server
            async with httpx2.AsyncClient(base_url=first.proxy[0], timeout=10) as http:
                response = await http.get(f"/v1/models/{index}")
                assert response.status_code == 200
    await first.inflight.wait_idle()
    await second.inflight.wait_idle()
    assert first.status.handled + second.status.handled == CONNECTIONS
    assert first.status.handled > 0
    assert second.status.handled > 0
    stop.set()


async def test_without_reuse_port_a_second_server_cannot_take_the_port(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    stop = trio.Event()
    _, address = await start_first(nursery, upstream, tmp_path, stop)
    plain = settings_for(tmp_path, "plain", address, upstream, reuse_port=False)
    expected = pytest.RaisesExc(ListenError, match=f"cannot listen on {address}: .*in use")
    with pytest.RaisesGroup(expected, flatten_subgroups=True):
        await serve_tproxy(plain, stop)
    stop.set()
