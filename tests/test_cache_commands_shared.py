"""`tproxy cache stats|ls|show|purge --tier shared` against a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redisserver import RedisSentinel, RedisServer, free_port, needs_redis
from tests.test_cache_commands import BODY_KEY, HOUR, STREAM_KEY, body, run, stream
from tproxy.core.entry import encode_entry

pytestmark = needs_redis

NOW_TTL_MS = 3_600_000
# The server's own settings file is what the commands read: it names an upstream too.
UPSTREAM = '[upstreams.local]\nurl = "http://127.0.0.1:8081"\n'


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server holding a fresh stream, a two-hour-old body and a value that is no entry."""
    server = RedisServer(tmp_path)
    server.start()
    now = time.time()
    server.put(f"fleet:{STREAM_KEY}", encode_entry(stream(now - 60)), NOW_TTL_MS)
    server.put(f"fleet:{BODY_KEY}", encode_entry(body(now - 2 * HOUR, now + HOUR)), NOW_TTL_MS)
    server.put("fleet:not-ours", b"someone else's value", NOW_TTL_MS)
    server.put("other:unrelated", b"outside the prefix", NOW_TTL_MS)
    try:
        yield server
    finally:
        server.stop()


def config_for(tmp_path: Path, url: str) -> Path:
    return config_where(tmp_path, f'url = "{url}"')


def config_where(tmp_path: Path, where: str) -> Path:
    path = tmp_path / "tproxy.toml"
    path.write_text(UPSTREAM + f'[shared_store]\n{where}\nkey_prefix = "fleet:"\n')
    return path


def shared(argv: list[str], config: Path) -> int:
    return run([*argv, "--tier", "shared", "--config", str(config)], config.parent / "unused")


def test_stats_counts_the_entries_under_the_prefix_and_the_values_that_are_not(
    redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shared(["stats", "--json"], config_for(tmp_path, redis.url)) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["entries"] == 2
    assert document["streamed_entries"] == 1
    assert document["foreign_values"] == 1
    assert document["where"] == redis.url


def test_ls_and_show_read_the_shared_entries(
    redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, redis.url)
    assert shared(["ls", "--json"], config) == 0
    listed = json.loads(capsys.readouterr().out)["entries"]
    assert [entry["key"] for entry in listed] == [STREAM_KEY, BODY_KEY]
    assert "last_used_at" not in listed[0]
    assert shared(["ls"], config) == 0
    assert STREAM_KEY[:16] in capsys.readouterr().out
    assert shared(["show", STREAM_KEY[:10]], config) == 0
    shown = capsys.readouterr().out
    assert "stream, 4 events in 5 frames" in shown
    assert "last used" not in shown


def test_the_commands_find_the_primary_the_sentinels_name(
    redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = RedisSentinel(tmp_path, redis)
    sentinel.start()
    try:
        sentinels = f'sentinels = ["127.0.0.1:{sentinel.port}"]'
        config = config_where(tmp_path, f'{sentinels}\nsentinel_primary = "{sentinel.name}"')
        assert shared(["stats", "--json"], config) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["entries"] == 2
        assert document["where"] == f"primary 'tproxy' of sentinels 127.0.0.1:{sentinel.port}"
    finally:
        sentinel.stop()


def test_purge_older_than_removes_old_entries_and_all_removes_everything_under_the_prefix(
    redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, redis.url)
    assert shared(["purge", "--older-than", "1h"], config) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert redis.command("EXISTS", f"fleet:{BODY_KEY}") == "0"
    assert shared(["purge", "--all"], config) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert redis.command("--scan", "--pattern", "*").split() == ["other:unrelated"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["verify", "--tier", "shared"], "verify checks the local store"),
        (["stats", "--tier", "shared"], "--tier shared needs --config FILE"),
    ],
)
def test_what_the_shared_tier_cannot_do_is_a_usage_error(
    argv: list[str], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv, tmp_path) == 2
    assert problem in capsys.readouterr().err


def test_a_config_without_a_shared_store_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text(UPSTREAM)
    assert shared(["stats"], config) == 2
    assert "has no [shared_store] table" in capsys.readouterr().err


def test_a_tier_that_is_down_fails_with_its_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert shared(["stats"], config_for(tmp_path, url)) == 1
    assert f"shared store {url}" in capsys.readouterr().err
