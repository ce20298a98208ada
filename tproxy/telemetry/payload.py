"""The payload log's content: the request body and the answer of one exchange, kept bounded.

:class:`PayloadCapture` is fed by the pipeline while the answer passes (the events its flight's
reader decoded from a stream, or the bytes of a JSON body) and keeps at most
``payload_log.max_record_bytes`` of each side; with ``raw_events`` it keeps the events, else it
assembles them (:mod:`tproxy.core.assemble`).
:func:`encode_payload_event` writes one as a CloudEvent, for the file and HTTP sinks.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tproxy.core.assemble import DEFAULT_MAX_CHARS, Answer
from tproxy.core.dialects import JSON_ONLY, Dialect
from tproxy.core.dialects.base import Assembler
from tproxy.core.entry import StoredEntry
from tproxy.core.fanout import Chunk
from tproxy.core.sse import ServerSentEvent, SSEDecoder
from tproxy.telemetry.records import ExchangeRecord, iso_time

CLOUDEVENT_TYPE = "tproxy.exchange.payload"
CLOUDEVENT_SOURCE = "/tproxy"


@dataclass(frozen=True, slots=True)
class Payload:
    """What the payload log keeps of one exchange: the request body and the answer.

    ``answer`` is the assembled answer; with ``payload_log.raw_events``, ``events`` (a stream)
    or ``body`` (a JSON answer) is kept instead. ``truncated`` says a side was cut to
    ``payload_log.max_record_bytes``.
    """

    request: bytes
    answer: Answer | None = None
    events: tuple[ServerSentEvent, ...] = ()
    body: bytes | None = None
    truncated: bool = False


class PayloadCapture:
    """Keeps what the payload log needs while an answer passes; sync, cheap, bounded. The
    request's API family (``dialect``) puts its answer together."""

    __slots__ = (
        "_assembler",
        "_body",
        "_dialect",
        "_events",
        "_left",
        "_raw",
        "_request",
        "_truncated",
    )

    def __init__(
        self, request: bytes, *, raw_events: bool, max_bytes: int, dialect: Dialect = JSON_ONLY
    ) -> None:
        self._request = request[:max_bytes]
        self._truncated = len(request) > max_bytes
        self._raw = raw_events
        self._dialect = dialect
        self._assembler: Assembler | None = None
        self._events: list[ServerSentEvent] = []
        self._body: bytearray | None = None
        self._left = max_bytes

    def observe_event(self, event: ServerSentEvent) -> None:
        """Take the next event of a streamed answer."""
        if not self._raw:
            if self._assembler is None:
                self._assembler = self._dialect.assembler(self._left)
            self._assembler.feed(event)
        elif len(event.data) <= self._left:
            self._events.append(event)
            self._left -= len(event.data)
        else:
            self._truncated = True
            self._left = 0

    def observe_chunk(self, chunk: Chunk) -> None:
        """Take the next chunk of a live answer as its flight's reader decoded it: the events of
        its frames for a stream, else its bytes. Nothing decodes here: a flight decodes its
        stream once, however many clients capture it."""
        if chunk.frames is None:
            if chunk.data:
                self.observe_body(chunk.data)
            return
        for frame in chunk.frames:
            if frame.event is not None:
                self.observe_event(frame.event)

    def observe_body(self, data: bytes) -> None:
        """Take the next bytes of an answer that is not an event stream."""
        if self._body is None:
            self._body = bytearray()
        kept = data[: self._left]
        self._body += kept
        self._left -= len(kept)
        if len(kept) < len(data):
            self._truncated = True

    def observe_entry(self, entry: StoredEntry, max_line_bytes: int = 1 << 20) -> None:
        """Take a stored answer that is being replayed from the cache.

        A stored stream is decoded here, once per replay (the replay itself sends its bytes
        without decoding them): the entry keeps the exact bytes a replay sends, one chunk per
        frame, and not the events, which would make every entry larger in the store, and every
        hit slower to read, for the payload log alone. Its chunks being whole frames, the
        decoder takes each one without buffering it.
        """
        if not entry.streamed:
            for chunk in entry.chunks:
                self.observe_body(chunk)
            return
        decoder = self._dialect.decoder(entry.headers, max_line_bytes) or SSEDecoder(max_line_bytes)
        frames = [frame for chunk in entry.chunks for frame in decoder.feed(chunk)]
        frames += decoder.close()
        for frame in frames:
            if frame.event is not None:
                self.observe_event(frame.event)

    def finish(self) -> Payload:
        """The payload, once the answer is over (or cut short)."""
        if self._assembler is not None:
            assembled = self._assembler.result()
            truncated = self._truncated or assembled.truncated
            return Payload(self._request, assembled, truncated=truncated)
        if self._raw:
            body = None if self._body is None else bytes(self._body)
            return Payload(self._request, None, tuple(self._events), body, self._truncated)
        answer = (
            None
            if self._body is None
            else self._dialect.whole_answer(bytes(self._body), DEFAULT_MAX_CHARS)
        )
        return Payload(self._request, answer, truncated=self._truncated)


def payload_event(
    record: ExchangeRecord, payload: Payload, *, bodies_as_text: bool = False
) -> dict[str, object]:
    """One payload record as a CloudEvent (structured mode, JSON data).

    Bodies that are JSON are embedded as JSON, others as text; ``bodies_as_text`` embeds both as
    text, for a body whose JSON cannot be written back (NaN, or nested too deep).
    """
    embed = _text if bodies_as_text else _json_or_text
    response: object
    if payload.answer is not None:
        response = payload.answer.to_json()
    elif payload.body is not None:
        response = embed(payload.body)
    elif payload.events:
        response = {
            "events": [
                {"event": event.event, "data": event.data, "id": event.id}
                for event in payload.events
            ]
        }
    else:
        response = None
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": CLOUDEVENT_SOURCE,
        "type": CLOUDEVENT_TYPE,
        "subject": record.request_id,
        "time": iso_time(record.time),
        "datacontenttype": "application/json",
        "data": {
            "exchange": record.to_json(),
            "request": embed(payload.request),
            "response": response,
            "truncated": payload.truncated,
        },
    }


def encode_payload_event(record: ExchangeRecord, payload: Payload) -> bytes:
    """:func:`payload_event` as strict JSON (no NaN), on one line. Never raises."""
    try:
        document = payload_event(record, payload)
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError):
        document = payload_event(record, payload, bodies_as_text=True)
        return json.dumps(document, separators=(",", ":")).encode()


def _json_or_text(data: bytes) -> Any:
    """A body as JSON when it is JSON, else as text (invalid UTF-8 replaced)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _text(data)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
