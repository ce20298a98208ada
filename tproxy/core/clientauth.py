"""Client authentication: which requests may use the proxy at all.

Theory of operation: the operator configures the sha256 hashes of the keys clients may present,
written ``sha256:<64 hex digits>``, never the keys themselves, so a leaked settings file grants
nothing. :class:`ClientKeys` holds those digests. :meth:`ClientKeys.check` looks at a request's
credential headers, the same ones the cache key reads (``Authorization: Bearer <key>``,
``api-key: <key>``, ``x-api-key: <key>``, ``x-goog-api-key: <key>``), hashes each key
presented and compares the digest with every accepted one using :func:`hmac.compare_digest`,
without stopping at the first match, so the time taken says nothing about which digest, or how
much of one, matched.

A request passes when it presents at least one credential and every credential it presents is an
accepted key: a second, unchecked credential could otherwise ride along to the upstream or into
the tenant namespace. Otherwise :meth:`~ClientKeys.check` returns a 401 rejection in the OpenAI
error shape (code ``invalid_api_key``) whose message never repeats what the client sent. An empty
set of digests refuses every request: authentication that is configured fails closed.

Hashes are unsalted, which is sound only for keys with enough entropy to resist guessing (random
tokens of 128 bits or more); docs/configuration.md says so.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from tproxy.core.cachekey import CREDENTIAL_HEADERS
from tproxy.core.errors import RequestRejected

HASH_PREFIX = "sha256:"
INVALID_API_KEY = "invalid_api_key"

_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")
_BEARER = b"bearer"
_AUTHORIZATION = b"authorization"
_OWS = b" \t"

_MISSING_MESSAGE = (
    "You didn't provide an API key. Send your key in an Authorization header using Bearer auth"
    " (Authorization: Bearer YOUR_KEY), or in an api-key or x-api-key header."
)
_INCORRECT_MESSAGE = "Incorrect API key provided. Ask the operator of this proxy for a valid key."


def hash_key(key: str) -> str:
    """The configuration form of ``key``: ``sha256:`` and the hex digest of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def parse_key_hash(text: str) -> bytes:
    """The 32-byte digest in ``sha256:<hex>`` (either case of hex digits).

    Raises ValueError whose message never repeats ``text``: a malformed entry may be a key that
    was pasted where its hash belongs.
    """
    if not _HASH.fullmatch(text):
        hint = "" if text.startswith(HASH_PREFIX) else " (the hash of a key, not the key itself)"
        raise ValueError(f'expected "sha256:" followed by 64 hex digits{hint}')
    return bytes.fromhex(text[len(HASH_PREFIX) :])


def _presented_key(name: bytes, value: bytes) -> bytes | None:
    """The key a credential header carries; None when the header is not a credential or blank.

    An ``Authorization`` value of another scheme than Bearer, or a Bearer with no token, is a
    credential that carries no usable key: ``b""``, which is never accepted.
    """
    lowered = name.lower()
    if lowered not in CREDENTIAL_HEADERS:
        return None
    value = value.strip(_OWS)
    if not value:
        return None
    if lowered != _AUTHORIZATION:
        return value
    scheme, _, token = value.partition(b" ")
    return token.strip(_OWS) if scheme.lower() == _BEARER else b""


def _missing() -> RequestRejected:
    return RequestRejected(401, INVALID_API_KEY, _MISSING_MESSAGE)


def _incorrect() -> RequestRejected:
    return RequestRejected(401, INVALID_API_KEY, _INCORRECT_MESSAGE)


class ClientKeys:
    """The keys clients may present, held as sha256 digests.

    Built from ``sha256:<hex>`` strings (``settings.auth.client_keys``); raises ValueError for a
    malformed one. Immutable once built; safe to share between requests.
    """

    __slots__ = ("_digests",)

    def __init__(self, hashes: Iterable[str]) -> None:
        self._digests = tuple(parse_key_hash(text) for text in hashes)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> RequestRejected | None:
        """None when the request may proceed, else the 401 to answer it with."""
        presented = [
            key for name, value in headers if (key := _presented_key(name, value)) is not None
        ]
        if not presented:
            return _missing()
        if all(self._accepts(key) for key in presented):
            return None
        return _incorrect()

    def _accepts(self, key: bytes) -> bool:
        digest = hashlib.sha256(key).digest()
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return matched and bool(key)
