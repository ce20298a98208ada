"""Client authentication: which credentials let a request through, and what the others are told."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.clientauth import INVALID_API_KEY, ClientKeys, hash_key, parse_key_hash
from tproxy.core.errors import RequestRejected

KEY = "tp-7Qm2vX9kLr4sWz8Nc1Hd5Jf0"
OTHER_KEY = "tp-Bb3nM6pQ0tYw2Ex7Ua9Kc4Lg"
UNKNOWN_KEY = "tp-not-on-the-list-000000000"

Headers = list[tuple[bytes, bytes]]


@pytest.fixture
def keys() -> ClientKeys:
    return ClientKeys([hash_key(KEY), hash_key(OTHER_KEY)])


def assert_refused(result: RequestRejected | None, *, missing: bool) -> RequestRejected:
    assert result is not None
    assert (result.status, result.code) == (401, INVALID_API_KEY)
    assert result.message.startswith("You didn't provide" if missing else "Incorrect API key")
    return result


# -- hashes ---------------------------------------------------------------------------


def test_a_key_is_hashed_as_sha256_of_its_utf8_bytes() -> None:
    assert hash_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_key("é") == "sha256:" + hashlib.sha256("é".encode()).hexdigest()


def test_a_hash_parses_to_its_digest_in_either_case_of_hex() -> None:
    digest = hashlib.sha256(b"abc").digest()
    assert parse_key_hash(hash_key("abc")) == digest
    assert parse_key_hash("sha256:" + digest.hex().upper()) == digest


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("sha256:abc", False),
        ("sha256:" + "g" * 64, False),
        ("sha256:" + "a" * 65, False),
        ("SHA256:" + "a" * 64, True),
        ("sk-live-SECRET-KEY", True),
        ("", True),
    ],
)
def test_a_malformed_hash_is_refused_without_repeating_it(text: str, hint: bool) -> None:
    with pytest.raises(ValueError, match=r'^expected "sha256:" followed by 64 hex digits') as error:
        parse_key_hash(text)
    assert ("not the key itself" in str(error.value)) is hint
    if text:
        assert text not in str(error.value)


def test_client_keys_refuse_a_malformed_hash_and_count_the_rest() -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        ClientKeys([hash_key(KEY), "sha256:00"])
    assert len(ClientKeys([hash_key(KEY), hash_key(OTHER_KEY)])) == 2


# -- accepted credentials -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", f"Bearer {KEY}".encode())],
        [(b"authorization", f"bearer   {KEY}".encode())],
        [(b"authorization", f"BEARER {KEY} ".encode())],
        [(b"api-key", KEY.encode())],
        [(b"x-api-key", KEY.encode())],
        [(b"X-Api-Key", f" {OTHER_KEY} ".encode())],
        [(b"content-type", b"application/json"), (b"x-api-key", OTHER_KEY.encode())],
        [(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", OTHER_KEY.encode())],
        [(b"authorization", f"Bearer {KEY}".encode()), (b"api-key", b"  ")],
    ],
    ids=[
        "bearer",
        "bearer-lower-case-many-spaces",
        "bearer-upper-case",
        "api-key",
        "x-api-key",
        "header-name-in-any-case",
        "among-other-headers",
        "two-accepted-keys",
        "blank-second-header-ignored",
    ],
)
def test_an_accepted_key_in_any_credential_header_passes(
    keys: ClientKeys, headers: Headers
) -> None:
    assert keys.check(headers) is None


# -- refused credentials --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"application/json")],
        [(b"api-key", b"")],
        [(b"authorization", b"  \t")],
        [(b"proxy-authorization", f"Bearer {KEY}".encode())],
    ],
    ids=["no-headers", "no-credential", "empty-api-key", "blank-authorization", "proxy-auth"],
)
def test_a_request_without_a_credential_is_told_to_send_one(
    keys: ClientKeys, headers: Headers
) -> None:
    assert_refused(keys.check(headers), missing=True)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", f"Bearer {UNKNOWN_KEY}".encode())],
        [(b"x-api-key", UNKNOWN_KEY.encode())],
        [(b"api-key", f"Bearer {KEY}".encode())],
        [(b"authorization", KEY.encode())],
        [(b"authorization", b"Basic dXNlcjpwYXNz")],
        [(b"authorization", b"Bearer")],
        [(b"authorization", b"Bearer   ")],
        [(b"authorization", f"Bearer\t{KEY}".encode())],
        [(b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", UNKNOWN_KEY.encode())],
        [(b"x-api-key", UNKNOWN_KEY.encode()), (b"api-key", KEY.encode())],
        [(b"x-api-key", KEY.encode() + b"x")],
        [(b"x-api-key", KEY.upper().encode())],
    ],
    ids=[
        "unknown-bearer",
        "unknown-x-api-key",
        "bearer-in-api-key",
        "key-without-scheme",
        "basic-scheme",
        "bearer-without-token",
        "bearer-with-blank-token",
        "tab-after-scheme",  # RFC 9110 §11.4: the scheme is followed by spaces only
        "second-credential-unknown",
        "first-credential-unknown",
        "one-byte-more",
        "other-case",
    ],
)
def test_a_request_with_any_unaccepted_credential_is_refused(
    keys: ClientKeys, headers: Headers
) -> None:
    refusal = assert_refused(keys.check(headers), missing=False)
    for _, value in headers:
        assert value.decode() not in refusal.message


def test_the_hash_of_an_empty_key_never_admits_an_empty_credential() -> None:
    keys = ClientKeys([hash_key("")])
    assert_refused(keys.check([(b"authorization", b"Bearer ")]), missing=False)
    assert_refused(keys.check([(b"authorization", b"Token abc")]), missing=False)


def test_with_no_accepted_keys_every_request_is_refused() -> None:
    keys = ClientKeys([])
    assert_refused(keys.check([(b"authorization", f"Bearer {KEY}".encode())]), missing=False)
    assert_refused(keys.check([]), missing=True)


def test_each_refusal_is_a_fresh_exception(keys: ClientKeys) -> None:
    """A caller may raise what it gets; a shared instance would carry one request's traceback
    into the next."""
    assert keys.check([]) is not keys.check([])


def test_every_accepted_digest_is_compared_in_constant_time(
    keys: ClientKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []

    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert keys.check([(b"x-api-key", KEY.encode())]) is None  # matches the first digest
    assert len(compared) == 2  # and still compares the second
    assert {len(a) for a, _ in compared} == {32}


# -- any headers --------------------------------------------------------------------------

_NAMES = st.sampled_from(
    [b"authorization", b"Authorization", b"api-key", b"X-API-KEY", b"x-api-key", b"cookie", b"a"]
)
_VALUES = st.one_of(
    st.sampled_from([f"Bearer {KEY}".encode(), KEY.encode(), b"", b"Bearer ", b"Basic x"]),
    st.binary(max_size=40),
)


@settings(max_examples=300)
@given(headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=5))
def test_any_headers_give_a_verdict_whose_message_depends_on_nothing_sent(
    headers: Headers,
) -> None:
    keys = ClientKeys([hash_key(KEY)])
    fixed_messages = {
        refusal.message
        for refusal in (keys.check([]), keys.check([(b"x-api-key", b"wrong")]))
        if refusal is not None
    }
    result = keys.check(headers)
    if result is not None:
        assert (result.status, result.code) == (401, INVALID_API_KEY)
        assert result.message in fixed_messages
    # Headers that are not credentials never change the verdict.
    with_noise = [(b"cookie", KEY.encode()), *headers, (b"x-other", b"Bearer nope")]
    assert (keys.check(with_noise) is None) == (result is None)
