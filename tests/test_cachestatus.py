"""Cache-Status as a value: the header's bytes and the metric label come from one object.

The header must read, to anyone who parses it as RFC 9211 and RFC 8941 say, as the same fields
the label was taken from: the property test parses every rendering back (here, in the test only:
the product never parses its own header) and compares.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.cachestatus import CacheStatus, Forward

MISS = CacheStatus.forwarded(Forward.MISS)
SF_INTEGER_MAX = 999_999_999_999_999
SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (CacheStatus.hit(3512), "tproxy; hit; ttl=3512"),
        (CacheStatus.hit(), "tproxy; hit"),
        (CacheStatus.hit(60, "shared"), "tproxy; hit; ttl=60; detail=shared"),
        (MISS, "tproxy; fwd=miss"),
        (CacheStatus.forwarded(Forward.REQUEST), "tproxy; fwd=request"),
        (CacheStatus.forwarded(Forward.BYPASS), "tproxy; fwd=bypass"),
        (CacheStatus.forwarded(Forward.STALE), "tproxy; fwd=stale"),
        (
            CacheStatus.forwarded(Forward.MISS, detail="not-json"),
            "tproxy; fwd=miss; detail=not-json",
        ),
        (MISS.joined(), "tproxy; fwd=miss; collapsed"),
        (CacheStatus.forwarded(Forward.STALE).joined(), "tproxy; fwd=stale; collapsed"),
        (CacheStatus.hit(-5), "tproxy; hit; ttl=-5"),
        (CacheStatus.hit(10**20), "tproxy; hit; ttl=999999999999999"),
        (
            CacheStatus(Forward.MISS, ttl=60, collapsed=True, detail="x"),
            "tproxy; fwd=miss; ttl=60; collapsed; detail=x",
        ),
    ],
)
def test_cache_status_values(status: CacheStatus, expected: str) -> None:
    assert status.text == expected
    assert status.header == expected.encode()


@pytest.mark.parametrize(
    ("detail", "written"),
    [
        ("no-store", "no-store"),
        ("key/v1:x", "key/v1:x"),
        ("two words", '"two words"'),
        ("1st", '"1st"'),
        ("", '""'),
        ('say "hi" \\ bye', '"say \\"hi\\" \\\\ bye"'),
        ("café\r\nSet-Cookie: x", '"caf???Set-Cookie: x"'),
    ],
)
def test_a_detail_that_is_not_a_token_is_quoted(detail: str, written: str) -> None:
    status = CacheStatus.forwarded(Forward.BYPASS, detail=detail)
    assert status.text == f"tproxy; fwd=bypass; detail={written}"


def test_a_hit_is_never_collapsed() -> None:
    with pytest.raises(ValueError, match="not collapsed"):
        CacheStatus.hit(60).joined()


def test_every_forward_reason_is_a_token() -> None:
    assert all(SF_TOKEN.fullmatch(fwd.value) for fwd in Forward)


statuses = st.builds(
    CacheStatus,
    fwd=st.sampled_from(Forward),
    ttl=st.none() | st.integers(),
    collapsed=st.booleans(),
    detail=st.none() | st.text(),
) | st.builds(
    CacheStatus, fwd=st.none(), ttl=st.none() | st.integers(), detail=st.none() | st.text()
)

# One parameter of an RFC 8941 item: ``; key``, ``; key=token-or-integer`` or ``; key="string"``.
PARAMETER = re.compile(r'; ([a-z*][a-z0-9_.*-]*)(?:=("(?:[^"\\]|\\.)*"|[^;" ]+))?')


def read_back(header: bytes) -> dict[str, str | bool]:
    """The parameters of a Cache-Status list member, as a reader of RFC 9211 finds them."""
    text = header.decode("ascii")
    assert text.startswith("tproxy")
    rest = text.removeprefix("tproxy")
    parameters: dict[str, str | bool] = {}
    position = 0
    while position < len(rest):
        match = PARAMETER.match(rest, position)
        assert match is not None, rest[position:]
        name, value = match.groups()
        assert name not in parameters
        if value is None:
            parameters[name] = True
        elif value.startswith('"'):
            parameters[name] = re.sub(r"\\(.)", r"\1", value[1:-1])
        else:
            parameters[name] = value
        position = match.end()
    return parameters


def label_of(parameters: dict[str, str | bool]) -> str:
    """The metric label a reader of the header would give it."""
    if parameters.get("hit") is True:
        return "hit"
    if parameters.get("collapsed") is True:
        return "collapsed"
    fwd = parameters["fwd"]
    assert isinstance(fwd, str)
    return fwd


@settings(max_examples=500)
@given(statuses)
def test_the_header_and_the_label_say_the_same(status: CacheStatus) -> None:
    header = status.header
    assert all(0x20 <= byte <= 0x7E for byte in header)
    assert header == status.text.encode()
    parameters = read_back(header)
    assert status.label == label_of(parameters)
    assert ("hit" in parameters) is (status.fwd is None)
    assert parameters.get("fwd") == (None if status.fwd is None else status.fwd.value)
    assert ("collapsed" in parameters) is status.collapsed
    if status.ttl is None:
        assert "ttl" not in parameters
    else:
        assert parameters["ttl"] == str(max(-SF_INTEGER_MAX, min(SF_INTEGER_MAX, status.ttl)))
    if status.detail is None:
        assert "detail" not in parameters
    else:
        printable = "".join(char if " " <= char <= "~" else "?" for char in status.detail)
        assert parameters["detail"] == printable
