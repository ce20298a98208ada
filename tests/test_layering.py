"""The import rules of docs/architecture.md, enforced.

- ``tproxy.core`` is sans-IO: it imports no Trio, httpx2, LMDB or Hypercorn, and nothing of
  tproxy outside ``tproxy.core``.
- Each third-party I/O library has one home: httpx2 and httpcore2 only in ``upstream.py``, lmdb
  only in ``store/lmdb.py``, coredis only in ``store/redis.py``, hypercorn only in ``server.py``
  and ``serving/``, cryptography only in ``tls.py``.
- Data flows one way: a module imports only modules below it in ``LAYERS``. A package is one
  layer: its modules may import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tproxy"
IO_LIBRARIES = {
    "trio",
    "httpx2",
    "httpcore2",
    "httpx",
    "lmdb",
    "hypercorn",
    "trio_util",
    "coredis",
}
LIBRARY_HOME = {
    "httpx2": {"upstream"},
    "httpcore2": {"upstream", "workers_admin"},
    "lmdb": {"store.lmdb"},
    "hypercorn": {
        "server",
        "serving.connection",
        "serving.listener",
        "serving.protocols",
        "serving.requests",
    },
    "cryptography": {"tls"},
    "coredis": {"store.redis"},
}

# Lower layers first. A module may import from its own layer's peers only where listed lower.
LAYERS = [
    {"core"},
    {"tls"},
    {"asgi", "config", "notify", "batchqueue", "h11upstream"},
    {"store", "upstream", "routing", "inflight"},
    {"storewriter", "cache_commands", "telemetry"},  # telemetry reads the writer by a protocol
    {"pipeline"},
    {"app"},
    {"admin", "serving"},
    {"server", "workers_admin"},
    {"workers", "demo"},
    {"cli"},
    {"__main__"},
]


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"tproxy.{name} is in no layer: add it to LAYERS in this test")


def in_same_package(name: str, target: str) -> bool:
    """A package is one layer: its modules may import each other."""
    return "." in name and target.split(".")[0] == name.split(".")[0]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_module_respects_the_layers(path: Path) -> None:
    name = module_name(path)
    if name == "__init__":
        return
    own_layer = layer_of(name)
    for imported in imports_of(path):
        root = imported.split(".")[0]
        if root in IO_LIBRARIES and name.startswith("core"):
            pytest.fail(f"tproxy.{name} is sans-IO but imports {imported}")
        homes = LIBRARY_HOME.get(root)
        if homes is not None and name not in homes:
            pytest.fail(f"tproxy.{name} imports {imported}; only {sorted(homes)} may")
        if root == "tproxy" and imported != "tproxy":
            target = imported.removeprefix("tproxy.")
            if name.startswith("core"):
                assert target.startswith("core"), f"tproxy.{name} imports {imported}"
            elif target.split(".")[0] == name.split(".")[0]:
                continue  # within one package
            else:
                assert (
                    layer_of(target) < own_layer
                    or target.startswith("core")
                    or in_same_package(name, target)
                ), (
                    f"tproxy.{name} (layer {own_layer}) imports {imported} "
                    f"(layer {layer_of(target)}): data flows one way"
                )


def test_every_module_is_checked() -> None:
    assert len(SOURCES) >= 10
