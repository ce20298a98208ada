"""Cache keys and cacheability: may the cache answer or keep this request, and under which key.

Theory of operation: :func:`decide` takes one request's facts (is the cache on, method, path,
headers, body) and returns a :class:`CacheDecision` whose :class:`Verdict` says why. The checks run
cheapest first and the body is parsed last; the first refusal wins. A cacheable request's key is
the sha256 of a versioned tuple in which every field is length-prefixed::

    (KEY_VERSION, METHOD, route, path?query, tenant namespace, canonical body)

so two different tuples never give the same hashed bytes, and raising ``KEY_VERSION`` retires
every stored entry at once. What the decision reads of a body (canonical bytes, model, stream
flag) may come from a :class:`BodyMemo` of recent bodies: a cache hit repeats bytes seen before,
and parsing them is the largest part of deciding.

A body larger than ``CANONICAL_BODY_LIMIT`` (256 KiB) is keyed by its bytes as they came, in a
tuple with one more field (``b"raw"``) so it never meets a canonical one: parsing and writing
back JSON costs up to ~80 ns a byte (1.3 s for 16 MB of small objects, on the event loop) where
sha256 costs ~1 ns. A byte-keyed request is never merged with another one, so it can never be
given another request's answer; the same request written differently merely misses, and its
``model`` and ``stream`` are not read (docs/store.md, "Keying large bodies").

The canonical body is the JSON parsed and written again with keys sorted at every depth, no
insignificant whitespace and UTF-8 text: one request written differently (key order, spacing,
``\\u00e9`` or ``é``, ``1.0`` or ``1.00``) has one key. Numbers are read as an upstream reads
them: integers exactly, the others as float64, so ``1`` and ``1.0`` stay different. What cannot
be read one way only is not cached (``NOT_JSON``) and passes through untouched: bytes that are not
UTF-8 JSON, NaN or Infinity (also a number that overflows to it), an object with a duplicate name
(parsers disagree on which one wins), nesting deeper than 64 levels.

Decisions:

- ``stream`` stays in the key: a streamed answer (SSE or NDJSON frames) and a whole one are
  different bytes; whether a request streams is its API family's rule (Ollama streams unless
  ``"stream": false``). One entry serving both forms is later work.
- Only fields that cannot change the answer may be ignored (the default is ``("user",)``, an
  end-user id for abuse monitoring), and only at the top level: a ``user`` inside a message is
  content.
- The key covers the route (the upstream route's name): two routes never share entries, even
  for the same model name.
- A path is cacheable only when it is listed exactly (no prefix match); the query string is part
  of the key.
- Only POST and GET. A GET with an empty body is keyed with the canonical body ``b""`` (still only
  on a listed path); any other body must be JSON.
- Tenants: the key covers a namespace derived from the client's credential (``authorization``,
  ``api-key``, ``x-api-key``, ``x-goog-api-key``: whichever header carries it), so clients with
  different credentials never see each other's answers. No credential gives ``"anonymous"``;
  ``shared`` puts every client in ``"shared"``. The namespace is a truncated hash: the credential
  itself never reaches a key, a log or the store.
- Request Cache-Control (RFC 9111 §5.2.1): ``no-store`` bypasses the cache entirely (no lookup,
  nothing stored); ``no-cache`` skips the lookup but stores the fresh answer; ``max-age`` and
  ``only-if-cached`` are passed on for the caller to apply to a found entry or a miss. ``Pragma``
  is deprecated by RFC 9111 and ignored.
- Response Cache-Control (RFC 9111 §5.2.2): tproxy is a shared cache, so an answer whose
  upstream says ``no-store`` or ``private`` is not stored (:func:`response_store_refusal`),
  unless the route sets ``ignore_upstream_no_store`` for an upstream that says it of everything.
  Other response directives (``max-age``, ``s-maxage``, ``no-cache``...) are not acted on: an
  answer's lifetime is the route's ``ttl``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tproxy.core.dialects import CREDENTIAL_HEADERS as DIALECT_CREDENTIAL_HEADERS
from tproxy.core.dialects import dialect_for

KEY_VERSION: int = 1

MAX_DEPTH = 64
CANONICAL_BODY_LIMIT = 256 * 1024
CACHEABLE_METHODS = frozenset({"GET", "POST"})
# Every header that carries a client's credential for one of the API families (see dialects).
CREDENTIAL_HEADERS = DIALECT_CREDENTIAL_HEADERS
ANONYMOUS = "anonymous"
SHARED = "shared"

# Domain separation: a key and a namespace are hashes of different kinds of tuple.
_KEY_DOMAIN = b"tproxy/cache-key"
_NAMESPACE_DOMAIN = b"tproxy/tenant"
_NAMESPACE_HEX_DIGITS = 32
_LENGTH = struct.Struct(">Q")

# RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2**31.
_MAX_DELTA_SECONDS = 2**31
_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_DIRECTIVE = re.compile(
    rf'[ \t]*({_TCHAR}+)[ \t]*(?:=[ \t]*(?:({_TCHAR}+)|"((?:[^"\\]|\\.)*)")[ \t]*)?', re.DOTALL
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]+")


def _length_prefixed(fields: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(field)) + field for field in fields)


class _DuplicateNameError(ValueError):
    """An object names one member twice."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _DuplicateNameError
    return members


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


def _parse_canonical(body: bytes, ignore_fields: Collection[str]) -> tuple[Any, bytes] | None:
    """The parsed body (before any field is removed) and its canonical bytes, or None."""
    try:
        value = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_members)
    except (ValueError, RecursionError):
        return None
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
    return value, text.encode("utf-8", "backslashreplace")


def canonical_json(body: bytes, ignore_fields: Collection[str] = ()) -> bytes | None:
    """One byte form for every way of writing the same JSON request, or None if it has none.

    Keys are sorted at every depth, insignificant whitespace is gone, text is UTF-8, and top-level
    members named in ``ignore_fields`` are removed (only when the top level is an object). None
    when the body is not UTF-8 JSON, holds NaN or Infinity, names a member twice, or nests deeper
    than 64 levels. Never raises.
    """
    parsed = _parse_canonical(body, ignore_fields)
    return None if parsed is None else parsed[1]


def tenant_namespace(headers: Iterable[tuple[bytes, bytes]], shared: bool) -> str:
    """The cache namespace of the client's credential, so tenants never share answers.

    The credential is every non-empty value of the :data:`CREDENTIAL_HEADERS` (``authorization``,
    ``api-key``, ``x-api-key``, ``x-goog-api-key``), in that order, each with its header name
    (``Bearer A`` and ``api-key: A`` differ). Returns 32 hex
    digits of its sha256, ``"anonymous"`` without a credential, or ``"shared"`` when ``shared``.
    """
    if shared:
        return SHARED
    found: dict[bytes, list[bytes]] = {name: [] for name in CREDENTIAL_HEADERS}
    for name, value in headers:
        values = found.get(name.lower())
        if values is not None and value.strip():
            values.append(value)
    fields = [
        part for name in CREDENTIAL_HEADERS for value in found[name] for part in (name, value)
    ]
    if not fields:
        return ANONYMOUS
    digest = hashlib.sha256(_length_prefixed((_NAMESPACE_DOMAIN, *fields))).hexdigest()
    return digest[:_NAMESPACE_HEX_DIGITS]


def cache_key(
    method: str,
    route: str,
    target: str,
    namespace: str,
    canonical_body: bytes,
    *,
    raw_body: bool = False,
) -> str:
    """The hex sha256 naming one cacheable request.

    ``target`` is the path plus ``?query`` when there is one. Every field is length-prefixed, so
    different tuples never give the same hashed bytes. Text is encoded with ``surrogatepass``,
    which is one-to-one and never raises. ``raw_body``: the body is keyed as it came, not in its
    canonical form, and the tuple says so.
    """
    fields = (method.upper(), route, target, namespace)
    material = _length_prefixed(
        (
            _KEY_DOMAIN,
            str(KEY_VERSION).encode("ascii"),
            *(field.encode("utf-8", "surrogatepass") for field in fields),
            *((b"raw",) if raw_body else ()),
            canonical_body,
        )
    )
    return hashlib.sha256(material).hexdigest()


@dataclass(frozen=True, slots=True)
class RequestCacheControl:
    """The request Cache-Control directives tproxy acts on (RFC 9111 §5.2.1)."""

    no_store: bool = False
    no_cache: bool = False
    only_if_cached: bool = False
    max_age: int | None = None


def _list_members(value: str) -> list[str]:
    """Split an HTTP list on the commas that are outside quoted strings."""
    members: list[str] = []
    start = 0
    quoted = escaped = False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            escaped = char == "\\"
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == ",":
            members.append(value[start:index])
            start = index + 1
    members.append(value[start:])
    return members


def _delta_seconds(argument: str | None) -> int | None:
    if argument is None or not _DIGITS.fullmatch(argument):
        return None
    # Compare lengths first: int() refuses strings of more than 4300 digits.
    if len(argument) > len(str(_MAX_DELTA_SECONDS)):
        return _MAX_DELTA_SECONDS
    return min(int(argument), _MAX_DELTA_SECONDS)


def _directives(values: Iterable[bytes]) -> Iterator[tuple[str, str | None]]:
    """Each well-formed ``Cache-Control`` member: its lower-cased name and its argument."""
    for value in values:
        for member in _list_members(value.decode("latin-1")):
            match = _DIRECTIVE.fullmatch(member)
            if match is None:
                continue
            name, token, quoted = match.groups()
            argument = token if quoted is None else _QUOTED_PAIR.sub(r"\1", quoted)
            yield name.lower(), argument


def parse_cache_control(values: Iterable[bytes]) -> RequestCacheControl:
    """The request directives found in the given ``Cache-Control`` header values.

    Names are case-insensitive and lists may span several header lines; arguments may be tokens
    or quoted strings. Unknown directives and malformed members are ignored, and so is a
    ``max-age`` that is not delta-seconds; when several are valid the first wins. Never raises.
    ``Pragma: no-cache`` is not handled here.
    """
    no_store = no_cache = only_if_cached = False
    max_age: int | None = None
    for name, argument in _directives(values):
        match name:
            case "no-store":
                no_store = True
            case "no-cache":
                no_cache = True
            case "only-if-cached":
                only_if_cached = True
            case "max-age" if max_age is None:
                max_age = _delta_seconds(argument)
    return RequestCacheControl(no_store, no_cache, only_if_cached, max_age)


def response_store_refusal(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a shared cache must not store this response (RFC 9111 §3, §5.2.2.3 and §5.2.2.7),
    or None when it may.

    ``no-store`` and ``private`` refuse, also ``private="field-names"``: tproxy cannot store an
    answer without some of its header fields, so the qualified form refuses as the bare one.
    Names are matched whatever their case, in any number of ``Cache-Control`` lines. Never raises.
    """
    names = {
        name
        for name, _ in _directives(
            value for header, value in headers if header.lower() == b"cache-control"
        )
    }
    for refusing in ("no-store", "private"):
        if refusing in names:
            return f"upstream Cache-Control: {refusing}"
    return None


class Verdict(enum.Enum):
    """Why a request is or is not cacheable; the values appear in logs and Cache-Status."""

    CACHEABLE = "cacheable"
    DISABLED = "disabled"  # the cache is off, globally or on the route
    METHOD = "method"  # neither POST nor GET
    PATH = "path"  # the path is not one of the cacheable paths
    NO_STORE = "no-store"  # the client said Cache-Control: no-store
    NOT_JSON = "not-json"  # the body has no canonical form; it is passed through untouched


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What the cache may do with one request.

    ``key`` is set iff the verdict is CACHEABLE, and ``lookup``, ``store``, ``streamed`` and
    ``model`` are only ever true or set then; the last two come from a JSON object body, and a
    body keyed by its bytes (over ``CANONICAL_BODY_LIMIT``) is not read, so they stay False and
    None. ``max_age`` and ``only_if_cached`` report the client's Cache-Control whatever the
    verdict.
    """

    verdict: Verdict
    key: str | None
    lookup: bool
    store: bool
    max_age: int | None
    only_if_cached: bool
    streamed: bool
    model: str | None


def _refused(verdict: Verdict, control: RequestCacheControl) -> CacheDecision:
    return CacheDecision(
        verdict=verdict,
        key=None,
        lookup=False,
        store=False,
        max_age=control.max_age,
        only_if_cached=control.only_if_cached,
        streamed=False,
        model=None,
    )


def decide(
    *,
    enabled: bool,
    method: str,
    route: str,
    path: str,
    query: str,
    cacheable_paths: Collection[str],
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    ignore_fields: Collection[str],
    shared: bool,
    memo: BodyMemo | None = None,
) -> CacheDecision:
    """Whether and how the cache may serve and keep this request; never raises.

    ``memo`` remembers the facts of bodies seen before (then ``ignore_fields`` must be hashable).
    """
    header_list = list(headers)
    control = parse_cache_control(
        value for name, value in header_list if name.lower() == b"cache-control"
    )
    method = method.upper()
    if not enabled:
        return _refused(Verdict.DISABLED, control)
    if method not in CACHEABLE_METHODS:
        return _refused(Verdict.METHOD, control)
    if path not in cacheable_paths:
        return _refused(Verdict.PATH, control)
    if control.no_store:
        return _refused(Verdict.NO_STORE, control)
    raw_body = len(body) > CANONICAL_BODY_LIMIT
    if raw_body or not (method == "POST" or body):
        facts: BodyFacts | None = BodyFacts.of(path, body if raw_body else b"", None)
    elif memo is not None:
        facts = memo.facts(path, body, ignore_fields)
    else:
        facts = BodyFacts.parse(path, body, ignore_fields)
    if facts is None:
        return _refused(Verdict.NOT_JSON, control)
    target = f"{path}?{query}" if query else path
    return CacheDecision(
        verdict=Verdict.CACHEABLE,
        key=cache_key(
            method,
            route,
            target,
            tenant_namespace(header_list, shared),
            facts.canonical,
            raw_body=raw_body,
        ),
        lookup=not control.no_cache,
        store=True,
        max_age=control.max_age,
        only_if_cached=control.only_if_cached,
        streamed=facts.streamed,
        model=facts.model,
    )


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What a cache decision reads of a request body: its canonical bytes, the model it names
    and whether it asks for a stream (by the rule of the path's API family)."""

    canonical: bytes
    model: str | None
    streamed: bool

    @classmethod
    def of(cls, path: str, canonical: bytes, value: Any) -> BodyFacts:
        members = value if isinstance(value, dict) else {}
        model = members.get("model")
        return cls(
            canonical=canonical,
            model=model if isinstance(model, str) else None,
            streamed=dialect_for(path).asks_for_stream(members),
        )

    @classmethod
    def parse(cls, path: str, body: bytes, ignore_fields: Collection[str]) -> BodyFacts | None:
        """The facts of a JSON body, or None when it has no canonical form."""
        parsed = _parse_canonical(body, ignore_fields)
        return None if parsed is None else cls.of(path, parsed[1], parsed[0])


class BodyMemo:
    """The facts of the bodies seen last, so a repeated request (a cache hit) is not parsed again.

    Parsing is the largest part of a decision (``json.loads`` with a Python hook for duplicate
    names, then ``json.dumps`` sorted: ~10 µs for a 100-byte chat request, ~50 µs for 2 KB), and
    a hit arrives with bytes seen before. Keyed by (path, ignored fields, body): the facts are a
    pure function of those, so the decision is the same with or without the memo
    (``tests/test_cachekey.py`` checks it). Least recently used first out.

    Memory is bounded: bodies over ``max_body_bytes`` are not kept, and the kept bodies plus
    their canonical forms stay under ``max_bytes`` (8 MiB by default, plus ~200 bytes of
    bookkeeping per entry). Bodies without a canonical form are remembered as such.
    """

    def __init__(self, max_bytes: int = 8 * 1024 * 1024, max_body_bytes: int = 64 * 1024) -> None:
        self._max_bytes = max_bytes
        self._max_body_bytes = max_body_bytes
        self._bytes = 0
        self._entries: dict[tuple[str, Collection[str], bytes], BodyFacts | None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        """The bytes of the kept bodies and canonical forms."""
        return self._bytes

    def facts(self, path: str, body: bytes, ignore_fields: Collection[str]) -> BodyFacts | None:
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


def _held(body: bytes, facts: BodyFacts | None) -> int:
    return len(body) + (0 if facts is None else len(facts.canonical))
