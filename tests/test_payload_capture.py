"""The payload log of live answers, through real Hypercorn: each client's record, and one decode.

A flight's reader decodes its stream (SSE, or NDJSON for Ollama) once; the frames travel with the
chunks to every client of the flight, and each client's payload capture reads them from there.
So however many clients share a flight, the stream is decoded once, and each client's record
holds the answer it was sent, as a capture decoding that client's bytes by itself would have
built it. A replay decodes the stored bytes once (the entry keeps bytes, not events). A whole
(JSON) answer is not decoded: its record is built from its bytes, live and replayed.

The upstream is the family fake (tests/familyupstreams.py), paced so that followers join the
flight mid-stream: they receive the history first, then the live chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import trio

from tests.conftest import StartProxy
from tests.fakeupstream import SeenRequest
from tests.familyupstreams import FamilyUpstream
from tests.faults.scripted import LAST_CHUNK, ScriptedUpstream, chunked, response_head
from tests.test_families import STREAMS, WHOLE, WORDS
from tproxy.core.assemble import DEFAULT_MAX_CHARS
from tproxy.core.dialects import Dialect, dialect_for
from tproxy.core.dialects.base import Decoder
from tproxy.core.sse import Frame
from tproxy.telemetry import PayloadCapture

CHAT = "/v1/chat/completions"
EVERY_STREAM = [
    pytest.param(
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": WORDS}], "stream": True},
        id="openai-chat",
    ),
    *STREAMS,
]
FOLLOWERS = 3


@dataclass
class DecodeCount:
    """What every decoder made while the spy was on did: how many, and the bytes they took."""

    decoders: int = 0
    bytes_fed: int = 0


class _CountedDecoder:
    def __init__(self, decoder: Decoder, count: DecodeCount) -> None:
        self._decoder = decoder
        self._count = count

    @property
    def failed(self) -> str | None:
        return self._decoder.failed

    def feed(self, data: bytes) -> list[Frame]:
        self._count.bytes_fed += len(data)
        return self._decoder.feed(data)

    def close(self) -> list[Frame]:
        return self._decoder.close()


def count_decoding(monkeypatch: pytest.MonkeyPatch) -> DecodeCount:
    """Count every decoder a family's dialect makes from now on (the reader's, a capture's)."""
    count = DecodeCount()
    make = Dialect.decoder

    def counted(
        dialect: Dialect, headers: Iterable[tuple[bytes, bytes]], max_line_bytes: int
    ) -> Decoder | None:
        decoder = make(dialect, headers, max_line_bytes)
        if decoder is None:
            return None
        count.decoders += 1
        return _CountedDecoder(decoder, count)

    monkeypatch.setattr(Dialect, "decoder", counted)
    return count


@pytest.fixture
async def family(nursery: trio.Nursery) -> FamilyUpstream:
    fake = FamilyUpstream()
    await nursery.start(fake.serve)
    return fake


def payload_toml(tmp_path: Path) -> str:
    return f'[payload_log]\nenabled = true\nfile = "{tmp_path / "payload.jsonl"}"\n'


def payload_records(tmp_path: Path) -> list[dict[str, object]]:
    """The ``data`` of every payload record written so far (after ``RunningProxy.flush``)."""
    lines = (tmp_path / "payload.jsonl").read_text().splitlines()
    return [json.loads(line)["data"] for line in lines]


def answer_decoded_alone(path: str, request: bytes, headers: httpx2.Headers, body: bytes) -> object:
    """The payload record's response for ``body`` as a capture that decodes the client's bytes
    itself (feeding them whole, then the end) builds it: what each record must still say."""
    dialect = dialect_for(path)
    capture = PayloadCapture(request, raw_events=False, max_bytes=1 << 20, dialect=dialect)
    decoder = dialect.decoder(list(headers.raw), 1 << 20)
    assert decoder is not None
    for frame in decoder.feed(body) + decoder.close():
        if frame.event is not None:
            capture.observe_event(frame.event)
    answer = capture.finish().answer
    assert answer is not None
    return json.loads(json.dumps(answer.to_json()))


@pytest.mark.parametrize(("path", "body"), EVERY_STREAM)
async def test_coalesced_clients_each_get_their_record_from_one_decode_of_the_stream(
    start_proxy: StartProxy,
    family: FamilyUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, object],
) -> None:
    proxy = await start_proxy(payload_toml(tmp_path), upstream_url=family.url)
    count = count_decoding(monkeypatch)
    knobs = {"x-fake-delay": "0.1"}
    followers: list[httpx2.Response] = []
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:

        async def follow() -> None:
            followers.append(await http.post(path, json=body, headers=knobs))

        async with (
            http.stream("POST", path, json=body, headers=knobs) as leader,
            aclosing(leader.aiter_raw()) as chunks,
        ):
            first = await anext(chunks)
            async with trio.open_nursery() as nursery:
                for _ in range(FOLLOWERS):
                    nursery.start_soon(follow)
                leader_body = first + b"".join([chunk async for chunk in chunks])
    await proxy.flush()
    assert family.calls[path] == 1
    assert [f.headers["cache-status"] for f in followers] == [
        "tproxy; fwd=miss; collapsed"
    ] * FOLLOWERS
    assert all(follower.content == leader_body for follower in followers)
    # One decoder for the flight, fed each byte once: no client decoded the stream again.
    assert (count.decoders, count.bytes_fed) == (1, len(leader_body))

    records = payload_records(tmp_path)
    assert len(records) == 1 + FOLLOWERS
    request = json.dumps(body).encode()
    expected = answer_decoded_alone(path, request, leader.headers, leader_body)
    for record in records:
        assert record["request"] == body
        assert record["response"] == expected
        assert record["truncated"] is False
    response = records[0]["response"]
    assert isinstance(response, dict)
    assert response["choices"][0]["text"] == WORDS
    assert response["done"] is True


@pytest.mark.parametrize(("path", "body"), EVERY_STREAM)
async def test_a_replay_decodes_the_stored_stream_once_for_its_record(
    start_proxy: StartProxy,
    family: FamilyUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, object],
) -> None:
    proxy = await start_proxy(payload_toml(tmp_path), upstream_url=family.url)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
        live = await http.post(path, json=body)
        await proxy.flush()
        count = count_decoding(monkeypatch)
        hit = await http.post(path, json=body)
    await proxy.flush()
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    assert hit.content == live.content
    assert (count.decoders, count.bytes_fed) == (1, len(hit.content))
    live_record, hit_record = payload_records(tmp_path)
    assert hit_record["response"] == live_record["response"]


@pytest.mark.parametrize(("path", "body"), WHOLE)
async def test_a_whole_answers_record_is_built_from_its_bytes_live_and_replayed(
    start_proxy: StartProxy,
    family: FamilyUpstream,
    tmp_path: Path,
    path: str,
    body: dict[str, object],
) -> None:
    proxy = await start_proxy(payload_toml(tmp_path), upstream_url=family.url)
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
        live = await http.post(path, json=body)
        await proxy.flush()
        hit = await http.post(path, json=body)
    await proxy.flush()
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    answer = dialect_for(path).whole_answer(live.content, DEFAULT_MAX_CHARS)
    expected = json.loads(json.dumps(answer.to_json()))
    assert [record["response"] for record in payload_records(tmp_path)] == [expected, expected]


async def ndjson_without_its_last_line_ending(
    stream: trio.SocketStream, request: SeenRequest
) -> None:
    """Ollama's stream, but its last line (``"done": true``) has no line ending."""
    lines = [
        b'{"model":"m","message":{"role":"assistant","content":"one"},"done":false}\n',
        b'{"model":"m","message":{"role":"assistant","content":""},"done":true,'
        b'"done_reason":"stop","prompt_eval_count":1,"eval_count":1}',
    ]
    await stream.send_all(response_head(content_type=b"application/x-ndjson"))
    await stream.send_all(b"".join(chunked(line) for line in lines) + LAST_CHUNK)


async def test_the_live_record_holds_the_line_the_end_of_the_stream_completes(
    start_proxy: StartProxy, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A last line without its LF is an event only once the body has ended (the decoder's
    ``close()``); the live record reads it, as the replayed one always did."""
    upstream = ScriptedUpstream(ndjson_without_its_last_line_ending)
    await nursery.start(upstream.serve)
    proxy = await start_proxy(payload_toml(tmp_path), upstream_url=upstream.url)
    body = {"model": "m", "messages": [{"role": "user", "content": "one"}]}
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=20) as http:
        live = await http.post("/api/chat", json=body, headers={"x-fault": "1"})
        await proxy.flush()
        hit = await http.post("/api/chat", json=body)
    await proxy.flush()
    assert hit.headers["cache-status"].startswith("tproxy; hit")
    assert hit.content == live.content
    live_record, hit_record = payload_records(tmp_path)
    assert live_record["response"] == hit_record["response"]
    response = live_record["response"]
    assert isinstance(response, dict)
    assert (response["choices"][0]["text"], response["done"]) == ("one", True)
