"""What every API family's dialect provides, and the parts the families share.

Theory of operation. A :class:`Dialect` is a frozen value: the request paths of one API family,
whether a request asks for a stream, how a streamed answer is framed (SSE or NDJSON, told by the
response's Content-Type), how to judge whether an answer ended cleanly (a fresh
:class:`Completion` per streamed answer, :meth:`Dialect.judge_json` for a whole one), which request
headers carry the client's credential, and how to put an answer together for the payload log.
The pipeline, the cache key and the payload log ask the dialect; none of them knows a family.

Every framing gives the same frames: :class:`~tproxy.core.sse.Frame`, its exact bytes and the
message it carries as a :class:`~tproxy.core.sse.ServerSentEvent`. An NDJSON line is a message
named ``message`` whose data is the line's text, so a completion check, the usage tracker and the
payload capture read SSE and NDJSON answers alike.

Usage comes out in one shape whatever the family calls its counts: ``prompt_tokens`` (input),
``completion_tokens`` (output), ``total_tokens`` and ``cached_tokens`` (input read from a prompt
cache), the names the access log and the metrics read.

Upstream bodies are untrusted: nothing here raises on any input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from tproxy.core.assemble import (
    DEFAULT_MAX_CHARS,
    Answer,
    Choice,
    StreamAssembler,
    ToolCall,
    assemble_json,
)
from tproxy.core.completion import StreamOutcome, error_message, parse_json
from tproxy.core.ndjson import Line, NDJSONDecoder
from tproxy.core.sse import Frame, ServerSentEvent, SSEDecoder

__all__ = [
    "Assembler",
    "Completion",
    "Decoder",
    "Dialect",
    "EndMarkerCompletion",
    "Framing",
    "JsonVerdict",
    "NDJSONFrames",
    "TextAssembler",
    "json_judge",
    "judge_json_object",
    "media_type",
    "usage_counts",
]

JsonVerdict = tuple[StreamOutcome, str, dict[str, int] | None]
_MAX_REASON_CHARS = 200
_MAX_TEXT_CHARS = DEFAULT_MAX_CHARS


class Framing(Enum):
    """How a streamed answer is framed, by the media type its Content-Type names."""

    SSE = b"text/event-stream"
    NDJSON = b"application/x-ndjson"


class Decoder(Protocol):
    """A framing's incremental decoder (SSE or NDJSON), fed with bytes as they arrive."""

    @property
    def failed(self) -> str | None: ...

    def feed(self, data: bytes) -> list[Frame]: ...

    def close(self) -> list[Frame]: ...


class Completion(Protocol):
    """Watches the messages of one streamed answer and says whether it may be stored."""

    def observe(self, event: ServerSentEvent) -> None:
        """Take the next message of the stream. Never raises."""

    def verdict(self, clean_end: bool) -> tuple[StreamOutcome, str]:
        """Judge the stream so far; ``clean_end`` says whether the HTTP body ended cleanly."""

    @property
    def ended(self) -> bool:
        """Whether the family's end marker arrived (whatever came after it)."""

    @property
    def usage(self) -> dict[str, int] | None:
        """The answer's token counts in the one shape (see :func:`usage_counts`), if reported."""


class Assembler(Protocol):
    """Puts a streamed answer together for the payload log."""

    def feed(self, event: ServerSentEvent) -> None: ...

    def result(self) -> Answer: ...


class NDJSONFrames:
    """An :class:`~tproxy.core.ndjson.NDJSONDecoder` giving frames: each non-blank line is a
    message whose data is the line; a blank line is a frame without a message."""

    __slots__ = ("_decoder",)

    def __init__(self, max_line_bytes: int) -> None:
        self._decoder = NDJSONDecoder(max_line_bytes)

    @property
    def failed(self) -> str | None:
        return self._decoder.failed

    def feed(self, data: bytes) -> list[Frame]:
        return _frames(self._decoder.feed(data))

    def close(self) -> list[Frame]:
        return _frames(self._decoder.close())


def _frames(lines: Iterable[Line]) -> list[Frame]:
    return [
        Frame(line.raw, None if line.text is None else ServerSentEvent(line.text)) for line in lines
    ]


def media_type(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The media type of the first Content-Type header, lower case, without parameters."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";")[0].strip().lower()
    return b""


@dataclass(frozen=True, slots=True)
class Dialect:
    """Everything tproxy must know about one API family. See the module's theory of operation.

    ``framing`` is None for a family answered only as JSON (embeddings, rerank, any path a user
    adds that no family claims). ``stream_by_default`` is true for a family whose requests stream
    unless they say ``"stream": false`` (Ollama). ``endings`` are the path endings that name the
    family under any prefix (Azure's ``/openai/deployments/NAME/chat/completions``, Open WebUI's
    ``/ollama/api/chat``), for paths a user adds. ``assembler`` and ``whole_answer`` build the
    payload log's answer of a stream and of a whole body, given a character budget; OpenAI chat's
    are the default.
    """

    name: str
    paths: tuple[str, ...]
    endings: tuple[str, ...]
    framing: Framing | None
    completion: Callable[[], Completion] | None
    judge_json: Callable[[int, bytes], JsonVerdict]
    assembler: Callable[[int], Assembler] = StreamAssembler
    whole_answer: Callable[[bytes, int], Answer] = assemble_json
    stream_by_default: bool = False
    credential_headers: tuple[bytes, ...] = (b"authorization",)

    def asks_for_stream(self, body: Mapping[str, object]) -> bool:
        """Whether a request with this (parsed JSON object) body asks for a streamed answer."""
        if self.framing is None:
            return False
        stream = body.get("stream")
        return stream is not False if self.stream_by_default else stream is True

    def decoder(
        self, headers: Iterable[tuple[bytes, bytes]], max_line_bytes: int
    ) -> Decoder | None:
        """The decoder for an answer with these response headers, or None when the answer is to
        be judged as one JSON body (it is not in the family's streamed framing)."""
        if self.framing is None or self.completion is None:
            return None
        if media_type(headers) != self.framing.value:
            return None
        if self.framing is Framing.NDJSON:
            return NDJSONFrames(max_line_bytes)
        return SSEDecoder(max_line_bytes)


def usage_counts(
    input_tokens: object, output_tokens: object, cached_tokens: object = None
) -> dict[str, int] | None:
    """Token counts in the one shape; members that are not counts are left out, and None is
    returned when none is."""
    counts: dict[str, int] = {}
    for name, value in (
        ("prompt_tokens", input_tokens),
        ("completion_tokens", output_tokens),
        ("cached_tokens", cached_tokens),
    ):
        if _is_count(value):
            assert isinstance(value, int)
            counts[name] = value
    if not counts:
        return None
    if "prompt_tokens" in counts and "completion_tokens" in counts:
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return counts


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def judge_json_object(
    status: int, body: bytes, usage: Callable[[dict[str, object]], dict[str, int] | None]
) -> tuple[StreamOutcome, str, dict[str, int] | None, dict[str, object] | None]:
    """The checks every family makes of a whole answer: status 200, a JSON object, no
    ``error`` member. Returns the outcome, its reason, the usage, and the object when the outcome
    is COMPLETE (for the family to check further), else None."""
    payload = parse_json(body)
    document = payload if isinstance(payload, dict) else None
    counts = usage(document) if document is not None else None
    if status != 200:
        message = error_text(payload)
        return StreamOutcome.ERROR, f"status {status}" + _colon(message), counts, None
    if document is None:
        return StreamOutcome.INCOMPLETE, "body is not a JSON object", counts, None
    if document.get("error") is not None:
        return StreamOutcome.ERROR, "error in body" + _colon(error_text(document)), counts, None
    return StreamOutcome.COMPLETE, "JSON object", counts, document


def json_judge(
    usage: Callable[[dict[str, object]], dict[str, int] | None],
) -> Callable[[int, bytes], JsonVerdict]:
    """The whole-answer check of a family that checks nothing more than every family does."""

    def judge(status: int, body: bytes) -> JsonVerdict:
        outcome, reason, counts, _document = judge_json_object(status, body, usage)
        return outcome, reason, counts

    return judge


def error_text(payload: object) -> str:
    """A short message from an error body of any family: OpenAI's ``{"error": {"message"}}``,
    Anthropic's ``{"error": {"type", "message"}}``, Ollama's ``{"error": "..."}``."""
    message = error_message(payload)
    if isinstance(payload, dict):
        error = payload.get("error")
        kind = error.get("type") if isinstance(error, dict) else None
        if isinstance(kind, str) and kind and kind not in message:
            message = f"{kind}: {message}" if message else kind
    return message[:_MAX_REASON_CHARS]


def _colon(message: str) -> str:
    return f": {message}" if message else ""


class EndMarkerCompletion:
    """The completion check of a family whose streams end with one marker message.

    A subclass reads each message's JSON object in :meth:`_take` and calls :meth:`_end`,
    :meth:`_fail` and :meth:`_count` on what it finds. A stream is COMPLETE when the HTTP body
    ended cleanly, no error was reported, every message was a JSON object, and the end marker
    arrived with nothing after it. The order of the checks: an error outranks everything, then an
    unclean end, then data that is not JSON, then messages after the end.
    """

    __slots__ = ("_after_end", "_end_reason", "_error", "_garbled", "_usage")

    marker = "the end marker"  # the family's end marker, as the reasons name it

    def __init__(self) -> None:
        self._end_reason: str | None = None
        self._after_end = 0
        self._error: str | None = None
        self._garbled = 0
        self._usage: dict[str, int] | None = None

    @property
    def ended(self) -> bool:
        return self._end_reason is not None

    @property
    def usage(self) -> dict[str, int] | None:
        return self._usage

    def observe(self, event: ServerSentEvent) -> None:
        if self._end_reason is not None:
            self._after_end += 1
        payload = parse_json(event.data)
        if not isinstance(payload, dict):
            if event.event == "error":
                self._fail("error event", payload)
            else:
                self._garbled += 1
            return
        self._take(event.event, payload)

    def verdict(self, clean_end: bool) -> tuple[StreamOutcome, str]:
        if self._error is not None:
            return StreamOutcome.ERROR, self._error
        if not clean_end:
            return StreamOutcome.INCOMPLETE, "upstream ended uncleanly"
        if self._garbled:
            return StreamOutcome.INCOMPLETE, f"{self._garbled} message(s) not a JSON object"
        if self._after_end:
            return StreamOutcome.INCOMPLETE, f"{self._after_end} message(s) after {self.marker}"
        if self._end_reason is not None:
            return StreamOutcome.COMPLETE, self._end_reason
        return StreamOutcome.INCOMPLETE, f"no {self.marker}"

    def _take(self, name: str, payload: dict[str, object]) -> None:
        raise NotImplementedError

    def _end(self, reason: str) -> None:
        if self._end_reason is None:
            self._end_reason = reason

    def _fail(self, what: str, payload: object) -> None:
        if self._error is None:
            self._error = what + _colon(error_text(payload))

    def _count(self, usage: dict[str, int] | None) -> None:
        if usage is not None:
            self._usage = usage


class TextAssembler:
    """The payload log's answer for a family other than chat: one choice with the text, the tool
    calls, the stop reason, the usage and the first error. A subclass reads each message in
    :meth:`_take`. Bounded like :class:`~tproxy.core.assemble.StreamAssembler`."""

    __slots__ = (
        "_calls",
        "_done",
        "_error",
        "_events",
        "_id",
        "_left",
        "_model",
        "_reason",
        "_text",
        "_truncated",
        "_usage",
    )

    def __init__(self, max_chars: int = _MAX_TEXT_CHARS) -> None:
        self._left = max(0, max_chars)
        self._truncated = False
        self._text: list[str] = []
        self._calls: dict[int, tuple[str | None, str | None, list[str]]] = {}
        self._reason: str | None = None
        self._usage: dict[str, int] | None = None
        self._error: str | None = None
        self._model: str | None = None
        self._id: str | None = None
        self._done = False
        self._events = 0

    def feed(self, event: ServerSentEvent) -> None:
        self._events += 1
        payload = parse_json(event.data)
        if isinstance(payload, dict):
            self._take(event.event, payload)
        elif event.event == "error" and self._error is None:
            self._error = "error event"

    @classmethod
    def whole(cls, body: bytes, max_chars: int = _MAX_TEXT_CHARS) -> Answer:
        """The answer of a whole (non-streamed) JSON body."""
        assembler = cls(max_chars)
        payload = parse_json(body)
        if isinstance(payload, dict):
            assembler._take_whole(payload)
            assembler._done = True
        return assembler.result()

    def result(self) -> Answer:
        calls = tuple(
            ToolCall(index, call_id, "function", name, "".join(arguments))
            for index, (call_id, name, arguments) in sorted(self._calls.items())
        )
        choice = Choice(0, "assistant", "".join(self._text), "", calls, self._reason)
        return Answer(
            id=self._id,
            model=self._model,
            choices=(choice,) if self._text or calls or self._reason else (),
            usage=self._usage,
            error=self._error,
            done=self._done,
            events=self._events,
            truncated=self._truncated,
        )

    def _take(self, name: str, payload: dict[str, object]) -> None:
        raise NotImplementedError

    def _take_whole(self, payload: dict[str, object]) -> None:
        raise NotImplementedError

    def _append_text(self, value: object) -> None:
        kept = self._keep(value)
        if kept:
            self._text.append(kept)

    def _append_call(self, index: object, call_id: object, name: object, arguments: object) -> None:
        if not isinstance(index, int) or (len(self._calls) >= 128 and index not in self._calls):
            return
        known_id, known_name, parts = self._calls.get(index, (None, None, []))
        self._calls[index] = (known_id or _short(call_id), known_name or _short(name), parts)
        kept = self._keep(arguments)
        if kept:
            parts.append(kept)

    def _note(self, *, model: object = None, id: object = None, reason: object = None) -> None:
        self._model = _short(model) or self._model
        self._id = _short(id) or self._id
        self._reason = _short(reason) or self._reason

    def _note_usage(self, usage: dict[str, int] | None) -> None:
        if usage is not None:
            self._usage = usage

    def _note_error(self, what: str, payload: object) -> None:
        if self._error is None:
            self._error = what + _colon(error_text(payload))

    def _finish(self) -> None:
        self._done = True

    def _keep(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            return ""
        if len(value) > self._left:
            self._truncated = True
            value = value[: self._left]
        self._left -= len(value)
        return value


def _short(value: object) -> str | None:
    return value[:256] if isinstance(value, str) and value else None


def member(document: object, *path: str) -> object:
    """``document[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for name in path:
        if not isinstance(document, dict):
            return None
        document = document.get(name)
    return document
