"""The fault suite's scripted upstream, for the tests here that need an upstream to misbehave."""

from __future__ import annotations

from tests.faults.conftest import start_scripted

__all__ = ["start_scripted"]
