"""The shared cache tier against a real redis-server: hosts share answers, tenants stay apart,
and every way the tier can fail costs a request no more than the tier's own deadline.

Each test starts its own redis-server on a free loopback port (:mod:`tests.redisserver`) and
one or two tproxy servers, each with its own LMDB store: two of them are two hosts of a fleet.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
import trio
import trio.testing
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import FakeUpstream
from tests.redisserver import (
    RedisCluster,
    RedisSentinel,
    RedisServer,
    TlsFiles,
    free_port,
    needs_redis,
)
from tests.test_shutdown import running_tproxy
from tests.tlsfiles import write_ca, write_pair
from tproxy.config import SharedStoreSettings
from tproxy.core.errors import ConfigError
from tproxy.store import SharedTier, open_shared_admin

pytestmark = needs_redis

CHAT = "/v1/chat/completions"
# Generous: a hang guard for tests, far above every deadline the tier is given here.
HANG = 20.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def shared_table(url: str, **extra: object) -> str:
    """A ``[shared_store]`` table. Lookups and writes get seconds unless a test says otherwise:
    only the fault tests are about deadlines, and a loaded CI machine must not turn hits into
    misses."""
    return table_of(f'url = "{url}"', {"lookup_timeout": 5, "write_timeout": 5, **extra})


def table_of(where: str, settings: dict[str, object]) -> str:
    lines = [where, *(f"{key} = {value}" for key, value in settings.items())]
    return "[shared_store]\n" + "\n".join(lines) + "\n"


def chat(content: str, *, stream: bool = False) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


async def two_hosts(start_proxy: StartProxy, table: str) -> tuple[RunningProxy, RunningProxy]:
    """Two tproxy servers with the same settings, each with its own LMDB store: two hosts."""
    return (
        await start_proxy(table, store="host-a"),
        await start_proxy(table, store="host-b"),
    )


async def shared_between_two_hosts(start_proxy: StartProxy, table: str, words: str) -> bool:
    """Whether an answer one host fetched is a shared hit on a second host, with ``table``."""
    first_host, second_host = await two_hosts(start_proxy, table)
    body = chat(words)
    await ask(first_host, body)
    return "detail=shared" in (await ask(second_host, body)).headers["cache-status"]


async def ask(
    proxy: RunningProxy, body: dict[str, object], headers: dict[str, str] | None = None
) -> httpx2.Response:
    """One request; then wait until what it stores is in both tiers."""
    with trio.fail_after(HANG):
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=HANG) as http:
            response = await http.post(CHAT, json=body, headers=headers)
        await settle(proxy)
    return response


async def settle(proxy: RunningProxy) -> None:
    await proxy.flush()
    assert proxy.store_writer is not None
    if proxy.store_writer.shared is not None:
        await proxy.store_writer.shared.flush()
    await proxy.store_writer.flush()  # a shared hit's copy into the local store


async def metrics(proxy: RunningProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx2.AsyncClient(base_url=proxy.admin_url, timeout=HANG) as http:
        text = (await http.get("/metrics")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def lookups(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], result: str) -> float:
    return found[("tproxy_shared_store_lookups_total", (("result", result),))]


def writes(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return found[("tproxy_shared_store_writes_total", (("outcome", outcome),))]


async def test_the_second_host_is_answered_by_the_first_hosts_upstream_call(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer
) -> None:
    first_host, second_host = await two_hosts(start_proxy, shared_table(redis.url))
    for stream in (False, True):
        body = chat(f"shared across hosts, stream={stream}", stream=stream)
        fetched = await ask(first_host, body)
        assert fetched.headers["cache-status"] == "tproxy; fwd=miss"
        shared = await ask(second_host, body)
        assert shared.headers["cache-status"].startswith("tproxy; hit; ttl=")
        assert shared.headers["cache-status"].endswith("; detail=shared")
        assert shared.content == fetched.content
        assert shared.headers["content-type"] == fetched.headers["content-type"]
        # The shared hit was copied into the second host's own store: its next hit is local.
        local = await ask(second_host, body)
        assert "detail=shared" not in local.headers["cache-status"]
        assert local.content == fetched.content
    assert upstream.calls[CHAT] == 2
    found = await metrics(second_host)
    assert lookups(found, "hit") == 2
    assert writes(found, "written") == 0  # a shared hit is copied locally, not shared again
    assert found[("tproxy_shared_store_up", ())] == 1
    assert writes(await metrics(first_host), "written") == 2
    documented = (Path(__file__).parent.parent / "docs" / "telemetry.md").read_text()
    for name, _ in found:
        if name.startswith("tproxy_shared_store"):
            family = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert f"`{family}" in documented, name


async def test_redis_expires_a_shared_entry_when_the_entry_does(
    start_proxy: StartProxy, redis: RedisServer
) -> None:
    proxy = await start_proxy(shared_table(redis.url, key_prefix='"fleet:"'))
    await ask(proxy, chat("ttl"))
    keys = redis.command("--scan", "--pattern", "fleet:*").split()
    assert len(keys) == 1
    assert 0 < int(redis.command("PTTL", keys[0])) <= 86400 * 1000


async def test_tenants_stay_apart_across_hosts(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer
) -> None:
    first_host, second_host = await two_hosts(start_proxy, shared_table(redis.url))
    body = chat("whose answer is this")
    alice = {"authorization": "Bearer alice-key"}
    bob = {"authorization": "Bearer bob-key"}
    await ask(first_host, body, alice)
    assert (await ask(second_host, body, bob)).headers["cache-status"] == "tproxy; fwd=miss"
    assert "detail=shared" in (await ask(second_host, body, alice)).headers["cache-status"]
    assert upstream.calls[CHAT] == 2


# What someone else may have left under an entry's key, and how the lookup counts it.
NOT_OURS = {
    "foreign": (("SET", "{key}", "not an entry at all"), "miss"),
    "torn": (("SETRANGE", "{key}", "40", "torn bytes"), "miss"),  # the checksum fails
    "wrong-type": (("RPUSH", "{key}", "a", "list"), "error"),  # GET answers WRONGTYPE
}


@pytest.mark.parametrize("kind", NOT_OURS)
async def test_a_value_that_is_not_a_whole_entry_of_ours_is_a_miss(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer, kind: str
) -> None:
    first_host, second_host = await two_hosts(start_proxy, shared_table(redis.url))
    body = chat(f"overwritten: {kind}")
    await ask(first_host, body)
    (key,) = redis.command("--scan", "--pattern", "tproxy:*").split()
    command, result = NOT_OURS[kind]
    if kind != "torn":
        redis.command("DEL", key)
    redis.command(*(word.format(key=key) for word in command))
    assert (await ask(second_host, body)).headers["cache-status"] == "tproxy; fwd=miss"
    found = await metrics(second_host)
    assert lookups(found, result) == 1
    assert found[("tproxy_shared_store_up", ())] == 1  # one error does not open the breaker
    assert upstream.calls[CHAT] == 2


async def test_only_if_cached_and_max_age_mean_the_same_for_the_shared_tier(
    start_proxy: StartProxy, redis: RedisServer
) -> None:
    first_host, second_host = await two_hosts(start_proxy, shared_table(redis.url))
    third_host = await start_proxy(shared_table(redis.url), store="host-c")
    body = chat("only if cached")
    only_if_cached = {"cache-control": "only-if-cached"}
    assert (await ask(first_host, body, only_if_cached)).status_code == 504
    await ask(first_host, body)
    answer = await ask(second_host, body, only_if_cached)
    assert answer.status_code == 200
    assert "detail=shared" in answer.headers["cache-status"]
    refused = await ask(third_host, body, {"cache-control": "max-age=0"})
    assert refused.headers["cache-status"] == "tproxy; fwd=stale"


async def test_a_tier_down_at_start_is_logged_and_tproxy_serves_without_it(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    nowhere = RedisServer(tmp_path, free_port())
    proxy = await start_proxy(shared_table(nowhere.url, breaker_reset=60))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "is down" in warnings[0]
    body = chat("served anyway")
    assert (await ask(proxy, body)).headers["cache-status"] == "tproxy; fwd=miss"
    assert (await ask(proxy, body)).headers["cache-status"].startswith("tproxy; hit; ttl=")
    async with httpx2.AsyncClient(base_url=proxy.admin_url, timeout=HANG) as http:
        assert (await http.get("/readyz")).status_code == 200
    found = await metrics(proxy)
    assert found[("tproxy_shared_store_up", ())] == 0
    assert found[("tproxy_shared_store_breaker", (("state", "open"),))] == 1
    assert writes(found, "skipped") == 1  # the breaker kept the write from waiting on it
    assert upstream.calls[CHAT] == 1


async def test_a_tier_that_comes_up_later_is_used_after_the_breaker_probes(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    late = RedisServer(tmp_path, free_port())
    proxy = await start_proxy(shared_table(late.url, breaker_reset=0.2))
    late.start()
    try:
        await trio.sleep(0.2)  # the breaker's wait: the next lookup is its probe
        await ask(proxy, chat("after the probe"))
        found = await metrics(proxy)
        assert found[("tproxy_shared_store_up", ())] == 1
        assert writes(found, "written") == 1
    finally:
        late.stop()


async def test_a_killed_and_restarted_tier_costs_nothing_stored_locally(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer
) -> None:
    proxy = await start_proxy(shared_table(redis.url, breaker_reset=0.2))
    kept = chat("kept locally")
    await ask(proxy, kept)
    redis.kill()
    assert (await ask(proxy, kept)).headers["cache-status"].startswith("tproxy; hit; ttl=")
    fresh = chat("asked while the tier is gone")
    assert (await ask(proxy, fresh)).headers["cache-status"] == "tproxy; fwd=miss"
    assert (await ask(proxy, fresh)).headers["cache-status"].startswith("tproxy; hit; ttl=")
    found = await metrics(proxy)
    assert found[("tproxy_shared_store_up", ())] == 0
    assert lookups(found, "error") == 1  # the refused connection opened the breaker at once
    redis.start()
    await trio.sleep(0.2)
    await ask(proxy, chat("after the restart"))
    found = await metrics(proxy)
    assert found[("tproxy_shared_store_up", ())] == 1
    assert upstream.calls[CHAT] == 3


@pytest.mark.parametrize("fault", ["sigstop", "debug-sleep"])
async def test_a_stalled_tier_costs_a_lookup_its_deadline_then_the_breaker_stops_asking(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer, fault: str
) -> None:
    settings = shared_table(
        redis.url, lookup_timeout=0.05, write_timeout=0.2, breaker_failures=2, breaker_reset=60
    )
    first_host, second_host = await two_hosts(start_proxy, settings)
    kept = chat("kept locally on the first host")
    await ask(first_host, kept)
    if fault == "sigstop":
        redis.pause()
    else:
        redis.stall(seconds=3)
    try:
        for index in range(4):
            answer = await ask(second_host, chat(f"stalled {index}"))
            assert answer.headers["cache-status"] == "tproxy; fwd=miss"
        hit = await ask(first_host, kept)
        assert hit.headers["cache-status"].startswith("tproxy; hit; ttl=")
    finally:
        redis.resume()
    found = await metrics(second_host)
    # The first lookup timed out, then so did the write of its answer: two failures in a row.
    assert lookups(found, "timeout") == 1
    assert writes(found, "failed") == 1
    assert lookups(found, "skipped") == 3
    assert writes(found, "skipped") == 3
    assert found[("tproxy_shared_store_breaker", (("state", "open"),))] == 1
    assert upstream.calls[CHAT] == 5


async def test_an_out_of_memory_tier_refuses_writes_and_still_answers_lookups(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer
) -> None:
    first_host, second_host = await two_hosts(start_proxy, shared_table(redis.url))
    before = chat("stored before the tier filled up")
    await ask(first_host, before)
    redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis.command("CONFIG", "SET", "maxmemory", "1")
    after = chat("refused by a full tier")
    await ask(first_host, after)
    assert (await ask(first_host, after)).headers["cache-status"].startswith("tproxy; hit;")
    assert "detail=shared" in (await ask(second_host, before)).headers["cache-status"]
    assert (await ask(second_host, after)).headers["cache-status"] == "tproxy; fwd=miss"
    found = await metrics(first_host)
    assert writes(found, "failed") == 1
    assert found[("tproxy_shared_store_up", ())] == 1
    assert upstream.calls[CHAT] == 3


async def test_an_answer_over_the_tiers_size_limit_stays_local(
    start_proxy: StartProxy, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    proxy = await start_proxy(shared_table(redis.url, max_entry_bytes=100))
    body = chat("too big to share")
    await ask(proxy, body)
    assert (await ask(proxy, body)).headers["cache-status"].startswith("tproxy; hit;")
    assert writes(await metrics(proxy), "too_large") == 1
    assert redis.command("DBSIZE") == "0"
    assert any("not sharing" in record.getMessage() for record in caplog.records)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def cluster_table(addresses: list[str], **extra: object) -> str:
    """A ``[shared_store]`` table for a cluster. Opening one fetches the slot map from its nodes,
    which on a loaded machine can take more than the default second: the tests that are not about
    deadlines give it ten, and writes five, so a slow start is never taken for a missing answer."""
    listed = ", ".join(f'"{address}"' for address in addresses)
    extra = {"lookup_timeout": 5, "write_timeout": 5, "connect_timeout": 10, **extra}
    return table_of(f"cluster_nodes = [{listed}]", extra)


def sentinel_table(sentinel: RedisSentinel, **extra: object) -> str:
    """A ``[shared_store]`` table for the primary ``sentinel`` watches; seconds, as a cluster's."""
    extra = {"lookup_timeout": 5, "write_timeout": 5, "connect_timeout": 10, **extra}
    where = f'sentinels = ["127.0.0.1:{sentinel.port}"]\nsentinel_primary = "{sentinel.name}"'
    return table_of(where, extra)


@pytest.mark.slow
async def test_hosts_share_answers_through_a_redis_cluster(
    start_proxy: StartProxy, upstream: FakeUpstream, cluster: RedisCluster
) -> None:
    """Each entry is one key in its own slot: answers land on every node, and the second host,
    told of one node only, finds them all."""
    first_host = await start_proxy(cluster_table(cluster.addresses), store="host-a")
    second_host = await start_proxy(cluster_table(cluster.addresses[:1]), store="host-b")
    bodies = [chat(f"question {index}") for index in range(12)]
    answers = [await ask(first_host, body) for body in bodies]
    for body, answer in zip(bodies, answers, strict=True):
        shared = await ask(second_host, body)
        assert "detail=shared" in shared.headers["cache-status"]
        assert shared.content == answer.content
    assert upstream.calls[CHAT] == len(bodies)
    held = [int(node.command("DBSIZE")) for node in cluster.nodes]
    assert sum(held) == len(bodies)
    assert all(held), f"entries by node: {held}"


async def test_a_cluster_down_at_start_is_logged_and_tproxy_serves_without_it(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    proxy = await start_proxy(cluster_table([f"127.0.0.1:{free_port()}"], connect_timeout=1))
    assert any("is down" in record.getMessage() for record in caplog.records)
    body = chat("served without the cluster")
    await ask(proxy, body)
    assert (await ask(proxy, body)).headers["cache-status"].startswith("tproxy; hit; ttl=")
    assert (await metrics(proxy))[("tproxy_shared_store_up", ())] == 0


async def test_the_password_comes_from_the_variable_password_env_names(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guarded = RedisServer(tmp_path)
    guarded.start("--requirepass", "fleet-secret")
    try:
        monkeypatch.setenv("TPROXY_TEST_REDIS_PASSWORD", "fleet-secret")
        table = shared_table(guarded.url, password_env='"TPROXY_TEST_REDIS_PASSWORD"')
        assert await shared_between_two_hosts(start_proxy, table, "behind a password")
    finally:
        guarded.stop()


async def test_an_unset_password_variable_stops_tproxy_at_start(
    start_proxy: StartProxy, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TPROXY_TEST_REDIS_PASSWORD", raising=False)
    table = shared_table(redis.url, password_env='"TPROXY_TEST_REDIS_PASSWORD"')
    with pytest.raises(ConfigError, match="TPROXY_TEST_REDIS_PASSWORD is not set"):
        await start_proxy(table)


async def test_a_unix_socket_url_reaches_the_tier(start_proxy: StartProxy, tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    local = RedisServer(tmp_path)
    local.start("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    try:
        table = shared_table(f"unix://{socket_path}")
        assert await shared_between_two_hosts(start_proxy, table, "over a unix socket")
    finally:
        local.stop()


@pytest.mark.parametrize("tier", ["up", "down", "stalled"])
async def test_a_server_with_a_shared_tier_stops_when_told(
    start_proxy: StartProxy, redis: RedisServer, tier: str
) -> None:
    """The tier's client task and its writer end with the server, whatever the tier does."""
    if tier == "down":
        redis.kill()
    proxy = await start_proxy(shared_table(redis.url, breaker_reset=60, write_timeout=0.5))
    await ask(proxy, chat("stored before the stop"))
    if tier == "stalled":
        redis.pause()
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=HANG) as http:
            await http.post(CHAT, json=chat("its shared write will stall"))
    proxy.stop.set()
    with trio.fail_after(HANG):
        await proxy.stopped.wait()


@pytest.mark.slow
async def test_two_tproxy_processes_share_an_answer_and_a_stop_drains_the_shared_writes(
    nursery: trio.Nursery, tmp_path: Path, upstream: FakeUpstream, redis: RedisServer
) -> None:
    """Real ``tproxy serve`` processes, one host after the other: the first one's SIGTERM
    drains its shared queue before it exits, and the second one's first request is a hit."""
    table = shared_table(redis.url)
    body = chat("asked of two processes", stream=True)
    answers: list[httpx2.Response] = []
    for host in ("host-a", "host-b"):
        (tmp_path / host).mkdir()
        async with (
            running_tproxy(nursery, tmp_path / host, upstream, 5.0, table) as tproxy,
            httpx2.AsyncClient(base_url=tproxy.url, timeout=HANG) as http,
        ):
            answers.append(await http.post(CHAT, json=body))
            tproxy.process.send_signal(signal.SIGTERM)
            assert await tproxy.exit_code(within=HANG) == 0
    fetched, shared = answers
    assert fetched.headers["cache-status"] == "tproxy; fwd=miss"
    assert "detail=shared" in shared.headers["cache-status"]
    assert shared.content == fetched.content
    assert upstream.calls[CHAT] == 1


def tls_files(tmp_path: Path) -> TlsFiles:
    """A new CA, and a certificate it issued for 127.0.0.1 with its key."""
    authority = trustme.CA()
    cert, key = write_pair(authority.issue_cert("127.0.0.1"), tmp_path / "tls")
    return TlsFiles(cert, key, write_ca(authority, tmp_path / "tls" / "ca.pem"))


async def untrusting_host_is_served_without_the_tier(
    start_proxy: StartProxy, table: str, caplog: pytest.LogCaptureFixture, words: str
) -> None:
    """Without the CA, the servers' certificates are refused: the tier is down, tproxy serves."""
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    untrusting = await start_proxy(table, store="host-c")
    assert any("is down" in record.getMessage() for record in caplog.records)
    answer = await ask(untrusting, chat(words))
    assert answer.headers["cache-status"] == "tproxy; fwd=miss"


async def test_a_rediss_url_checks_the_servers_certificate_against_ca_file(
    start_proxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = tls_files(tmp_path)
    secure = RedisServer(tmp_path, tls=files)
    secure.start()
    try:
        url = f"rediss://127.0.0.1:{secure.port}/0"
        table = shared_table(url, ca_file=f'"{files.ca}"')
        assert await shared_between_two_hosts(start_proxy, table, "over TLS")
        await untrusting_host_is_served_without_the_tier(
            start_proxy, shared_table(url), caplog, "over TLS"
        )
    finally:
        secure.stop()


@pytest.mark.slow
async def test_a_cluster_with_tls_is_reached_over_tls_and_its_certificates_checked(
    start_proxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Managed clusters (ElastiCache, Memorystore) encrypt in transit: every node, the ones the
    slot map names as well as the one listed, is reached over TLS against ``ca_file``."""
    files = tls_files(tmp_path)
    secure = RedisCluster(tmp_path, tls=files)
    secure.start()
    try:
        table = cluster_table(secure.addresses[:1], tls="true", ca_file=f'"{files.ca}"')
        first_host, second_host = await two_hosts(start_proxy, table)
        bodies = [chat(f"question {index} over TLS") for index in range(6)]
        for body in bodies:
            await ask(first_host, body)
            assert "detail=shared" in (await ask(second_host, body)).headers["cache-status"]
        assert all(int(node.command("DBSIZE")) for node in secure.nodes), "not on every node"
        untrusting = cluster_table(secure.addresses[:1], tls="true", connect_timeout=2)
        await untrusting_host_is_served_without_the_tier(
            start_proxy, untrusting, caplog, "question 0 over TLS"
        )
    finally:
        secure.stop()


@contextmanager
def watched_primary(
    tmp_path: Path,
    *,
    tls: TlsFiles | None = None,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Iterator[RedisSentinel]:
    """A primary and the sentinel that watches it, both stopped on leaving."""
    primary = RedisServer(tmp_path, tls=tls)
    sentinel = RedisSentinel(tmp_path, primary, primary_password=password)
    try:
        primary.start(*(("--requirepass", password) if password else ()))
        sentinel.start(*(("--requirepass", sentinel_password) if sentinel_password else ()))
        if sentinel_password:
            sentinel.cli_options += ("-a", sentinel_password, "--no-auth-warning")
        yield sentinel
    finally:
        sentinel.stop()
        primary.stop()


@pytest.mark.slow
async def test_after_a_failover_the_tier_is_where_the_sentinels_say(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The primary dies; the sentinel promotes its replica. What was stored before is found
    there, and a host that kept running writes there too: no setting changed, no restart."""
    primary, replica = RedisServer(tmp_path), RedisServer(tmp_path)
    primary.start()
    replica.start("--replicaof", "127.0.0.1", str(primary.port))
    sentinel = RedisSentinel(tmp_path, primary)
    sentinel.start()
    try:
        table = sentinel_table(sentinel)
        running = await start_proxy(table, store="host-a")
        await ask(running, chat("before the failover"))
        assert primary.command("WAIT", "1", "5000") == "1"  # the replica holds it too
        primary.kill()
        sentinel.wait_for_primary(replica)
        asked: list[str] = []
        while replica.command("DBSIZE") == "1":  # each connection to the dead primary fails once
            assert len(asked) < 5, "the running host's writes never reached the new primary"
            asked.append(f"after the failover {len(asked)}")
            await ask(running, chat(asked[-1]))
        started_after = await start_proxy(table, store="host-b")
        for words in ("before the failover", asked[-1]):
            answer = await ask(started_after, chat(words))
            assert "detail=shared" in answer.headers["cache-status"], words
        assert upstream.calls[CHAT] == 1 + len(asked)
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


async def test_with_tls_the_sentinels_and_the_primary_are_reached_over_tls(
    start_proxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = tls_files(tmp_path)
    with watched_primary(tmp_path, tls=files) as sentinel:
        table = sentinel_table(sentinel, tls="true", ca_file=f'"{files.ca}"')
        assert await shared_between_two_hosts(start_proxy, table, "sentinels over TLS")
        untrusting = sentinel_table(sentinel, tls="true", connect_timeout=2)
        await untrusting_host_is_served_without_the_tier(
            start_proxy, untrusting, caplog, "sentinels over TLS"
        )


async def test_sentinels_that_ask_for_a_password_get_the_one_sentinel_password_env_names(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watched_primary(
        tmp_path, password="data-secret", sentinel_password="sentinel-secret"
    ) as sentinel:
        monkeypatch.setenv("TPROXY_TEST_REDIS_PASSWORD", "data-secret")
        monkeypatch.setenv("TPROXY_TEST_SENTINEL_PASSWORD", "sentinel-secret")
        table = sentinel_table(
            sentinel,
            password_env='"TPROXY_TEST_REDIS_PASSWORD"',
            sentinel_password_env='"TPROXY_TEST_SENTINEL_PASSWORD"',
        )
        assert await shared_between_two_hosts(start_proxy, table, "behind two passwords")


async def test_a_rediss_ca_file_that_cannot_be_used_is_named_with_tls_pys_reason(
    tmp_path: Path,
) -> None:
    """check-config refuses such a file; one that changed since is refused at start, by the
    setting's name and with the reason an upstream's ca_file gets (tls.upstream_context)."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("no certificate here\n")
    settings = SharedStoreSettings(url="rediss://127.0.0.1:1/0", ca_file=bundle)
    refused = r"^shared_store\.ca_file: cannot load the CA bundle .*ca\.pem"
    with pytest.raises(ConfigError, match=refused):
        SharedTier(settings)
    with pytest.raises(ConfigError, match=refused):
        async with open_shared_admin(settings):
            pass


async def test_a_tier_killed_in_the_middle_of_a_lookup_is_a_miss(
    start_proxy: StartProxy, upstream: FakeUpstream, redis: RedisServer
) -> None:
    proxy = await start_proxy(shared_table(redis.url, breaker_reset=60))
    redis.pause()
    async with trio.open_nursery() as nursery:
        answers: list[httpx2.Response] = []

        async def ask_once() -> None:
            answers.append(await ask(proxy, chat("asked while the tier dies")))

        nursery.start_soon(ask_once)
        await trio.testing.wait_all_tasks_blocked()  # the lookup waits on the stopped server
        redis.kill()
    (answer,) = answers
    assert answer.headers["cache-status"] == "tproxy; fwd=miss"
    assert lookups(await metrics(proxy), "error") == 1
    assert upstream.calls[CHAT] == 1


async def test_a_tier_that_stays_down_is_logged_once_not_at_every_probe(
    start_proxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    nowhere = RedisServer(tmp_path, free_port())
    proxy = await start_proxy(shared_table(nowhere.url, breaker_reset=0.05))
    for index in range(3):
        await trio.sleep(0.05)  # the breaker's wait: the next lookup is a probe, and fails
        await ask(proxy, chat(f"probe {index}"))
    assert lookups(await metrics(proxy), "error") == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1  # the one at start
    assert "is down" in warnings[0]


async def tier_down_at_start(
    proxy: RunningProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> str:
    """``proxy``'s tier was down when it started: logged once (the line is returned), and
    requests are served from the local store with the breaker keeping them from waiting on
    the tier."""
    body = chat("served without the sentinels' primary")
    assert (await ask(proxy, body)).headers["cache-status"] == "tproxy; fwd=miss"
    assert (await ask(proxy, body)).headers["cache-status"].startswith("tproxy; hit; ttl=")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # no "refused a write" line per write
    assert "is down" in warnings[0]
    found = await metrics(proxy)
    assert found[("tproxy_shared_store_up", ())] == 0
    assert found[("tproxy_shared_store_breaker", (("state", "open"),))] == 1
    assert writes(found, "skipped") == 1
    assert upstream.calls[CHAT] == 1
    return warnings[0]


async def test_sentinels_all_down_at_start_are_a_tier_down(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No sentinel answers, so no primary is found: as a server that does not answer, not as
    a server that refused each write."""
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    where = f'sentinels = ["127.0.0.1:{free_port()}"]\nsentinel_primary = "tproxy"'
    proxy = await start_proxy(table_of(where, {"breaker_reset": 60}))
    await tier_down_at_start(proxy, upstream, caplog)


async def test_a_primary_the_sentinels_name_that_is_a_replica_is_a_tier_down(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """coredis asks the server the sentinels name for its role and refuses a replica (a stale
    primary): no server took the command, the tier is down until a probe finds a primary."""
    caplog.set_level(logging.INFO, logger="tproxy.shared_store")
    primary, replica = RedisServer(tmp_path), RedisServer(tmp_path)
    sentinel = RedisSentinel(tmp_path, replica)  # watching the replica as if it were a primary
    try:
        primary.start()
        replica.start("--replicaof", "127.0.0.1", str(primary.port))
        sentinel.start()
        proxy = await start_proxy(sentinel_table(sentinel, breaker_reset=60))
        assert "reports a role of 'slave'" in await tier_down_at_start(proxy, upstream, caplog)
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()
