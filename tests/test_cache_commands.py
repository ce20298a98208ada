"""`tproxy cache stats|ls|show|purge` against a real store, in human and JSON form."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import pytest

from tproxy.cache_commands import (
    add_cache_parser,
    format_age,
    format_size,
    parse_duration,
    run_cache_command,
)
from tproxy.core.entry import StoredEntry
from tproxy.store import LmdbStore

HOUR = 3600.0


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


STREAM_KEY = key_of("stream")
BODY_KEY = key_of("body")
EXPIRED_KEY = key_of("expired")


def stream(created_at: float) -> StoredEntry:
    frames = (
        b": keep-alive\n\n",
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n',
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    )
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"text/event-stream"),),
        chunks=frames,
        offsets=tuple(0.1 * n for n in range(len(frames))),
        streamed=True,
        created_at=created_at,
        expires_at=math.inf,
        model="llama-3",
    )


def body(created_at: float, expires_at: float, text: bytes = b'{"object":"list"}') -> StoredEntry:
    return StoredEntry(
        status=200,
        headers=((b"content-type", b"application/json"),),
        chunks=(text,),
        offsets=(0.0,),
        streamed=False,
        created_at=created_at,
        expires_at=expires_at,
        model="embedder",
    )


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A store with a fresh stream, a two-hour-old body and an expired body."""
    now = time.time()
    path = tmp_path / "cache"
    store = LmdbStore(path, max_total_bytes=1 << 20, max_entry_bytes=1 << 19)
    store.put_many(
        [
            (STREAM_KEY, stream(now - 60)),
            (BODY_KEY, body(now - 2 * HOUR, now + HOUR, b"x" * 5000)),
            (EXPIRED_KEY, body(now - 3 * HOUR, now - HOUR)),
        ],
        now,
    )
    store.close()
    return path


def run(argv: list[str], default_dir: Path) -> int:
    parser = argparse.ArgumentParser(prog="tproxy")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    return run_cache_command(parser.parse_args(["cache", *argv]), default_dir)


def run_json(argv: list[str], cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> object:
    assert run([*argv, "--json", "--cache-dir", str(cache_dir)], cache_dir / "unused") == 0
    return json.loads(capsys.readouterr().out)


def remaining(cache_dir: Path) -> set[str]:
    store = LmdbStore.open_existing(cache_dir)
    keys = {info.key for info in store.entries()}
    store.close()
    return keys


# -- stats ----------------------------------------------------------------------------


def test_stats_reads_the_configured_directory_by_default(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["stats"], cache_dir) == 0
    out = capsys.readouterr().out
    assert f"path            {cache_dir}" in out
    assert "entries         3 (1 streamed, 1 expired)" in out
    assert "of 1.0 MiB" in out
    assert "oldest entry    3h 0m old" in out


def test_stats_as_json(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(["stats"], cache_dir, capsys)
    assert isinstance(document, dict)
    assert document["entries"] == 3
    assert document["expired_entries"] == 1
    assert document["streamed_entries"] == 1
    assert document["max_bytes"] == 1 << 20
    assert document["bytes"] > 5000


# -- ls -------------------------------------------------------------------------------


def test_ls_lists_newest_first_with_short_keys(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["ls", "--cache-dir", str(cache_dir)], cache_dir / "unused") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("KEY" + " " * 15 + "STATUS")
    assert "LAST USED" in header
    assert [row.split()[0] for row in rows] == [STREAM_KEY[:16], BODY_KEY[:16], EXPIRED_KEY[:16]]
    assert "stream" in rows[0]
    assert "never" in rows[0]
    assert "KiB" in rows[1]
    assert "2h 0m" in rows[1]
    assert "expired 1h 0m ago" in rows[2]
    assert len({row.index("200") for row in rows}) == 1  # columns line up


def test_ls_as_json_has_full_keys_and_null_for_no_expiry(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = run_json(["ls"], cache_dir, capsys)
    assert isinstance(document, dict)
    by_key = {entry["key"]: entry for entry in document["entries"]}
    assert set(by_key) == {STREAM_KEY, BODY_KEY, EXPIRED_KEY}
    assert by_key[STREAM_KEY]["expires_at"] is None
    assert by_key[STREAM_KEY]["streamed"] is True
    assert by_key[EXPIRED_KEY]["expired"] is True
    assert by_key[BODY_KEY]["model"] == "embedder"


def test_ls_of_an_empty_store_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    LmdbStore(tmp_path / "empty", max_total_bytes=1 << 20, max_entry_bytes=1 << 19).close()
    assert run(["ls"], tmp_path / "empty") == 0
    assert capsys.readouterr().out.startswith("no entries in")


# -- show -----------------------------------------------------------------------------


def test_show_finds_a_stream_by_prefix_and_prints_its_first_events(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["show", STREAM_KEY[:6]], cache_dir) == 0
    out = capsys.readouterr().out
    assert STREAM_KEY in out
    assert "stream, 4 events in 5 frames" in out
    assert "header     content-type: text/event-stream" in out
    data_lines = out.split("first data lines:\n")[1].splitlines()
    assert data_lines[0] == '  data: {"choices":[{"delta":{"content":"Hel"}}]}'
    assert len(data_lines) == 3


def test_show_a_body_previews_it(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["show", BODY_KEY], cache_dir) == 0
    out = capsys.readouterr().out
    assert "kind       body" in out
    assert "x" * 100 in out
    assert "x" * 200 not in out


def test_show_as_json(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(["show", STREAM_KEY[:10]], cache_dir, capsys)
    assert isinstance(document, dict)
    assert document["key"] == STREAM_KEY
    assert document["events"] == 4
    assert document["headers"] == {"content-type": "text/event-stream"}
    assert len(document["first_data_lines"]) == 3


def test_show_an_unknown_key_fails(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["show", "zzzz"], cache_dir) == 1
    assert "no cache entry matches 'zzzz'" in capsys.readouterr().err


def test_show_an_ambiguous_prefix_is_a_usage_error(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["show", ""], cache_dir) == 2
    assert "3 cache entries start with ''" in capsys.readouterr().err


# -- purge ----------------------------------------------------------------------------


def test_purge_older_than_removes_old_and_expired_entries(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["purge", "--older-than", "1h30m"], cache_dir) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert remaining(cache_dir) == {STREAM_KEY}


def test_purge_only_drops_expired_entries_when_the_rest_are_young(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_json(["purge", "--older-than", "7d"], cache_dir, capsys) == {"removed": 1}
    assert remaining(cache_dir) == {STREAM_KEY, BODY_KEY}


def test_purge_all_empties_the_store(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["purge", "--all"], cache_dir) == 0
    assert "removed 3 entries (every entry)" in capsys.readouterr().out
    assert remaining(cache_dir) == set()


def test_purge_needs_a_choice(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["purge"], cache_dir) == 2
    assert "--older-than DURATION or --all" in capsys.readouterr().err
    assert len(remaining(cache_dir)) == 3


def test_purge_with_a_bad_duration_is_a_usage_error(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["purge", "--older-than", "soon"], cache_dir) == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_purge_refuses_both_choices_at_once(cache_dir: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["purge", "--all", "--older-than", "1h"], cache_dir)
    assert exit_info.value.code == 2


# -- verify ---------------------------------------------------------------------------


def test_verify_a_sound_store_says_clean_and_exits_0(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["verify"], cache_dir) == 0
    out = capsys.readouterr().out
    assert f"path     {cache_dir}" in out
    assert "entries  3 (1 streamed, 1 expired)" in out
    assert "result   clean" in out


def test_verify_as_json(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(["verify"], cache_dir, capsys)
    assert isinstance(document, dict)
    assert document["ok"] is True
    assert document["problems"] == []
    assert (document["entries"], document["streamed"], document["expired"]) == (3, 1, 1)
    assert document["bytes"] == document["recorded_bytes"] > 5000


def test_verify_lists_each_problem_and_exits_1(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray((cache_dir / "data.mdb").read_bytes())
    offset = data.index(b"x" * 5000) + 2500  # inside the 5,000-byte body
    data[offset] ^= 0xFF
    (cache_dir / "data.mdb").write_bytes(bytes(data))

    assert run(["verify"], cache_dir) == 1
    out = capsys.readouterr().out
    assert "result   1 problem\n" in out
    assert f"  entry {BODY_KEY}: cannot be decoded (" in out

    assert run(["verify", "--json", "--cache-dir", str(cache_dir)], cache_dir) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    [problem] = document["problems"]
    assert problem.startswith(f"entry {BODY_KEY}: cannot be decoded")


def test_verify_never_writes(cache_dir: Path) -> None:
    before = (cache_dir / "data.mdb").read_bytes()
    assert run(["verify"], cache_dir) == 0
    assert (cache_dir / "data.mdb").read_bytes() == before


# -- no store -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["stats"], ["ls"], ["show", "abc"], ["verify"], ["purge", "--all"]],
    ids=lambda a: a[0],
)
def test_a_missing_store_is_reported_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert run(argv, missing) == 1
    assert f"no cache store at {missing}" in capsys.readouterr().err
    assert not missing.exists()


# -- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("0", 0),
        ("2.5", 2.5),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("1d12h", 129600),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        (" 15M ", 900),
        ("1.5h", 5400),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "-5", "5x", "12h1d", "1h1h", "1 h", "1h 30m", "soon", "1e3", "5ms"]
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (12_595, "12.3 KiB"), (3 << 30, "3.0 GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (45, "45s"), (725, "12m 5s"), (11_520, "3h 12m"), (183_600, "2d 3h")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text
