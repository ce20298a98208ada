"""Cache keys and cacheability: may the cache answer or keep this request, and under which key.

Theory of operation: :func:`decide` takes one request's facts (is the cache on, method, path,
headers, the body as :class:`~tproxy.core.body.RequestBody`, the tenant) and returns a
:class:`CacheDecision` whose :class:`Verdict` says why. The checks run cheapest first and the body
is read last (parsed then, unless routing or the memo already did: :mod:`tproxy.core.body`); the
first refusal wins. A cacheable request's key is the sha256 of a versioned tuple in which every
field is length-prefixed::

    (KEY_VERSION, METHOD, route, path?query, tenant namespace, canonical body)

so two different tuples never give the same hashed bytes, and raising ``KEY_VERSION`` retires
every stored entry at once. A body without a canonical form is not cached (``NOT_JSON``) and
passes through untouched. A body larger than ``CANONICAL_BODY_LIMIT`` (256 KiB) is keyed by its
bytes as they came, in a tuple with one more field (``b"raw"``) so it never meets a canonical one:
a byte-keyed request is never merged with another one, so it can never be given another request's
answer; the same request written differently merely misses.

This module is the decision; :mod:`tproxy.core.body` is what a body says (its one parse, the
canonical form, the memo): routing reads the body too, and before the decision.

Decisions:

- ``stream`` stays in the key: a streamed answer (SSE or NDJSON frames) and a whole one are
  different bytes; whether a request streams is its API family's rule (Ollama streams unless
  ``"stream": false``). One entry serving both forms is later work.
- Only fields that cannot change the answer may be ignored (the default is ``("user",)``, an
  end-user id for abuse monitoring), and only at the top level (see :mod:`tproxy.core.body`).
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
  itself never reaches a key, a log or the store. It is computed once per request, by the caller
  (the exchange's tenant is the same hash), and handed to :func:`decide`.
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
import re
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from tproxy.core.body import CANONICAL_BODY_LIMIT, BodyFacts, RequestBody
from tproxy.core.dialects import CREDENTIAL_HEADERS as DIALECT_CREDENTIAL_HEADERS

KEY_VERSION: int = 1

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
    body: RequestBody,
    tenant: str,
    shared: bool,
) -> CacheDecision:
    """Whether and how the cache may serve and keep this request; never raises.

    ``body`` is the request's (read for ``path``); it is parsed here only if nothing read it
    before. ``tenant`` is :func:`tenant_namespace` of the request's headers, not shared: the key's
    namespace, unless ``shared`` puts every client in one.
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
    data = body.data
    raw_body = len(data) > CANONICAL_BODY_LIMIT
    if raw_body or not (method == "POST" or data):
        facts = BodyFacts.of(path, data if raw_body else b"", None)
    else:
        facts = body.facts()
    if facts.canonical is None:
        return _refused(Verdict.NOT_JSON, control)
    target = f"{path}?{query}" if query else path
    return CacheDecision(
        verdict=Verdict.CACHEABLE,
        key=cache_key(
            method,
            route,
            target,
            SHARED if shared else tenant,
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
