"""A request body, read once: the model it names, whether it streams, its canonical form.

Theory of operation: the app wraps each request's body in a :class:`RequestBody` and hands that
down. Routing asks it for the model (only when a route matches on models), the cache decision
(:func:`tproxy.core.cachekey.decide`) for its :class:`BodyFacts`; the body is parsed the first
time either asks, and never again. The facts of bodies seen lately are kept in a
:class:`BodyMemo`: a cache hit repeats bytes seen before, and parsing them is the largest part of
deciding.

The JSON is read as ``json.loads`` reads bytes, so routing sees the model an upstream would see
(also in a body given twice the same member name: the last one). The canonical form is the JSON
written again with keys sorted at every depth, no insignificant whitespace and UTF-8 text: one
request written differently (key order, spacing, ``\\u00e9`` or ``é``, ``1.0`` or ``1.00``) has
one form. Numbers are read as an upstream reads them: integers exactly, the others as float64, so
``1`` and ``1.0`` stay different. What cannot be read one way only has no canonical form (the
cache calls it ``not-json`` and passes it through untouched): bytes that are not UTF-8 JSON, NaN
or Infinity (also a number that overflows to it), an object with a duplicate name (parsers
disagree on which one wins), nesting deeper than 64 levels. Only fields that cannot change the
answer may be left out of it (``cache.ignore_fields``, ``("user",)`` by default), and only at the
top level: a ``user`` inside a message is content.

A body larger than ``CANONICAL_BODY_LIMIT`` (256 KiB) gets no canonical form: the cache keys it by
its bytes as they came. Parsing and writing back JSON costs up to ~80 ns a byte (1.3 s for 16 MB
of small objects, on the event loop) where sha256 costs ~1 ns. Its ``model`` and ``stream`` are
not read for the cache (docs/store.md, "Keying large bodies"); routing by model still parses it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tproxy.core.dialects import dialect_for

MAX_DEPTH = 64
CANONICAL_BODY_LIMIT = 256 * 1024


def _within_depth(value: Any) -> bool:
    """Whether containers nest at most MAX_DEPTH levels, walked one level at a time.

    Parsed JSON holds only exact ``dict`` and ``list`` containers, so comparing types is enough.
    """
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(MAX_DEPTH):
        if not level:
            return True
        deeper: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            # Collecting the types runs in C: a long array of numbers is skipped quickly.
            kinds = set(map(type, children))
            if dict in kinds or list in kinds:
                deeper.extend(child for child in children if isinstance(child, dict | list))
        level = deeper
    return not level


def _decoded(body: bytes) -> tuple[str, bool] | None:
    """The body's text as ``json.loads`` decodes bytes, and whether it is strict UTF-8."""
    encoding = json.detect_encoding(body)
    if encoding == "utf-8":
        try:
            return body.decode("utf-8"), True
        except UnicodeDecodeError:
            pass
    try:
        return body.decode(encoding, "surrogatepass"), False
    except UnicodeDecodeError:
        return None


def _parse(body: bytes) -> tuple[Any, bool] | None:
    """The body's JSON value, and whether it has one reading only (strict UTF-8, no object
    naming a member twice); None when it is not JSON. The one parse of a request's body."""
    decoded = _decoded(body)
    if decoded is None:
        return None
    text, one_reading = decoded
    duplicated = False

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        found = dict(pairs)
        duplicated = duplicated or len(found) != len(pairs)
        return found

    try:
        value = json.loads(text, object_pairs_hook=members)
    except (ValueError, RecursionError):
        return None
    return value, one_reading and not duplicated


def _canonical(value: Any, body: bytes, ignore_fields: Collection[str]) -> bytes | None:
    """The canonical bytes of ``value`` (parsed from ``body``), or None when it has none."""
    # Each container opens with one of these bytes (never part of a multi-byte UTF-8 character),
    # so a body with few of them nests no deeper than that: most requests skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and not _within_depth(value):
        return None
    kept = value
    if ignore_fields and isinstance(value, dict):
        kept = {name: member for name, member in value.items() if name not in ignore_fields}
    try:
        text = json.dumps(
            kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError:
        return None
    # A lone surrogate (from a "\ud800" escape) has no UTF-8 form; backslashreplace writes it
    # back as the very JSON escape it came from, so the text still means the same.
    return text.encode("utf-8", "backslashreplace")


def canonical_json(body: bytes, ignore_fields: Collection[str] = ()) -> bytes | None:
    """One byte form for every way of writing the same JSON request, or None if it has none.

    Keys are sorted at every depth, insignificant whitespace is gone, text is UTF-8, and top-level
    members named in ``ignore_fields`` are removed (only when the top level is an object). None
    when the body is not UTF-8 JSON, holds NaN or Infinity, names a member twice, or nests deeper
    than 64 levels. Never raises.
    """
    parsed = _parse(body)
    if parsed is None or not parsed[1]:
        return None
    return _canonical(parsed[0], body, ignore_fields)


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What is read of a request body: its canonical bytes (None: it has no canonical form), the
    model it names and whether it asks for a stream (by the rule of the path's API family)."""

    canonical: bytes | None
    model: str | None
    streamed: bool

    @classmethod
    def of(cls, path: str, canonical: bytes | None, value: Any) -> BodyFacts:
        members = value if isinstance(value, dict) else {}
        model = members.get("model")
        return cls(
            canonical=canonical,
            model=model if isinstance(model, str) else None,
            streamed=dialect_for(path).asks_for_stream(members),
        )

    @classmethod
    def parse(cls, path: str, body: bytes, ignore_fields: Collection[str]) -> BodyFacts:
        """The facts of a body; never raises. Over ``CANONICAL_BODY_LIMIT`` no canonical form
        is written (the cache keys such a body by its bytes)."""
        parsed = _parse(body)
        if parsed is None:
            return cls(canonical=None, model=None, streamed=False)
        value, one_reading = parsed
        keyable = one_reading and len(body) <= CANONICAL_BODY_LIMIT
        return cls.of(path, _canonical(value, body, ignore_fields) if keyable else None, value)


class BodyMemo:
    """The facts of the bodies seen last, so a repeated request (a cache hit) is not parsed again.

    Parsing is the largest part of a decision (``json.loads`` with a Python hook for duplicate
    names, then ``json.dumps`` sorted: ~10 µs for a 100-byte chat request, ~50 µs for 2 KB), and
    a hit arrives with bytes seen before. Keyed by (path, ignored fields, body): the facts are a
    pure function of those, so the decision is the same with or without the memo
    (``tests/test_body_memo.py`` checks it). Least recently used first out.

    Memory is bounded: bodies over ``max_body_bytes`` are not kept, and the kept bodies plus
    their canonical forms stay under ``max_bytes`` (8 MiB by default, plus ~200 bytes of
    bookkeeping per entry). Bodies without a canonical form are remembered as such.
    """

    def __init__(self, max_bytes: int = 8 * 1024 * 1024, max_body_bytes: int = 64 * 1024) -> None:
        self._max_bytes = max_bytes
        self._max_body_bytes = max_body_bytes
        self._bytes = 0
        self._entries: dict[tuple[str, Collection[str], bytes], BodyFacts] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        """The bytes of the kept bodies and canonical forms."""
        return self._bytes

    def facts(self, path: str, body: bytes, ignore_fields: Collection[str]) -> BodyFacts:
        """:meth:`BodyFacts.parse`, remembered. ``ignore_fields`` must be hashable (a tuple)."""
        key = (path, ignore_fields, body)
        entries = self._entries
        if key in entries:
            facts = entries.pop(key)
            entries[key] = facts  # now the most recently used
            return facts
        facts = BodyFacts.parse(path, body, ignore_fields)
        if len(body) <= self._max_body_bytes:
            entries[key] = facts
            self._bytes += _held(body, facts)
            while self._bytes > self._max_bytes:
                oldest = next(iter(entries))
                self._bytes -= _held(oldest[2], entries.pop(oldest))
        return facts


def _held(body: bytes, facts: BodyFacts) -> int:
    return len(body) + len(facts.canonical or b"")


class RequestBody:
    """One request's body, parsed at most once whoever asks first (routing or the cache).

    ``path`` (without the query) picks the API family's stream rule; ``ignore_fields`` are left
    out of the canonical form; ``memo``, when given, remembers the facts of bodies seen before
    (then ``ignore_fields`` must be hashable).
    """

    __slots__ = ("_facts", "_ignore_fields", "_memo", "data", "path")

    def __init__(
        self,
        path: str,
        data: bytes,
        ignore_fields: Collection[str] = (),
        memo: BodyMemo | None = None,
    ) -> None:
        self.path = path
        self.data = data
        self._ignore_fields = ignore_fields
        self._memo = memo
        self._facts: BodyFacts | None = None

    @property
    def model(self) -> str | None:
        """The ``model`` member of a JSON object body when it is a string, else None; never
        raises. A body that does not open with ``{`` is not an object, and is not parsed."""
        if not self.data.lstrip().startswith(b"{"):
            return None
        return self.facts().model

    def facts(self) -> BodyFacts:
        """What the body says; parsed on the first call (or found in the memo), kept after."""
        if self._facts is None:
            if self._memo is not None:
                self._facts = self._memo.facts(self.path, self.data, self._ignore_fields)
            else:
                self._facts = BodyFacts.parse(self.path, self.data, self._ignore_fields)
        return self._facts
