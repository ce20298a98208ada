"""Which request lines tproxy refuses before forwarding anything."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.target import check_request_line

JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    "path",
    [b"/v1/chat/completions", b"/v1/models?limit=2", b"/", b"/v1/a.b/c..d", b"/v1/%2Fx", b"/..a"],
)
def test_origin_form_targets_without_dot_segments_pass(path: bytes) -> None:
    assert check_request_line("POST", path, JSON) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", b"http://example.com/v1/models"),
        ("CONNECT", b"example.com:443"),
        ("OPTIONS", b"*"),
    ],
)
def test_other_forms_are_refused_as_an_open_proxy_would_accept_them(
    method: str, path: bytes
) -> None:
    refusal = check_request_line(method, path, [])
    assert refusal is not None
    assert (refusal.status, refusal.code) == (400, "absolute_form_refused")


@pytest.mark.parametrize(
    "path", [b"/v1/../admin", b"/v1/./models", b"/v1/%2e%2e/admin", b"/v1/.%2E/x", b"/.."]
)
def test_dot_segments_are_refused_even_percent_encoded(path: bytes) -> None:
    refusal = check_request_line("GET", path, [])
    assert refusal is not None
    assert refusal.code == "dot_segment_refused"


def test_transfer_encoding_with_content_length_is_ambiguous() -> None:
    headers = [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")]
    refusal = check_request_line("POST", b"/v1/completions", headers)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (400, "ambiguous_framing")


@given(st.binary(max_size=200), st.sampled_from(["GET", "POST", "CONNECT", "BREW"]))
def test_any_target_gets_a_verdict_without_raising(path: bytes, method: str) -> None:
    check_request_line(method, path, [])
