"""Settings: one TOML file and a few command-line flags, read once into a frozen object.

Theory of operation: :func:`load_settings` parses the file, then walks it table by table. Every
key goes through the checker its dataclass field declares (:mod:`tproxy.config.schema`, the one
statement of each key: its type, checker and default); the checker either returns the typed
value or refuses it with a reason. A refusal is written down with the file and the key path
(``upstreams.local.url``) and the walk goes on, so one run shows every mistake. Unknown keys are
refused with a did-you-mean hint. Checks that relate keys to each other (a route naming an
upstream, two routes with one name, a route that can never be chosen, TLS files) run on what was
accepted. The flags are checked the same way and then replace what they name. Only when nothing
was refused is a :class:`Settings` built; otherwise one :class:`~tproxy.core.errors.ConfigError`
carries every problem.

Nothing here reads the environment variables an upstream names: those are read when the upstream
clients are built, so ``check-config`` never needs secrets.

The modules, lowest first: ``messages`` (how a problem is written), ``addresses`` (``HOST:PORT``
and URLs), ``checkers`` (one per kind of value), ``schema`` (the dataclasses), ``tables``
(reading one table), ``load`` (the file, the flags, the checks between tables).
"""

from tproxy.config.addresses import is_loopback, parse_host_port
from tproxy.config.load import ConfigCheck, check_config, json_only_paths, load_settings
from tproxy.config.schema import (
    AdminSettings,
    AuthSettings,
    CacheSettings,
    ListenerTLS,
    LogSettings,
    Overrides,
    PayloadLogSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    SharedStoreSettings,
    TelemetrySettings,
    UpstreamSettings,
    default_cache_dir,
)

__all__ = [
    "AdminSettings",
    "AuthSettings",
    "CacheSettings",
    "ConfigCheck",
    "ListenerTLS",
    "LogSettings",
    "Overrides",
    "PayloadLogSettings",
    "RouteSettings",
    "ServerSettings",
    "Settings",
    "SharedStoreSettings",
    "TelemetrySettings",
    "UpstreamSettings",
    "check_config",
    "default_cache_dir",
    "is_loopback",
    "json_only_paths",
    "load_settings",
    "parse_host_port",
]
