"""Telemetry: access lines, payload sinks and metrics, and proof that none of it makes clients wait.

Exchanges are built by applying the facts of ``core/events.py``, as the pipeline does. HTTP sinks
talk to a real h11 server on 127.0.0.1; where a test waits, it waits for an event or for
``Telemetry.flush()``, never for the clock.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from platform import python_version

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_on_loopback
from tproxy import __version__
from tproxy.config import (
    CacheSettings,
    LogSettings,
    PayloadLogSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    TelemetrySettings,
    UpstreamSettings,
)
from tproxy.core.cachekey import tenant_namespace
from tproxy.core.cachestatus import CacheStatus, Forward
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import ConfigError
from tproxy.core.events import (
    CacheHit,
    ClientGone,
    Fact,
    FollowerJoined,
    HeadersReceived,
    Identified,
    InternalError,
    Rejected,
    ResponseFinished,
    ShutDown,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.exchange import Exchange
from tproxy.core.fanout import Chunk
from tproxy.core.sse import Frame, ServerSentEvent, encode_event
from tproxy.inflight import Inflight
from tproxy.store import LmdbStore
from tproxy.storewriter import StoreWriter
from tproxy.telemetry import (
    ACCESS_FIELDS,
    CLOUDEVENTS_BATCH,
    ExchangeRecord,
    JsonLogFormatter,
    Payload,
    PayloadCapture,
    ProcessMetrics,
    SinkStatistics,
    Telemetry,
    cache_label,
    encode_payload_event,
    log_formatter,
    open_telemetry,
    split_for_rotation,
    tenant_label,
    upstream_error_kind,
)
from tproxy.telemetry.logs import access_log, emit_access

SECRET = "sk-live-0123456789abcdef"
MISS = CacheStatus.forwarded(Forward.MISS)
T0 = 1000.0
NOW_UNIX = 1_700_000_000.0


def make_settings(
    *, access_log: bool = True, flush_timeout: float = 5.0, **payload: object
) -> Settings:
    return Settings(
        server=ServerSettings(),
        cache=CacheSettings(enabled=False),
        log=LogSettings(),
        upstreams=(UpstreamSettings("local", "http://127.0.0.1:8000"),),
        routes=(RouteSettings(("local",), name="chat"),),
        source="test",
        telemetry=TelemetrySettings(access_log=access_log, flush_timeout=flush_timeout),
        payload_log=PayloadLogSettings(**payload),  # type: ignore[arg-type]
    )


def exchange_after(*steps: tuple[float, Fact], path: str = "/v1/chat/completions") -> Exchange:
    """An exchange that started at T0 and was told ``steps`` (seconds after T0, fact)."""
    exchange = Exchange("req-1", T0, method="POST", path=path, client="10.0.0.7")
    for offset, fact in steps:
        if isinstance(fact, UpstreamEnded):
            exchange.note_upstream_chunk(120, T0 + offset - 0.5)
            exchange.note_delivered(120)
            exchange.note_events(3)
        exchange.handle(fact, T0 + offset)
    return exchange


def record_of(exchange: Exchange, **overrides: object) -> ExchangeRecord:
    arguments: dict[str, object] = {
        "route": "chat",
        "bytes_in": 42,
        "usage": None,
        "cache_outcome": None,
        "now_unix": NOW_UNIX,
    }
    arguments.update(overrides)
    return ExchangeRecord.from_exchange(exchange, **arguments)  # type: ignore[arg-type]


ASKED = (0.0, UpstreamRequested("local", 1))
STREAMING = (0.2, HeadersReceived(200))

TERMINAL_CASES = {
    "completed": exchange_after(
        ASKED, STREAMING, (2.0, UpstreamEnded()), (2.1, ResponseFinished())
    ),
    "replayed": exchange_after((0.01, CacheHit(5.0)), (0.02, ResponseFinished())),
    "rejected": exchange_after((0.0, Rejected(413, "request_too_large"))),
    "client_gone": exchange_after(ASKED, STREAMING, (0.7, ClientGone())),
    "upstream_failed": exchange_after(ASKED, (0.3, UpstreamFailed("cannot connect to local"))),
    "timed_out": exchange_after(ASKED, (9.0, TimedOut("first_byte"))),
    "shut_down": exchange_after(ASKED, STREAMING, (1.5, ShutDown())),
    "internal_error": exchange_after(ASKED, STREAMING, (0.4, InternalError("RuntimeError"))),
}
EXPECTED: dict[str, dict[str, object]] = {
    "completed": {"state": "completed", "status": 200, "duration_ms": 2100.0, "ttfb_ms": 1500.0},
    "replayed": {"state": "completed", "status": 200, "duration_ms": 20.0, "ttfb_ms": 10.0},
    "rejected": {"state": "rejected", "status": 413, "reason": "request_too_large"},
    "client_gone": {"state": "client_gone", "status": 200, "duration_ms": 700.0},
    "upstream_failed": {"state": "upstream_failed", "status": None, "upstream": "local"},
    "timed_out": {"state": "timed_out", "reason": "timeout:first_byte", "duration_ms": 9000.0},
    "shut_down": {"state": "shut_down", "duration_ms": 1500.0, "ttfb_ms": None},
    "internal_error": {"state": "internal_error", "reason": "RuntimeError", "status": 200},
}


async def logged_access_lines(
    caplog: pytest.LogCaptureFixture, *records: ExchangeRecord
) -> list[dict[str, object]]:
    """The JSON access lines the access sink emits for ``records``."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    async with open_telemetry(make_settings(), inflight=None, store=None, store_writer=None) as t:
        for record in records:
            t.exchange_finished(record)
        await t.flush()
    formatter = JsonLogFormatter()
    return [
        json.loads(formatter.format(line))
        for line in caplog.records
        if line.name == "tproxy.access"
    ]


# --- the access log --------------------------------------------------------------------------


@pytest.mark.parametrize("case", TERMINAL_CASES)
async def test_each_terminal_state_gives_one_access_line(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    [line] = await logged_access_lines(caplog, record_of(TERMINAL_CASES[case]))
    for field, value in EXPECTED[case].items():
        assert line[field] == value, field
    assert line["request_id"] == "req-1"
    assert (line["method"], line["path"], line["client"]) == (
        "POST",
        "/v1/chat/completions",
        "10.0.0.7",
    )
    assert line["bytes_in"] == 42
    assert line["level"] == "info"
    assert line["logger"] == "tproxy.access"
    assert line["time"] == "2023-11-14T22:13:20.000Z"


async def test_an_access_line_has_every_documented_field_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exchange = TERMINAL_CASES["completed"]
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "details": {}}
    record = record_of(exchange, usage=usage, cache_outcome="stored", bytes_in=512)
    [line] = await logged_access_lines(caplog, record)
    fields = [name for name in record.to_json() if name != "time"]
    assert list(line) == ["time", "level", "logger", *fields]
    assert line["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert (line["bytes_out"], line["events"], line["attempts"]) == (120, 3, 1)
    assert (line["cache"], line["collapsed"], line["followers"]) == ("stored", False, 0)
    documented = (Path(__file__).parent.parent / "docs" / "telemetry.md").read_text()
    for field in line:
        assert f"`{field}`" in documented, field


def test_the_console_form_is_one_readable_line() -> None:
    record = record_of(
        TERMINAL_CASES["completed"],
        usage={"prompt_tokens": 3, "completion_tokens": 5},
    )
    record = dataclasses.replace(record, cache_status=MISS, model="m1")
    assert record.summary() == (
        "200 POST /v1/chat/completions completed 2100.0ms ttfb=1500.0ms in=42B out=120B"
        " events=3 cache=miss upstream=local model=m1 tokens=3+5 id=req-1"
    )


def test_a_path_cannot_forge_a_console_line() -> None:
    record = dataclasses.replace(record_of(TERMINAL_CASES["rejected"]), path="/a\nfake 200")
    assert "\n" not in record.summary()
    assert "/a\\x0afake" in record.summary()


def test_the_log_format_setting_picks_json_or_console() -> None:
    assert isinstance(log_formatter(LogSettings(format="auto"), terminal=False), JsonLogFormatter)
    console = log_formatter(LogSettings(format="auto"), terminal=True)
    assert not isinstance(console, JsonLogFormatter)
    assert isinstance(log_formatter(LogSettings(format="json"), terminal=True), JsonLogFormatter)
    assert not isinstance(
        log_formatter(LogSettings(format="console"), terminal=False), JsonLogFormatter
    )
    plain = logging.LogRecord("tproxy", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    assert json.loads(JsonLogFormatter().format(plain))["message"] == "hello x"
    assert console.format(plain).endswith("WARNING hello x")


class KeptLines(logging.Handler):
    """A handler that keeps what its formatter makes of each record."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("form", ["json", "console"])
def test_access_lines_reach_the_handlers_in_either_form(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The access sink hands its lines to the handlers itself; the console's summary is made
    only where it is shown."""
    record = dataclasses.replace(record_of(TERMINAL_CASES["completed"]), cache_status=MISS)
    made: list[str] = []
    summary = ExchangeRecord.summary

    def counted_summary(self: ExchangeRecord) -> str:
        made.append(self.request_id)
        return summary(self)

    monkeypatch.setattr(ExchangeRecord, "summary", counted_summary)
    kept = KeptLines(log_formatter(LogSettings(format=form), terminal=False))
    level = access_log.level
    access_log.addHandler(kept)
    access_log.setLevel(logging.INFO)
    monkeypatch.setattr(access_log, "propagate", False)  # pytest's own handler shows messages
    try:
        emit_access([record, record])
    finally:
        access_log.removeHandler(kept)
        access_log.setLevel(level)
    if form == "console":
        assert [line.endswith(f"INFO    {summary(record)}") for line in kept.lines] == [True, True]
        return
    head = {"time": record.to_json()["time"], "level": "info", "logger": "tproxy.access"}
    assert [json.loads(line) for line in kept.lines] == 2 * [head | record.to_json()]
    assert made == []


def test_a_workers_lines_name_it_in_either_format() -> None:
    """Workers share the supervisor's stderr (the journal): each line says whose it is."""
    plain = logging.LogRecord("tproxy", logging.WARNING, __file__, 1, "hello", (), None)
    as_json = log_formatter(LogSettings(format="json"), terminal=False, worker=2)
    assert json.loads(as_json.format(plain))["worker"] == 2
    console = log_formatter(LogSettings(format="console"), terminal=True, worker=2)
    assert console.format(plain).endswith("WARNING [worker 2] hello")
    assert "worker" not in json.loads(JsonLogFormatter().format(plain))


async def test_access_lines_are_not_queued_when_the_access_log_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    settings = make_settings(access_log=False)
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        t.exchange_finished(record_of(TERMINAL_CASES["completed"]))
        assert t.statistics() == {}
    assert not [line for line in caplog.records if line.name == "tproxy.access"]


# --- credentials never appear ----------------------------------------------------------------


async def test_no_credential_reaches_a_record_a_log_line_or_a_payload(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    headers = [(b"authorization", f"Bearer {SECRET}".encode())]
    namespace = tenant_namespace(headers, shared=False)
    proper = exchange_after((0.0, Identified(namespace)), ASKED, STREAMING, (0.5, ClientGone()))
    # Even a credential put where the tenant hash belongs, or in a query string, stays out.
    careless = exchange_after(
        (0.0, Identified(f"Bearer {SECRET}")),
        (0.1, Rejected(400, "bad")),
        path=f"/v1/x?key={SECRET}",
    )
    records = [record_of(proper), record_of(careless)]
    assert records[0].tenant == tenant_label(namespace)
    assert records[0].tenant is not None
    assert len(records[0].tenant) == 12
    assert records[0].tenant not in namespace
    lines = await logged_access_lines(caplog, *records)
    payload = Payload(b'{"model":"m"}', None, body=b'{"choices":[]}')
    texts = [
        *(json.dumps(line) for line in lines),
        *(line.getMessage() for line in caplog.records),
        *(repr(record) for record in records),
        *(record.summary() for record in records),
        *(encode_payload_event(record, payload).decode() for record in records),
    ]
    for text in texts:
        assert SECRET not in text
        assert SECRET[3:12] not in text


# --- payloads --------------------------------------------------------------------------------


def sse_events(*texts: str, done: bool = True) -> list[ServerSentEvent]:
    chunks = [
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}
        for text in texts
    ]
    events = [ServerSentEvent(json.dumps(chunk)) for chunk in chunks]
    return [*events, ServerSentEvent("[DONE]")] if done else events


def test_a_capture_assembles_a_stream() -> None:
    capture = PayloadCapture(b'{"stream":true}', raw_events=False, max_bytes=1000)
    for event in sse_events("Hel", "lo"):
        capture.observe_event(event)
    payload = capture.finish()
    assert payload.answer is not None
    assert payload.answer.choices[0].text == "Hello"
    assert payload.answer.done
    assert (payload.request, payload.truncated) == (b'{"stream":true}', False)


def test_a_capture_keeps_raw_events_when_asked() -> None:
    capture = PayloadCapture(b"{}", raw_events=True, max_bytes=1000)
    for event in sse_events("a"):
        capture.observe_event(event)
    payload = capture.finish()
    assert payload.answer is None
    assert [event.data for event in payload.events][-1] == "[DONE]"
    data = json.loads(encode_payload_event(record_of(TERMINAL_CASES["completed"]), payload))
    assert data["data"]["response"]["events"][-1] == {
        "event": "message",
        "data": "[DONE]",
        "id": None,
    }


def test_a_capture_reads_the_frames_its_flights_reader_decoded() -> None:
    """A live answer's chunks carry the frames the reader decoded (a stream), or only bytes."""
    events = sse_events("Hel", "lo")
    frames = [Frame(encode_event(event.data), event) for event in events]
    stream = PayloadCapture(b"{}", raw_events=True, max_bytes=1000)
    stream.observe_chunk(Chunk(b"".join(frame.raw for frame in frames[:2]), 2, frames=frames[:2]))
    stream.observe_chunk(Chunk(b":ping\n\n", 0, frames=[Frame(b":ping\n\n", None)]))
    stream.observe_chunk(Chunk(b"", 1, frames=frames[2:]))  # what the decoder's close() gave
    assert list(stream.finish().events) == events
    body = PayloadCapture(b"{}", raw_events=True, max_bytes=1000)
    body.observe_chunk(Chunk(b""))
    assert body.finish().body is None
    body.observe_chunk(Chunk(b'{"ok":'))
    body.observe_chunk(Chunk(b"true}"))
    assert body.finish().body == b'{"ok":true}'


def test_a_capture_assembles_a_json_answer_or_keeps_it_raw() -> None:
    body = b'{"choices":[{"index":0,"message":{"content":"hi"}}]}'
    assembled = PayloadCapture(b"{}", raw_events=False, max_bytes=1000)
    raw = PayloadCapture(b"{}", raw_events=True, max_bytes=1000)
    for capture in (assembled, raw):
        capture.observe_body(body[:10])
        capture.observe_body(body[10:])
    answer = assembled.finish().answer
    assert answer is not None
    assert answer.choices[0].text == "hi"
    assert raw.finish().body == body


def test_a_capture_keeps_at_most_max_bytes_of_each_side() -> None:
    capture = PayloadCapture(b"x" * 50, raw_events=True, max_bytes=20)
    capture.observe_body(b"y" * 15)
    capture.observe_body(b"z" * 15)
    payload = capture.finish()
    assert (payload.request, payload.body, payload.truncated) == (
        b"x" * 20,
        b"y" * 15 + b"z" * 5,
        True,
    )
    events = PayloadCapture(b"", raw_events=True, max_bytes=10)
    for event in [ServerSentEvent("12345678"), ServerSentEvent("too long now")]:
        events.observe_event(event)
    assert [event.data for event in events.finish().events] == ["12345678"]
    assert events.finish().truncated


def test_a_capture_reads_a_replayed_entry() -> None:
    stream = b"".join(encode_event(event.data) for event in sse_events("cached"))
    entry = StoredEntry(
        status=200,
        headers=(),
        chunks=(stream[:7], stream[7:]),
        offsets=(0.0, 0.1),
        streamed=True,
        created_at=0.0,
        expires_at=1.0,
        model="m",
    )
    capture = PayloadCapture(b"{}", raw_events=False, max_bytes=1000)
    capture.observe_entry(entry)
    answer = capture.finish().answer
    assert answer is not None
    assert answer.choices[0].text == "cached"
    json_entry = dataclasses.replace(
        entry, chunks=(b'{"choices":[{"text":"j"}]}',), offsets=(0.0,), streamed=False
    )
    capture = PayloadCapture(b"{}", raw_events=False, max_bytes=1000)
    capture.observe_entry(json_entry)
    answer = capture.finish().answer
    assert answer is not None
    assert answer.choices[0].text == "j"


def test_a_payload_event_is_a_cloudevent_with_the_exchange_request_and_response() -> None:
    record = record_of(TERMINAL_CASES["completed"])
    payload = Payload(b'{"model":"m","messages":[]}', None, body=b"not json")
    event = json.loads(encode_payload_event(record, payload))
    assert event["specversion"] == "1.0"
    assert event["type"] == "tproxy.exchange.payload"
    assert event["source"] == "/tproxy"
    assert event["subject"] == "req-1"
    assert event["time"] == "2023-11-14T22:13:20.000Z"
    assert len(event["id"]) == 32
    assert event["data"]["request"] == {"model": "m", "messages": []}
    assert event["data"]["response"] == "not json"
    assert event["data"]["exchange"]["state"] == "completed"


def test_a_body_whose_json_cannot_be_written_back_is_kept_as_text() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    for body in (b'{"x": NaN}', deep):
        payload = Payload(body, None, body=body)
        event = json.loads(encode_payload_event(record_of(TERMINAL_CASES["completed"]), payload))
        assert event["data"]["request"] == body.decode()


# --- the file sink ---------------------------------------------------------------------------


def test_lines_are_grouped_so_that_no_file_passes_max_bytes() -> None:
    lines = [b"a" * 4, b"b" * 4, b"c" * 4, b"d" * 20]
    assert split_for_rotation(0, lines, 10) == [[b"aaaa", b"bbbb"], [b"cccc"], [b"d" * 20]]
    assert split_for_rotation(8, lines[:1], 10) == [[], [b"aaaa"]]
    assert split_for_rotation(0, [], 10) == [[]]


async def test_the_payload_file_is_rotated_by_size_and_keeps_the_newest_files(
    tmp_path: Path,
) -> None:
    path = tmp_path / "logs" / "payload.jsonl"
    settings = make_settings(
        access_log=False, enabled=True, file=path, max_bytes=4000, keep=2, queue_size=1000
    )
    payload = Payload(b'{"prompt":"' + b"p" * 500 + b'"}', None, body=b'{"ok":true}')
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        for number in range(40):
            record = dataclasses.replace(record_of(TERMINAL_CASES["completed"]), bytes_in=number)
            t.exchange_finished(record, payload)
        await t.flush()
        assert t.statistics()["file"].written == 40
    files = sorted(path.parent.iterdir())
    assert [file.name for file in files] == ["payload.jsonl", "payload.jsonl.1", "payload.jsonl.2"]
    numbers: list[list[int]] = []
    for file in (path.with_name("payload.jsonl.2"), path.with_name("payload.jsonl.1"), path):
        assert file.stat().st_size <= 4000
        events = [json.loads(line) for line in file.read_text().splitlines()]
        numbers.append([event["data"]["exchange"]["bytes_in"] for event in events])
    flat = [number for group in numbers for number in group]
    assert flat == list(range(40 - len(flat), 40)), "the newest records, in order"
    assert all(numbers)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most systems give a process (022): files would be readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
async def test_payload_files_and_their_directory_are_for_the_owner_only(tmp_path: Path) -> None:
    """The payload log holds prompts and answers: private like the store, whatever the umask."""
    path = tmp_path / "logs" / "payload.jsonl"
    settings = make_settings(access_log=False, enabled=True, file=path, max_bytes=1000, keep=2)
    payload = Payload(b'{"prompt":"' + b"p" * 600 + b'"}', None, body=b'{"ok":true}')
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        for _ in range(2):
            t.exchange_finished(record_of(TERMINAL_CASES["completed"]), payload)
            await t.flush()
    assert sorted(file.name for file in path.parent.iterdir()) == [
        "payload.jsonl",
        "payload.jsonl.1",
    ]
    for file in path.parent.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_file_sink_that_cannot_write_drops_and_counts_then_recovers(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = make_settings(access_log=False, enabled=True, file=blocker / "payload.jsonl")
    payload = Payload(b"{}", None, body=b"{}")
    record = record_of(TERMINAL_CASES["completed"])
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        t.exchange_finished(record, payload)
        await t.flush()
        assert t.statistics()["file"].dropped["failed"] == 1
        blocker.unlink()
        t.exchange_finished(record, payload)
        await t.flush()
        assert t.statistics()["file"].written == 1
    assert len((blocker / "payload.jsonl").read_text().splitlines()) == 1


# --- the HTTP sink against a real server -----------------------------------------------------


@dataclasses.dataclass
class Collector:
    """A CloudEvents endpoint on 127.0.0.1: answers ``statuses`` in turn (then 200) after
    ``delay`` seconds per POST."""

    delay: float = 0.0
    statuses: list[int] = dataclasses.field(default_factory=list)
    port: int = 0
    posts: list[SeenRequest] = dataclasses.field(default_factory=list)
    arrived: trio.Event = dataclasses.field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            handler = connection_handler(self._answer, keep_alive=False)
            self.port = await nursery.start(serve_on_loopback, handler)
            task_status.started()

    async def _answer(self, peer: Peer, request: SeenRequest) -> None:
        self.posts.append(request)
        self.arrived.set()
        await trio.sleep(self.delay)  # the endpoint's slowness, not a synchronisation
        status = self.statuses.pop(0) if self.statuses else 200
        await peer.respond(status, [("content-length", "0")])


@pytest.fixture
def start_collector(nursery: trio.Nursery) -> Callable[..., object]:
    async def start(**options: object) -> Collector:
        collector = Collector(**options)  # type: ignore[arg-type]
        await nursery.start(collector.serve)
        return collector

    return start


def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call_many(call: Callable[[], object], times: int) -> None:
    """Call ``call`` ``times`` times in a row; each call must return None, not an awaitable.

    No other task runs between two of these calls unless one of them awaits: the sink's counts
    after the loop show whether any did.
    """
    for _ in range(times):
        assert call() is None


RECORD = record_of(TERMINAL_CASES["completed"])
PAYLOAD = Payload(b'{"model":"m"}', None, body=b'{"choices":[]}')


async def test_the_http_sink_posts_cloudevent_batches_with_the_token(
    start_collector: Callable[..., object],
) -> None:
    collector = await start_collector()  # type: ignore[misc]
    settings = make_settings(
        access_log=False, enabled=True, http_url=collector.url, http_token_env="SINK_TOKEN"
    )
    async with open_telemetry(
        settings, inflight=None, store=None, store_writer=None, environ={"SINK_TOKEN": "tok"}
    ) as t:
        for _ in range(3):
            t.exchange_finished(RECORD, PAYLOAD)
        t.exchange_finished(RECORD)  # no payload: the access log's business only
        with trio.fail_after(10):
            await t.flush()
        assert t.statistics()["http"].written == 3
    post = collector.posts[0]
    assert post.target == "/ingest"
    assert post.headers["content-type"] == CLOUDEVENTS_BATCH
    assert post.headers["authorization"] == "Bearer tok"
    batch = [event for post in collector.posts for event in json.loads(post.body)]
    assert len(batch) == 3
    assert {event["specversion"] for event in batch} == {"1.0"}


def test_a_missing_sink_token_variable_stops_the_start() -> None:
    settings = make_settings(
        enabled=True, http_url="http://127.0.0.1:1", http_token_env="NOT_SET_ANYWHERE"
    )
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        Telemetry(settings, environ={})


async def test_a_stalled_http_sink_never_makes_exchange_finished_wait(
    start_collector: Callable[..., object],
) -> None:
    """10,000 records while the endpoint takes 5 s per POST: every call returns at once (the
    sink never ran in between, so no call awaited), the queue holds what it can, the rest is
    dropped and counted, and what is left at the close deadline is counted too."""
    collector = await start_collector(delay=5.0)  # type: ignore[misc]
    settings = make_settings(
        access_log=False,
        flush_timeout=0.2,
        enabled=True,
        http_url=collector.url,
        queue_size=64,
        batch_size=16,
    )
    assert not inspect.iscoroutinefunction(Telemetry.exchange_finished)
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        call_many(lambda: t.exchange_finished(RECORD, PAYLOAD), 10_000)
        stats = t.statistics()["http"]
        accepted = 10_000 - stats.dropped["queue_full"]
        # The queue's 64, plus one handed to the sink if it was already waiting: the sink took
        # nothing more, so it never ran during the 10,000 calls.
        assert 64 <= accepted <= 65
        with trio.fail_after(10):
            await collector.arrived.wait()  # the sink is now stuck in a 5 s POST
        for _ in range(100):  # and still nothing waits
            t.exchange_finished(RECORD, PAYLOAD)
        assert t.statistics()["http"].dropped["queue_full"] >= 10_000 - accepted + 100 - 16
    stats = t.statistics()["http"]
    assert stats.written == 0
    assert stats.dropped_total == 10_100
    assert stats.dropped["shutdown"] > 0
    text = t.metrics_text().decode()
    assert 'tproxy_log_records_dropped_total{reason="queue_full",sink="http"}' in text


async def post_to_a_failing_endpoint(url: str, records: int) -> SinkStatistics:
    """The HTTP sink's counts once ``records`` records went to ``url``, three attempts each."""
    settings = make_settings(
        access_log=False, enabled=True, http_url=url, http_retries=2, http_backoff=0.001
    )
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        call_many(lambda: t.exchange_finished(RECORD, PAYLOAD), records)
        with trio.fail_after(10):
            await t.flush()
        return t.statistics()["http"]


async def test_an_http_sink_whose_endpoint_is_down_drops_and_counts() -> None:
    stats = await post_to_a_failing_endpoint(f"http://127.0.0.1:{refused_port()}", 5)
    assert (stats.written, stats.dropped["failed"]) == (0, 5)


async def test_an_http_endpoint_that_hangs_up_without_answering_is_retried_then_dropped(
    nursery: trio.Nursery,
) -> None:
    connections = 0

    async def hang_up(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.receive_some(65536)  # the request starts arriving; no answer comes
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, hang_up, listeners)
    stats = await post_to_a_failing_endpoint(f"http://127.0.0.1:{port}/ingest", 1)
    assert (stats.written, stats.dropped["failed"]) == (0, 1)
    assert connections == 3  # the first attempt and two retries


async def test_an_http_sink_that_recovers_resumes(
    start_collector: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    collector = await start_collector(statuses=[503, 503, 400])  # type: ignore[misc]
    settings = make_settings(
        access_log=False, enabled=True, http_url=collector.url, http_retries=1, http_backoff=0.001
    )
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        with trio.fail_after(10):
            t.exchange_finished(RECORD, PAYLOAD)
            await t.flush()  # 503, retried: 503 -> dropped
            t.exchange_finished(RECORD, PAYLOAD)
            await t.flush()  # 400 is not retried -> dropped
            t.exchange_finished(RECORD, PAYLOAD)
            await t.flush()  # 200
        stats = t.statistics()["http"]
    assert (stats.written, stats.dropped["failed"]) == (1, 2)
    assert len(collector.posts) == 4
    messages = [line.getMessage() for line in caplog.records if line.name == "tproxy.telemetry"]
    assert messages == [
        "telemetry sink http failing, dropping records: status 503",
        "telemetry sink http recovered",
    ]


# --- closing -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("access_enabled")
async def test_records_offered_after_close_are_dropped_as_closed() -> None:
    settings = make_settings()
    async with open_telemetry(settings, inflight=None, store=None, store_writer=None) as t:
        pass
    t.exchange_finished(RECORD)
    assert t.statistics()["access"].dropped["closed"] == 1


async def test_on_exit_the_queues_are_written(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    async with open_telemetry(make_settings(), inflight=None, store=None, store_writer=None) as t:
        for _ in range(500):
            t.exchange_finished(RECORD)
    assert t.statistics()["access"].written == 500
    assert len([line for line in caplog.records if hasattr(line, ACCESS_FIELDS)]) == 500


# --- metrics -----------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(telemetry: Telemetry) -> Samples:
    families = text_string_to_metric_families(telemetry.metrics_text().decode())
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = labels.items()
    return sum(
        sample
        for (sample_name, sample_labels), sample in found.items()
        if sample_name == name and wanted <= sample_labels
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    opened = LmdbStore(tmp_path / "store", max_total_bytes=1 << 20, max_entry_bytes=1 << 16)
    yield opened
    opened.close()


@pytest.fixture
def access_enabled(caplog: pytest.LogCaptureFixture) -> None:
    """The access logger at INFO, as ``tproxy serve`` sets it: else nothing is queued for it."""
    caplog.set_level(logging.INFO, logger="tproxy.access")


@pytest.mark.usefixtures("access_enabled")
async def test_metrics_parse_and_counters_move_as_exchanges_finish(store: LmdbStore) -> None:
    inflight = Inflight()
    writer = StoreWriter(store)
    telemetry = Telemetry(make_settings(), inflight=inflight, store=store, store_writer=writer)
    before = samples(telemetry)
    assert value(before, "tproxy_requests_total", state="completed", cache="miss") == 0
    assert value(before, "tproxy_cache_entries") == 0
    assert value(before, "tproxy_inflight_exchanges", state="streaming") == 0

    completed = dataclasses.replace(
        record_of(TERMINAL_CASES["completed"], usage={"prompt_tokens": 3, "completion_tokens": 5}),
        cache_status=MISS,
        model="m1",
    )
    telemetry.exchange_finished(completed)
    telemetry.exchange_finished(completed)
    telemetry.exchange_finished(record_of(TERMINAL_CASES["timed_out"]))
    telemetry.exchange_finished(record_of(TERMINAL_CASES["upstream_failed"]))
    hit = dataclasses.replace(
        record_of(TERMINAL_CASES["replayed"]), cache_status=CacheStatus.hit(60)
    )
    telemetry.exchange_finished(hit)
    follower = dataclasses.replace(
        record_of(TERMINAL_CASES["completed"]), cache_status=MISS.joined(), collapsed=True
    )
    telemetry.exchange_finished(follower)
    telemetry.note_background_completion("stored")
    store.get("absent", 0.0)
    joined = (0.3, FollowerJoined())
    live = exchange_after(ASKED, STREAMING, joined, joined)  # two requests joined its flight
    with inflight.track(live):
        after = samples(telemetry)

    assert value(after, "tproxy_requests_total", state="completed", cache="miss") == 2
    assert value(after, "tproxy_requests_total", state="completed", cache="hit") == 1
    assert value(after, "tproxy_requests_total", state="completed", cache="collapsed") == 1
    assert value(after, "tproxy_requests_total", state="timed_out", cache="none") == 1
    assert value(after, "tproxy_upstream_errors_total", kind="timeout_first_byte") == 1
    assert value(after, "tproxy_upstream_errors_total", kind="connect") == 1
    assert value(after, "tproxy_time_to_first_byte_seconds_count", source="upstream") == 3
    assert value(after, "tproxy_time_to_first_byte_seconds_count", source="cache") == 1
    assert value(after, "tproxy_request_duration_seconds_count", source="upstream") == 5
    assert value(after, "tproxy_tokens_total", model="m1", kind="prompt") == 6
    assert value(after, "tproxy_tokens_total", model="m1", kind="completion") == 10
    assert value(after, "tproxy_coalesced_followers_total") == 1
    assert value(after, "tproxy_background_completions_total", outcome="stored") == 1
    assert value(after, "tproxy_inflight_exchanges", state="streaming") == 1
    assert value(after, "tproxy_inflight_followers") == 2
    assert value(after, "tproxy_cache_misses_total") == 1
    assert value(after, "tproxy_cache_max_bytes") == 1 << 20
    assert value(after, "tproxy_store_writer_entries_total", outcome="submitted") == 0
    assert value(after, "tproxy_log_queue_records", sink="access") == 6
    assert value(samples(telemetry), "tproxy_inflight_exchanges", state="streaming") == 0


def test_every_metric_is_documented(store: LmdbStore) -> None:
    telemetry = Telemetry(
        make_settings(enabled=True, file=Path("/nonexistent/never-written")),
        inflight=Inflight(),
        store=store,
        store_writer=StoreWriter(store),
    )
    telemetry.exchange_finished(record_of(TERMINAL_CASES["completed"]))
    documented = (Path(__file__).parent.parent / "docs" / "telemetry.md").read_text()
    text = telemetry.metrics_text().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert len(names) >= 20
    for name in names:
        assert f"`{name}" in documented, name


def test_there_are_no_created_series_and_other_registries_keep_theirs() -> None:
    telemetry = Telemetry(make_settings())
    telemetry.exchange_finished(record_of(TERMINAL_CASES["completed"]))
    text = telemetry.metrics_text().decode()
    assert "tproxy_request_duration_seconds_count" in text
    assert "_created" not in text
    elsewhere = CollectorRegistry()
    Counter("other_events", "Events of another library.", registry=elsewhere).inc()
    assert b"other_events_created" in generate_latest(elsewhere)


def test_the_build_is_one_info_series() -> None:
    found = samples(Telemetry(make_settings()))
    build = {labels for name, labels in found if name == "tproxy_build_info"}
    assert build == {frozenset({"version": __version__, "python": python_version()}.items())}
    assert value(found, "tproxy_build_info") == 1


def test_process_metrics_are_reported_where_proc_shows_only_processes(tmp_path: Path) -> None:
    """Under the unit's ProcSubset=pid, /proc holds the processes' directories and no /proc/stat:
    prometheus-client's own collector then reports nothing."""
    (tmp_path / "self").symlink_to(f"/proc/{os.getpid()}")
    registry = CollectorRegistry()
    ProcessMetrics(proc=str(tmp_path), registry=registry)
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert found["process_open_fds"] >= 3
    assert found["process_max_fds"] >= found["process_open_fds"]
    assert found["process_resident_memory_bytes"] > 1 << 20
    assert found["process_cpu_seconds_total"] > 0
    started = found["process_start_time_seconds"]
    assert time.time() - 24 * 3600 < started <= time.time()


def test_process_metrics_are_on_every_telemetry_registry() -> None:
    found = samples(Telemetry(make_settings()))
    for name in ("process_open_fds", "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert value(found, name) > 0, name


def test_route_and_upstream_labels_hold_configured_names_only() -> None:
    telemetry = Telemetry(make_settings())
    completed = record_of(TERMINAL_CASES["completed"])
    telemetry.exchange_finished(completed)
    telemetry.exchange_finished(dataclasses.replace(completed, route="not-configured"))
    telemetry.exchange_finished(record_of(TERMINAL_CASES["rejected"], route=None))
    failed = dataclasses.replace(record_of(TERMINAL_CASES["completed"]), status=503)
    telemetry.exchange_finished(failed)
    found = samples(telemetry)
    requests = "tproxy_requests_total"
    assert value(found, requests, state="completed", route="chat", upstream="local") == 2
    assert value(found, requests, state="completed", route="other", upstream="local") == 1
    assert value(found, requests, state="rejected", route="none", upstream="none") == 1
    duration = "tproxy_request_duration_seconds_count"
    assert value(found, duration, source="upstream", route="chat", upstream="local") == 2
    errors = "tproxy_upstream_errors_total"
    assert value(found, errors, kind="http_5xx", route="chat", upstream="local") == 1
    routes = {dict(labels).get("route") for name, labels in found if name == requests}
    assert routes == {"chat", "other", "none"}


def test_tokens_are_spent_once_per_upstream_answer_and_saved_by_hits_and_followers() -> None:
    telemetry = Telemetry(make_settings())
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    leader = dataclasses.replace(
        record_of(TERMINAL_CASES["completed"], usage=usage),
        cache_status=MISS,
        model="m1",
    )
    follower = dataclasses.replace(leader, cache_status=MISS.joined(), collapsed=True)
    early_leaver = dataclasses.replace(
        record_of(TERMINAL_CASES["client_gone"], usage=usage),
        cache_status=MISS.joined(),
        collapsed=True,
        model="m1",
    )
    hit = dataclasses.replace(
        record_of(TERMINAL_CASES["replayed"], usage=usage),
        cache_status=CacheStatus.hit(60),
        model="m1",
    )
    for record in (leader, follower, follower, early_leaver, hit):
        telemetry.exchange_finished(record)
    found = samples(telemetry)
    assert value(found, "tproxy_tokens_total", model="m1", kind="prompt") == 3
    assert value(found, "tproxy_tokens_total", model="m1", kind="completion") == 5
    saved = "tproxy_tokens_saved_total"
    assert value(found, saved, model="m1", kind="completion", cache="collapsed") == 10
    assert value(found, saved, model="m1", kind="prompt", cache="hit") == 3
    assert value(found, saved, model="m1", kind="completion", cache="hit") == 5


def test_a_closed_store_leaves_the_cache_metrics_out(tmp_path: Path) -> None:
    closed = LmdbStore(tmp_path / "s", max_total_bytes=1 << 20, max_entry_bytes=1 << 16)
    closed.close()
    telemetry = Telemetry(make_settings(), store=closed)
    assert value(samples(telemetry), "tproxy_cache_entries") == 0
    assert b"tproxy_cache_entries" not in telemetry.metrics_text()


def test_client_chosen_model_names_cannot_grow_the_metrics_without_bound() -> None:
    telemetry = Telemetry(make_settings())
    for number in range(200):
        record = dataclasses.replace(
            record_of(TERMINAL_CASES["completed"], usage={"prompt_tokens": 1}),
            model=f"model-{number}",
        )
        telemetry.exchange_finished(record)
    found = samples(telemetry)
    models = {dict(labels)["model"] for name, labels in found if name == "tproxy_tokens_total"}
    assert len(models) == 65
    assert value(found, "tproxy_tokens_total", model="other", kind="prompt") == 136


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (None, "none"),
        (CacheStatus.hit(30), "hit"),
        (CacheStatus.hit(30, "shared"), "hit"),
        (MISS, "miss"),
        (MISS.joined(), "collapsed"),
        (CacheStatus.forwarded(Forward.STALE), "stale"),
        (CacheStatus.forwarded(Forward.BYPASS), "bypass"),
        (CacheStatus.forwarded(Forward.REQUEST), "request"),
        (CacheStatus.forwarded(Forward.MISS, detail="not-json"), "miss"),
    ],
)
def test_cache_status_becomes_one_label(status: CacheStatus | None, label: str) -> None:
    assert cache_label(status) == label


@pytest.mark.parametrize(
    ("case", "status", "kind"),
    [
        ("completed", 200, None),
        ("completed", 503, "http_5xx"),
        ("completed", 429, "http_429"),
        ("rejected", 413, None),
        ("upstream_failed", None, "connect"),
        ("upstream_failed", 200, "broken"),
        ("timed_out", None, "timeout_first_byte"),
        ("client_gone", 200, None),
    ],
)
def test_upstream_errors_are_sorted_by_kind(
    case: str, status: int | None, kind: str | None
) -> None:
    record = dataclasses.replace(
        record_of(TERMINAL_CASES[case]), status=status, upstream_answered=status is not None
    )
    assert upstream_error_kind(record) == kind
