"""A fake upstream that speaks every API family tproxy caches, byte for byte as documented.

One real HTTP/1.1 (h11) server on a real socket answers:

- ``/v1/responses`` (OpenAI Responses): named SSE events ``response.created`` …
  ``response.completed``, or a whole Response object;
- ``/v1/messages`` (Anthropic Messages): ``message_start`` … ``message_stop`` with a ``ping``,
  or a whole ``"type": "message"`` object;
- ``/api/chat`` and ``/api/generate`` (Ollama): NDJSON lines ending with ``"done": true``, unless
  the request says ``"stream": false``; ``/api/embed`` as JSON;
- ``/completion`` (llama.cpp native): unnamed SSE events, the last with ``"stop": true``;
- ``/v1/rerank``: a JSON list of scores;
- OpenAI chat, completions and embeddings, as :class:`~tests.fakeupstream.FakeUpstream` does.

Header names are written Title-Case, as llama.cpp's cpp-httplib and Ollama's Go server write
them (``Content-Type``). The answer repeats the words of the request's last message (or prompt),
one streamed piece per word. Tests steer it with request headers the proxy forwards:

- ``x-fake-cut``: end the body cleanly right before the end marker;
- ``x-fake-error``: report an error in band mid-stream (Anthropic ``overloaded_error``, Responses
  ``response.failed``, an Ollama ``{"error": ...}`` line, a llama.cpp ``error`` member);
- ``x-fake-delay``: seconds between two writes (a paced stream, as a model generates it).
"""

from __future__ import annotations

import json
from typing import Any

import trio

from tests.fakeupstream import FakeUpstream, words_of
from tests.h11peer import Peer, SeenRequest

SSE = b"text/event-stream"
NDJSON = b"application/x-ndjson"
JSON = b"application/json"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sse_event(data: object, name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name is not None else b""
    return head + b"data: " + _json(data) + b"\n\n"


def request_words(payload: dict) -> list[str]:  # type: ignore[type-arg]
    """The words of the last message, of ``prompt``, or of Responses' ``input``."""
    if isinstance(payload.get("input"), str):
        return payload["input"].split() or ["empty"]
    return words_of(payload)


def _pieces(words: list[str]) -> list[str]:
    return [word if index == 0 else " " + word for index, word in enumerate(words)]


# --- OpenAI Responses ---------------------------------------------------------------------------


def response_object(payload: dict, status: str, text: str | None) -> dict:  # type: ignore[type-arg]
    words = request_words(payload)
    output = []
    if text is not None:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        output = [
            {
                "id": "msg_fake",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": content,
            }
        ]
    done = status != "in_progress"
    usage = {
        "input_tokens": len(words),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(words),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 2 * len(words),
    }
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": payload.get("model", "fake"),
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage if done else None,
    }


def responses_stream(payload: dict, *, cut: bool = False, error: bool = False) -> list[bytes]:  # type: ignore[type-arg]
    pieces = _pieces(request_words(payload))
    text = "".join(pieces)
    sequence = iter(range(1000))
    events = []

    def add(name: str, **fields: object) -> None:
        events.append(sse_event({"type": name, "sequence_number": next(sequence), **fields}, name))

    add("response.created", response=response_object(payload, "in_progress", None))
    add("response.in_progress", response=response_object(payload, "in_progress", None))
    item = {"id": "msg_fake", "type": "message", "status": "in_progress", "role": "assistant"}
    add("response.output_item.added", output_index=0, item={**item, "content": []})
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    add("response.content_part.added", **where, part=part)
    for index, piece in enumerate(pieces):
        add("response.output_text.delta", **where, delta=piece, logprobs=[])
        if error and index == 0:
            failed = response_object(payload, "failed", None)
            failed["error"] = {"code": "server_error", "message": "The model failed."}
            add("response.failed", response=failed)
            return events
    add("response.output_text.done", **where, text=text, logprobs=[])
    add("response.content_part.done", **where, part={**part, "text": text})
    done_item = response_object(payload, "completed", text)["output"][0]
    add("response.output_item.done", output_index=0, item=done_item)
    if not cut:
        add("response.completed", response=response_object(payload, "completed", text))
    return events


# --- Anthropic Messages -------------------------------------------------------------------------


def message_object(payload: dict) -> dict:  # type: ignore[type-arg]
    words = request_words(payload)
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": " ".join(words)}],
        "model": payload.get("model", "claude-fake"),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": len(words), "output_tokens": len(words)},
    }


def messages_stream(payload: dict, *, cut: bool = False, error: bool = False) -> list[bytes]:  # type: ignore[type-arg]
    words = request_words(payload)
    start = {**message_object(payload), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": len(words), "output_tokens": 1}
    events = [
        sse_event({"type": "message_start", "message": start}, "message_start"),
        sse_event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse_event({"type": "ping"}, "ping"),
    ]
    for index, piece in enumerate(_pieces(words)):
        delta = {"type": "text_delta", "text": piece}
        events.append(
            sse_event(
                {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
            )
        )
        if error and index == 0:
            overloaded = {"type": "overloaded_error", "message": "Overloaded"}
            events.append(sse_event({"type": "error", "error": overloaded}, "error"))
            return events
    events.append(sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    stop: dict[str, object] = {"stop_reason": "end_turn", "stop_sequence": None}
    usage = {"output_tokens": len(words)}
    events.append(
        sse_event({"type": "message_delta", "delta": stop, "usage": usage}, "message_delta")
    )
    if not cut:
        events.append(sse_event({"type": "message_stop"}, "message_stop"))
    return events


# --- Ollama -------------------------------------------------------------------------------------


def ollama_line(payload: dict, path: str, piece: str, done: bool) -> dict:  # type: ignore[type-arg]
    line: dict[str, object] = {
        "model": payload.get("model", "llama3.2"),
        "created_at": "2026-12-04T19:00:00.000000Z",
    }
    if path == "/api/chat":
        line["message"] = {"role": "assistant", "content": piece}
    else:
        line["response"] = piece
    line["done"] = done
    if done:
        words = request_words(payload)
        line.update(
            done_reason="stop",
            total_duration=4883583458,
            load_duration=1334875,
            prompt_eval_count=len(words),
            prompt_eval_duration=342546000,
            eval_count=len(words),
            eval_duration=4535599000,
        )
    return line


def ollama_stream(
    payload: dict[str, Any], path: str, *, cut: bool = False, error: bool = False
) -> list[bytes]:
    lines = []
    for index, piece in enumerate(_pieces(request_words(payload))):
        lines.append(_json(ollama_line(payload, path, piece, False)) + b"\n")
        if error and index == 0:
            lines.append(
                _json({"error": "an error was encountered while running the model"}) + b"\n"
            )
            return lines
    if not cut:
        lines.append(_json(ollama_line(payload, path, "", True)) + b"\n")
    return lines


def ollama_whole(payload: dict, path: str) -> dict:  # type: ignore[type-arg]
    return ollama_line(payload, path, " ".join(request_words(payload)), True) | {
        "message" if path == "/api/chat" else "response": (
            {"role": "assistant", "content": " ".join(request_words(payload))}
            if path == "/api/chat"
            else " ".join(request_words(payload))
        )
    }


# --- llama.cpp native /completion ---------------------------------------------------------------


def llamacpp_stream(payload: dict, *, cut: bool = False, error: bool = False) -> list[bytes]:  # type: ignore[type-arg]
    words = request_words(payload)
    events = []
    for index, piece in enumerate(_pieces(words)):
        events.append(
            sse_event({"index": 0, "content": piece, "tokens": [], "stop": False, "id_slot": 0})
        )
        if error and index == 0:
            failure = {"code": 500, "message": "failed to decode the batch", "type": "server_error"}
            events.append(sse_event({"error": failure}))
            return events
    if not cut:
        final = {
            "index": 0,
            "content": "",
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": payload.get("model", "fake"),
            "tokens_predicted": len(words),
            "tokens_evaluated": len(words),
            "tokens_cached": 0,
            "stop_type": "eos",
            "stopping_word": "",
            "truncated": False,
        }
        events.append(sse_event(final))
    return events


def rerank_answer(payload: dict) -> dict:  # type: ignore[type-arg]
    documents = payload.get("documents") or []
    results = [
        {"index": index, "relevance_score": round(1.0 / (index + 1), 6)}
        for index in range(len(documents))
    ]
    return {
        "model": payload.get("model", "fake-rerank"),
        "object": "list",
        "usage": {"prompt_tokens": len(documents), "total_tokens": len(documents)},
        "results": results,
    }


# --- the server ---------------------------------------------------------------------------------


class FamilyUpstream(FakeUpstream):
    """Serve with :meth:`serve` in a nursery; ``calls`` counts requests by target. OpenAI chat,
    completions and embeddings, and the connection handling, are :class:`FakeUpstream`'s."""

    async def _answer(self, peer: Peer, request: SeenRequest) -> None:
        path = request.path
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            await super()._answer(peer, request)
            return
        payload = json.loads(request.body) if request.body else {}
        knobs = {"cut": "x-fake-cut" in request.headers, "error": "x-fake-error" in request.headers}
        streamed = payload.get("stream") is True
        parts: list[bytes]
        if path == "/v1/responses":
            media, parts = (
                (SSE, responses_stream(payload, **knobs))
                if streamed
                else (
                    JSON,
                    [
                        _json(
                            response_object(payload, "completed", " ".join(request_words(payload)))
                        )
                    ],
                )
            )
        elif path.startswith("/v1/messages"):  # also a path of no known family, for tests
            media, parts = (
                (SSE, messages_stream(payload, **knobs))
                if streamed
                else (JSON, [_json(message_object(payload))])
            )
        elif path in ("/api/chat", "/api/generate"):
            media, parts = (
                (JSON, [_json(ollama_whole(payload, path))])
                if payload.get("stream") is False
                else (NDJSON, ollama_stream(payload, path, **knobs))
            )
        elif path == "/api/embed":
            inputs = payload.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            answer = {"model": payload.get("model"), "embeddings": [[0.1, 0.2]] * count}
            media, parts = JSON, [_json({**answer, "prompt_eval_count": count})]
        elif path == "/completion":
            media, parts = (SSE, llamacpp_stream(payload, **knobs)) if streamed else (JSON, [b"{}"])
        else:
            media, parts = JSON, [_json(rerank_answer(payload))]
        headers = [(b"Content-Type", media + (b"; charset=utf-8" if media == JSON else b""))]
        if media == JSON:
            headers.append((b"Content-Length", str(len(parts[0])).encode()))
        await peer.send_head(200, headers)
        delay = float(request.headers.get("x-fake-delay", "0"))
        for index, part in enumerate(parts):
            if delay and index:
                await trio.sleep(delay)
            await peer.send_data(part)
        await peer.send_end()
