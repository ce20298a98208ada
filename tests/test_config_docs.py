"""The example file and the reference stay true to the schema.

Every key list here comes from :mod:`tproxy.config.schema` (the fields that declare a checker),
so a key added there and not to ``conf/tproxy.toml`` and ``docs/configuration.md`` fails here:
each key must be shown in the example file, and have its row in the reference with the type its
checker accepts and its default. The example file shows the defaults, as its header says.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tproxy.config import Overrides, Settings, check_config, load_settings
from tproxy.config.messages import BadValueError
from tproxy.config.schema import key_checks, tables

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "tproxy.toml"
REFERENCE = ROOT / "docs" / "configuration.md"

TABLES = {name: found.heading for name, found in tables().items()}
# Defaults the reference describes rather than writes as a value: the route's name depends on
# its index, the cache directory on the platform.
DESCRIBED_DEFAULTS = {("routes", "name"), ("cache", "dir")}


def _example_section(heading: str) -> str:
    """The example file's text for one table: several tables for ``[upstreams.NAME]`` (each
    upstream, its headers) and ``[[routes]]``; commented out for a table off by default."""
    text = EXAMPLE.read_text()
    prefix = heading.removesuffix("NAME]")
    start = text.index(prefix)
    for later in re.finditer(r"^(# )?\[", text[start:], re.MULTILINE):
        heading_text = text[start + later.start() :].removeprefix("# ")
        if later.start() > 0 and not heading_text.startswith(prefix):
            return text[start : start + later.start()]
    return text[start:]


def _reference_sections() -> dict[str, str]:
    parts = re.split(r"^## ", REFERENCE.read_text(), flags=re.MULTILINE)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def _reference_rows(heading: str) -> dict[str, tuple[str, str]]:
    """The key rows of a table in the reference: each key's type and default columns."""
    section = _reference_sections()[f"`{heading}`"]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \| ", section, re.MULTILINE)
    return {key: (kind, default) for key, kind, default in rows}


def test_the_example_file_is_valid() -> None:
    assert check_config(EXAMPLE).problems == []


def test_the_example_file_has_two_upstreams_and_a_model_route() -> None:
    loaded = load_settings(EXAMPLE)
    assert len(loaded.upstreams) == 2
    assert len(loaded.routes) == 2
    assert any(route.models for route in loaded.routes)


def test_every_table_of_the_schema_is_in_the_example_and_the_reference() -> None:
    assert list(TABLES) == [
        "server",
        "cache",
        "log",
        "upstreams",
        "routes",
        "admin",
        "telemetry",
        "payload_log",
        "auth",
        "shared_store",
    ]
    for heading in TABLES.values():
        assert _example_section(heading)
        assert f"`{heading}`" in _reference_sections(), heading


@pytest.mark.parametrize("table", TABLES)
def test_the_example_file_shows_every_key(table: str) -> None:
    section = _example_section(TABLES[table])
    for name in key_checks(tables()[table].cls):
        # A key whose value is a table is shown as its own table: [upstreams.openai.headers].
        shown = rf"^(# )?({name} = |\[[^\]\n]*\.{name}\])"
        assert re.search(shown, section, re.MULTILINE), f"{TABLES[table]} {name}"


@pytest.mark.parametrize("table", TABLES)
def test_the_reference_has_one_row_for_each_key_and_no_other(table: str) -> None:
    assert sorted(_reference_rows(TABLES[table])) == sorted(key_checks(tables()[table].cls))


@pytest.mark.parametrize("table", TABLES)
def test_the_reference_gives_each_key_the_type_its_checker_accepts(table: str) -> None:
    rows = _reference_rows(TABLES[table])
    for name, checker in key_checks(tables()[table].cls).items():
        assert rows[name][0] == checker.kind, f"{TABLES[table]} {name}"


def _documented_default(table: str, field: dataclasses.Field[Any]) -> object:
    """The default the reference writes for a key, read through the key's own checker."""
    cell = _reference_rows(TABLES[table])[field.name][1]
    if cell.startswith("required"):
        return dataclasses.MISSING
    if cell.startswith("none"):
        return None
    written = re.match(r"`([^`]+)`", cell)
    assert written, f"{TABLES[table]} {field.name}: no default in {cell!r}"
    value = tomllib.loads(f"value = {written.group(1)}")["value"]
    checker = key_checks(tables()[table].cls)[field.name]
    try:
        return checker.bind(ROOT)(value)
    except BadValueError as invalid:
        pytest.fail(f"{TABLES[table]} {field.name}: documented default refused: {invalid}")


@pytest.mark.parametrize("table", TABLES)
def test_the_reference_gives_each_key_its_default(table: str) -> None:
    keys = key_checks(tables()[table].cls)
    for field in dataclasses.fields(tables()[table].cls):
        if field.name not in keys or (table, field.name) in DESCRIBED_DEFAULTS:
            continue
        documented = _documented_default(table, field)
        if documented is None:  # "none": nothing is set, or an empty collection
            assert field.default in (None, ()), f"{TABLES[table]} {field.name}"
        else:
            assert documented == field.default, f"{TABLES[table]} {field.name}"


def test_the_reference_documents_every_flag_and_the_settings_source() -> None:
    text = REFERENCE.read_text()
    flags = _reference_sections()["Flags and the file"]
    for field in dataclasses.fields(Overrides):
        assert f"`--{field.name.replace('_', '-')} " in flags, field.name
    headings = " ".join(_reference_sections())
    for field in dataclasses.fields(Settings):
        assert f"`{field.name}`" in text or field.name in headings, field.name


# Tables whose keys the example file sets to examples, not to their defaults.
EXAMPLE_VALUES = {"upstreams", "routes"}


@pytest.mark.parametrize("table", [name for name in TABLES if name not in EXAMPLE_VALUES])
def test_the_example_file_shows_the_defaults(table: str) -> None:
    """Its header says so; a key with no default (None, an empty array) shows an example."""
    section = _example_section(TABLES[table])
    uncommented = re.sub(r"^# (\w+ = )", r"\1", section, flags=re.MULTILINE)
    [shown] = tomllib.loads(uncommented).values()
    checks = key_checks(tables()[table].cls)
    for field in dataclasses.fields(tables()[table].cls):
        if field.name not in checks or (table, field.name) in DESCRIBED_DEFAULTS:
            continue
        if field.default not in (None, ()):
            read = checks[field.name].bind(ROOT)(shown[field.name])
            assert read == field.default, f"{TABLES[table]} {field.name}"
