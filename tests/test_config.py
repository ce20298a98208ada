"""Settings: what a file and flags produce, and what every kind of mistake is told.

The problem texts asserted here are the ones users read; change them deliberately.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tlsfiles import write_ca, write_pair
from tproxy.config import (
    AdminSettings,
    AuthSettings,
    CacheSettings,
    LogSettings,
    Overrides,
    PayloadLogSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    SharedStoreSettings,
    TelemetrySettings,
    UpstreamSettings,
    check_config,
    default_cache_dir,
    is_loopback,
    load_settings,
    parse_host_port,
)
from tproxy.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "tproxy.toml"

LOCAL = '[upstreams.local]\nurl = "http://127.0.0.1:8081"\n'
NO_FLAGS = Overrides()
NO_UPSTREAM = "no upstream configured: pass --upstream URL or add an [upstreams.NAME] table"


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so files are named ``x.toml`` in messages, as a user types."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(text: str, name: str = "x.toml") -> Path:
    path = Path(name)
    path.write_text(text)
    return path


def load(text: str, overrides: Overrides = NO_FLAGS) -> Settings:
    return load_settings(write(text), overrides)


def problems(text: str, overrides: Overrides = NO_FLAGS) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load(text, overrides)
    return list(raised.value.problems)


# --- defaults --------------------------------------------------------------------------------


def test_without_a_file_the_defaults_apply_and_the_source_says_so() -> None:
    loaded = load_settings(None, Overrides(upstream="http://127.0.0.1:8081"))
    assert loaded.server == ServerSettings()
    assert loaded.cache == CacheSettings()
    assert loaded.log == LogSettings()
    assert loaded.source == "<defaults>"


def test_the_defaults_are_the_documented_values() -> None:
    server, cache, log = ServerSettings(), CacheSettings(), LogSettings()
    assert (server.listen, server.admin_listen) == ("127.0.0.1:8080", "127.0.0.1:9090")
    assert (server.max_body_bytes, server.max_header_bytes) == (16 << 20, 65536)
    assert (server.graceful_timeout, server.keep_alive_timeout) == (10.0, 75.0)
    assert server.stream_buffer_chunks == 64
    assert cache.enabled
    assert not cache.shared
    assert (cache.default_ttl, cache.max_entry_bytes, cache.max_total_bytes) == (
        86400.0,
        8 << 20,
        1 << 30,
    )
    assert cache.paths == (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/completion",
        "/v1/rerank",
        "/rerank",
    )
    assert cache.ignore_fields == ("user",)
    assert cache.max_line_bytes == 1 << 20
    assert (log.level, log.format) == ("info", "auto")


def test_the_default_cache_dir_is_the_per_user_cache_directory() -> None:
    assert CacheSettings().dir == default_cache_dir()
    assert default_cache_dir().name == "store"
    assert "tproxy" in default_cache_dir().parts


def test_an_upstream_and_a_route_start_from_their_defaults() -> None:
    loaded = load(LOCAL)
    assert loaded.upstreams == (UpstreamSettings("local", "http://127.0.0.1:8081"),)
    upstream = loaded.upstream("local")
    assert (upstream.connect_timeout, upstream.first_byte_timeout) == (10.0, 300.0)
    assert (upstream.idle_timeout, upstream.total_timeout) == (120.0, 3600.0)
    assert (upstream.headers, upstream.api_key_env) == ((), None)
    assert (upstream.max_connections, upstream.http2) == (512, False)
    assert loaded.source == "x.toml"


def test_without_routes_one_catch_all_route_covers_every_upstream_in_file_order() -> None:
    loaded = load(LOCAL + '[upstreams.backup]\nurl = "http://10.0.0.2:8000"\n')
    assert loaded.routes == (RouteSettings(upstreams=("local", "backup"), name="default"),)
    assert load("routes = []\n" + LOCAL).routes == (
        RouteSettings(upstreams=("local",), name="default"),
    )


def test_a_route_without_a_name_is_named_after_its_index() -> None:
    text = LOCAL + '[[routes]]\nmodels = ["a*"]\nupstreams = ["local"]\n'
    text += '[[routes]]\nupstreams = ["local"]\n'
    assert [route.name for route in load(text).routes] == ["route0", "route1"]


def test_settings_are_frozen_and_an_unknown_upstream_is_a_key_error() -> None:
    loaded = load(LOCAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.server.listen = "0.0.0.0:80"  # type: ignore[misc]
    with pytest.raises(KeyError):
        loaded.upstream("nope")


# --- every key, read back ----------------------------------------------------------------------

EVERY_KEY = """
[server]
listen = "0.0.0.0:8000"
admin_listen = "[::1]:9000"
max_body_bytes = 1000
graceful_timeout = 3
stream_buffer_chunks = 8
keep_alive_timeout = 5.5
max_header_bytes = 4096
body_timeout = 5
client_stall_timeout = 7
reuse_port = true
workers = 3
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
tls_client_ca = "tls/ca.pem"

[cache]
enabled = false
dir = "store"
default_ttl = 60
max_entry_bytes = 100
max_total_bytes = 1000
paths = ["/v1/chat/completions"]
ignore_fields = ["user", "metadata"]
shared = true
max_line_bytes = 10
coalesce = false
on_disconnect = "finish"
finish_timeout = 30
max_background = 2

[log]
level = "debug"
format = "json"
libraries = "info"

[upstreams.main]
url = "HTTPS://Example.COM:8443/base/"
connect_timeout = 1
first_byte_timeout = 2
idle_timeout = 3
total_timeout = 4
api_key_env = "MAIN_KEY"
max_connections = 5
http2 = true
ca_file = "tls/ca.pem"
client_cert = "tls/client.pem"
client_key = "tls/client.key"
tls_server_name = "model.internal"
verify = false

[upstreams.main.headers]
X-Tenant = "blue"
User-Agent = "tproxy test"

[[routes]]
name = "chat"
path_prefix = "/v1/"
models = ["gpt-*"]
upstreams = ["main"]
retries = 0
cache = false
ttl = 30
ignore_upstream_no_store = true
"""


@pytest.fixture
def tls_files(in_tmp_path: Path) -> Path:
    """The certificates and keys EVERY_KEY names, under ``tls/``."""
    ca = trustme.CA()
    folder = in_tmp_path / "tls"
    write_pair(ca.issue_cert("localhost"), folder, "server")
    write_pair(ca.issue_cert("tproxy"), folder, "client")
    write_ca(ca, folder / "ca.pem")
    return folder


def test_every_key_of_the_file_is_read_into_the_settings(tls_files: Path) -> None:
    assert load(EVERY_KEY) == Settings(
        server=ServerSettings(
            listen="0.0.0.0:8000",
            admin_listen="[::1]:9000",
            max_body_bytes=1000,
            graceful_timeout=3.0,
            stream_buffer_chunks=8,
            keep_alive_timeout=5.5,
            max_header_bytes=4096,
            body_timeout=5.0,
            client_stall_timeout=7.0,
            reuse_port=True,
            workers=3,
            tls_cert=tls_files / "server.pem",
            tls_key=tls_files / "server.key",
            tls_client_ca=tls_files / "ca.pem",
        ),
        cache=CacheSettings(
            enabled=False,
            dir=tls_files.parent / "store",
            default_ttl=60.0,
            max_entry_bytes=100,
            max_total_bytes=1000,
            paths=("/v1/chat/completions",),
            ignore_fields=("user", "metadata"),
            shared=True,
            max_line_bytes=10,
            coalesce=False,
            on_disconnect="finish",
            finish_timeout=30.0,
            max_background=2,
        ),
        log=LogSettings(level="debug", format="json", libraries="info"),
        upstreams=(
            UpstreamSettings(
                name="main",
                url="https://example.com:8443/base",
                connect_timeout=1.0,
                first_byte_timeout=2.0,
                idle_timeout=3.0,
                total_timeout=4.0,
                headers=(("X-Tenant", "blue"), ("User-Agent", "tproxy test")),
                api_key_env="MAIN_KEY",
                max_connections=5,
                http2=True,
                ca_file=tls_files / "ca.pem",
                client_cert=tls_files / "client.pem",
                client_key=tls_files / "client.key",
                tls_server_name="model.internal",
                verify=False,
            ),
        ),
        routes=(
            RouteSettings(
                upstreams=("main",),
                path_prefix="/v1/",
                models=("gpt-*",),
                retries=0,
                cache=False,
                ttl=30.0,
                name="chat",
                ignore_upstream_no_store=True,
            ),
        ),
        source="x.toml",
        warnings=(
            "upstreams.main.verify = false: the upstream's certificate is not checked, so anyone"
            " on the network path can read and change its answers (and the answers tproxy"
            " caches)",
        ),
    )


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ("server", ServerSettings),
        ("cache", CacheSettings),
        ("log", LogSettings),
        ("upstreams", UpstreamSettings),
        ("routes", RouteSettings),
    ],
)
@pytest.mark.usefixtures("tls_files")
def test_the_every_key_file_sets_each_field_to_a_value_other_than_its_default(
    section: str, cls: type[object]
) -> None:
    """So the round-trip test above cannot pass for a key the loader ignores."""
    loaded = load(EVERY_KEY)
    value = getattr(loaded, section)
    instance = value[0] if isinstance(value, tuple) else value
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            continue  # required: name, url, upstreams
        default = (
            field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        assert getattr(instance, field.name) != default, f"{section}.{field.name}"


def test_integers_are_accepted_where_seconds_are_expected() -> None:
    assert load(LOCAL + "[server]\ngraceful_timeout = 3\n").server.graceful_timeout == 3.0


def test_a_relative_cache_dir_is_taken_from_the_config_files_directory(in_tmp_path: Path) -> None:
    (in_tmp_path / "conf").mkdir()
    path = write(LOCAL + '[cache]\ndir = "../var/store"\n', "conf/x.toml")
    assert load_settings(path).cache.dir == in_tmp_path / "var" / "store"


def test_a_tilde_in_cache_dir_is_the_home_directory(
    in_tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(in_tmp_path / "home"))
    assert load(LOCAL + '[cache]\ndir = "~/tp"\n').cache.dir == in_tmp_path / "home" / "tp"


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081"),
        ("HTTP://LocalHost/Base//", "http://localhost/Base"),
        ("https://[::1]:8443/api/", "https://[::1]:8443/api"),
        ("https://[::1]", "https://[::1]"),
        ("http://llm_server.internal", "http://llm_server.internal"),
    ],
)
def test_an_upstream_url_is_stored_in_lower_case_without_a_trailing_slash(
    written: str, stored: str
) -> None:
    assert load(f'[upstreams.u]\nurl = "{written}"\n').upstream("u").url == stored


@pytest.mark.parametrize(
    ("text", "flag", "workers"),
    [
        ("", None, None),
        ('[server]\nworkers = "auto"\n', None, None),
        ("", "3", 3),
        ("[server]\nworkers = 1\n", None, 1),
        ("[server]\nworkers = 4\n", "auto", None),
    ],
    ids=["default-auto", "auto", "flag", "one", "flag-auto-wins"],
)
def test_workers_is_a_count_or_auto_from_the_file_or_the_flag(
    text: str, flag: str | None, workers: int | None
) -> None:
    flags = Overrides(upstream="http://127.0.0.1:8081", workers=flag)
    assert load(text, flags).server.workers == workers


@pytest.mark.parametrize("value", ["0", "257", '"many"', "true", "1.5"])
def test_workers_out_of_range_is_refused(value: str) -> None:
    expected = 'x.toml: server.workers: expected "auto" or an integer from 1 to 256, got'
    assert problems(f"[server]\nworkers = {value}\n")[0].startswith(expected)


def test_the_workers_flag_is_refused_like_the_key() -> None:
    assert problems("", Overrides(upstream="http://127.0.0.1:8081", workers="0")) == [
        '--workers: expected "auto" or an integer from 1 to 256, got 0'
    ]


# --- problems: every kind, with the exact text users read --------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[server]\nlistne = "a"\n', 'x.toml: server.listne: unknown key (did you mean "listen"?)'),
        (
            "[server]\nzzz = 1\n",
            "x.toml: server.zzz: unknown key (known keys: listen, admin_listen, max_body_bytes,"
            " graceful_timeout, stream_buffer_chunks, keep_alive_timeout, max_header_bytes,"
            " body_timeout, client_stall_timeout, reuse_port, workers, tls_cert, tls_key,"
            " tls_client_ca)",
        ),
        ("[sever]\n", 'x.toml: sever: unknown key (did you mean "server"?)'),
        ("server = 1\n", "x.toml: server: expected a table, got 1"),
        (
            '[upstreams.local]\nurl = "http://h"\nconnect_timeout = "ten"\n',
            'x.toml: upstreams.local.connect_timeout: expected a positive number, got "ten"',
        ),
        (
            '[upstreams.local]\nurl = "http://h"\nidle_timeout = true\n',
            "x.toml: upstreams.local.idle_timeout: expected a positive number, got true",
        ),
        (
            '[upstreams.local]\nurl = "http://h"\ntotal_timeout = 0\n',
            "x.toml: upstreams.local.total_timeout: expected a positive number, got 0",
        ),
        (
            '[upstreams.local]\nurl = "http://h"\ntotal_timeout = inf\n',
            "x.toml: upstreams.local.total_timeout: expected a finite number, got inf",
        ),
        (
            '[upstreams.local]\nurl = "http://h"\nmax_connections = 1.5\n',
            "x.toml: upstreams.local.max_connections: expected an integer >= 1, got 1.5",
        ),
        (
            '[upstreams.local]\nurl = "http://h"\nhttp2 = "yes"\n',
            'x.toml: upstreams.local.http2: expected true or false, got "yes"',
        ),
        ("[upstreams.local]\n", "x.toml: upstreams.local.url: required key is missing"),
        (
            '[upstreams.local]\nurl = "ftp://h"\n',
            'x.toml: upstreams.local.url: expected an http:// or https:// URL, got "ftp://h"',
        ),
        (
            '[upstreams.local]\nurl = "localhost:8080"\n',
            "x.toml: upstreams.local.url: expected an http:// or https:// URL,"
            ' got "localhost:8080"',
        ),
        (
            '[upstreams.local]\nurl = "http://h/v1?x=1"\n',
            "x.toml: upstreams.local.url: a URL must not have a query (?) or fragment (#),"
            ' got "http://h/v1?x=1"',
        ),
        (
            '[upstreams.local]\nurl = "http://me:secret@h"\n',
            "x.toml: upstreams.local.url: a URL must not hold a user name or password;"
            " use api_key_env or headers",
        ),
        (
            '[upstreams.local]\nurl = "http://h:99999"\n',
            'x.toml: upstreams.local.url: invalid URL "http://h:99999"',
        ),
        (
            '[upstreams.local]\nurl = "http://h"\napi_key_env = "MY-KEY"\n',
            "x.toml: upstreams.local.api_key_env: expected an environment variable name"
            ' (letters, digits and _, not starting with a digit), got "MY-KEY"',
        ),
        (
            '[upstreams."my upstream"]\nurl = "http://h"\n',
            'x.toml: upstreams."my upstream": invalid upstream name: expected a name of 1 to 64'
            ' letters, digits, "_" or "-", got "my upstream"',
        ),
        (
            'upstreams.local = "http://h"\n',
            'x.toml: upstreams.local: expected a table, got "http://h"',
        ),
        (
            '[log]\nlevel = "INFO"\n',
            'x.toml: log.level: expected one of debug, info, warning, error, got "INFO"'
            ' (did you mean "info"?)',
        ),
        (
            '[log]\nformat = "text"\n',
            'x.toml: log.format: expected one of auto, json, console, got "text"',
        ),
        (
            '[server]\nlisten = "8080"\n',
            "x.toml: server.listen: expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080,"
            ' got "8080"',
        ),
        (
            "[cache]\nmax_entry_bytes = 0\n",
            "x.toml: cache.max_entry_bytes: expected an integer >= 1, got 0",
        ),
        (
            '[cache]\npaths = ["/v1/embeddings", "v1/completions"]\n',
            'x.toml: cache.paths[1]: expected a path starting with "/" (no spaces, "?" or "#"),'
            ' got "v1/completions"',
        ),
        ('[cache]\npaths = "/v1"\n', 'x.toml: cache.paths: expected an array, got "/v1"'),
        ('[cache]\ndir = ""\n', 'x.toml: cache.dir: expected a directory path, got ""'),
        (
            "[cache]\nmax_entry_bytes = 2048\nmax_total_bytes = 1024\n",
            "x.toml: cache.max_entry_bytes: larger than cache.max_total_bytes (2048 > 1024)",
        ),
        (
            '[server]\nadmin_listen = "127.0.0.1:8080"\n',
            "x.toml: server.admin_listen: the same address as server.listen (127.0.0.1:8080)",
        ),
        (
            '[upstreams.local]\nurl = "http://h/a b"\n',
            "x.toml: upstreams.local.url: a URL must not contain spaces or control characters,"
            ' got "http://h/a b"',
        ),
        (
            '[upstreams.local]\nurl = "http://-h-/"\n',
            'x.toml: upstreams.local.url: invalid host "-h-" in URL "http://-h-/"',
        ),
        (
            '[upstreams.local]\nurl = "http://h"\nheaders = "X-A: 1"\n',
            "x.toml: upstreams.local.headers: expected a table of header names and values,"
            ' got "X-A: 1"',
        ),
        (
            '[[routes]]\nupstreams = ["base"]\nretries = -1\n',
            "x.toml: routes[0].retries: expected an integer >= 0, got -1",
        ),
        (
            '[[routes]]\nupstreams = ["base"]\nmodels = ["", 7, ["gpt"]]\n',
            'x.toml: routes[0].models[0]: expected a non-empty printable string, got ""',
        ),
        (
            '[[routes]]\nupstreams = ["base"]\nmodels = ["", 7, ["gpt"]]\n',
            "x.toml: routes[0].models[1]: expected a string, got 7",
        ),
        (
            '[[routes]]\nupstreams = ["base"]\nmodels = ["", 7, ["gpt"]]\n',
            "x.toml: routes[0].models[2]: expected a string, got an array",
        ),
        ("routes = [1]\n", "x.toml: routes[0]: expected a table, got 1"),
        (
            "[cache]\ndefault_ttl = 1979-05-27\n",
            "x.toml: cache.default_ttl: expected a positive number, got a date/time (1979-05-27)",
        ),
    ],
)
def test_each_kind_of_mistake_is_named_with_file_key_and_reason(text: str, problem: str) -> None:
    assert problem in problems(text + '[upstreams.base]\nurl = "http://127.0.0.1:8081"\n')


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        (
            '"X Bad" = "1"',
            'upstreams.u.headers."X Bad": not a valid header name (letters,'
            " digits and !#$%&'*+-.^_`|~)",
        ),
        (
            'X-Injected = "a\\r\\nHost: evil"',
            "upstreams.u.headers.X-Injected: a header value must"
            " be printable ASCII (no CR, LF or NUL)",
        ),
        (
            'X-Accent = "café"',
            "upstreams.u.headers.X-Accent: a header value must be printable"
            " ASCII (no CR, LF or NUL)",
        ),
        ("X-Number = 5", "upstreams.u.headers.X-Number: expected a string, got 5"),
        (
            'Content-Length = "5"',
            "upstreams.u.headers.Content-Length: the proxy sets this header"
            " itself; it cannot be configured",
        ),
        (
            'X-A = "1"\nx-a = "2"',
            "upstreams.u.headers.x-a: given twice (header names are case-insensitive)",
        ),
    ],
)
def test_a_header_with_a_bad_name_or_value_is_refused_without_echoing_the_value(
    headers: str, problem: str
) -> None:
    text = f'[upstreams.u]\nurl = "http://h"\n[upstreams.u.headers]\n{headers}\n'
    assert problems(text) == [f"x.toml: {problem}"]


def test_authorization_comes_from_headers_or_api_key_env_not_both() -> None:
    text = '[upstreams.u]\nurl = "http://h"\napi_key_env = "KEY"\n'
    text += '[upstreams.u.headers]\nAuthorization = "Bearer x"\n'
    assert problems(text) == [
        "x.toml: upstreams.u.headers: sets Authorization, which api_key_env also sets:"
        " keep one of the two"
    ]


def test_the_api_key_variable_is_not_read_when_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SURELY_UNSET_KEY", raising=False)
    text = '[upstreams.u]\nurl = "http://h"\napi_key_env = "SURELY_UNSET_KEY"\n'
    assert load(text).upstream("u").api_key_env == "SURELY_UNSET_KEY"


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    text = """
[server]
listen = ":8080"
max_body_bytes = -1
[log]
level = "loud"
[upstreams.local]
url = "http://h"
connect_timeout = "ten"
[[routes]]
upstreams = ["lcoal"]
path_prefix = "v1"
"""
    assert problems(text) == [
        "x.toml: server.listen: a host is required: 127.0.0.1:8080 for this machine only,"
        " 0.0.0.0:8080 for every IPv4 interface",
        "x.toml: server.max_body_bytes: expected an integer >= 1, got -1",
        'x.toml: log.level: expected one of debug, info, warning, error, got "loud"',
        'x.toml: upstreams.local.connect_timeout: expected a positive number, got "ten"',
        'x.toml: routes[0].path_prefix: expected a path starting with "/" (no spaces, "?" or'
        ' "#"), got "v1"',
        'x.toml: routes[0].upstreams[0]: unknown upstream "lcoal" (did you mean "local"?)',
    ]


# --- routes, related to each other and to the upstreams -----------------------------------------


def test_a_route_naming_an_unknown_upstream_lists_them_when_none_is_close() -> None:
    text = LOCAL + '[[routes]]\nupstreams = ["elsewhere"]\n'
    assert problems(text) == [
        'x.toml: routes[0].upstreams[0]: unknown upstream "elsewhere" (the upstreams are: local)'
    ]


def test_a_route_needs_at_least_one_upstream_each_named_once() -> None:
    text = LOCAL + "[[routes]]\nname = 'a'\n[[routes]]\nupstreams = []\n"
    text += '[[routes]]\nmodels = ["m"]\nupstreams = ["local", "local"]\n'
    assert problems(text) == [
        "x.toml: routes[0].upstreams: required key is missing",
        "x.toml: routes[1].upstreams: expected at least one item, got an empty array",
        "x.toml: routes[2].upstreams: names one upstream more than once",
    ]


def test_two_routes_may_not_share_a_name() -> None:
    route = '[[routes]]\nname = "chat"\nmodels = ["{}"]\nupstreams = ["local"]\n'
    text = LOCAL + route.format("a*") + route.format("b*")
    assert problems(text) == ['x.toml: routes[1].name: "chat" is already the name of routes[0]']


def test_a_route_behind_a_catch_all_route_can_never_be_chosen() -> None:
    text = LOCAL + '[[routes]]\npath_prefix = "/v1/"\nupstreams = ["local"]\n'
    text += '[[routes]]\npath_prefix = "/v1/chat/"\nmodels = ["gpt-*"]\nupstreams = ["local"]\n'
    assert problems(text) == [
        "x.toml: routes[1]: never chosen: routes[0] comes first, accepts any model and its"
        ' path_prefix "/v1/" covers this route\'s'
    ]


def test_model_routes_before_a_catch_all_route_are_fine() -> None:
    text = LOCAL + '[[routes]]\nmodels = ["gpt-*"]\nupstreams = ["local"]\n'
    text += '[[routes]]\nupstreams = ["local"]\n'
    assert len(load(text).routes) == 2


def test_routes_as_a_single_table_is_refused() -> None:
    assert problems(LOCAL + '[routes]\nupstreams = ["local"]\n') == [
        "x.toml: routes: expected an array of tables ([[routes]]), got a table"
    ]


# --- the file itself --------------------------------------------------------------------------


def test_a_file_with_no_upstream_is_a_problem() -> None:
    assert problems("[log]\nlevel = 'debug'\n") == [f"x.toml: {NO_UPSTREAM}"]


def test_no_file_and_no_upstream_flag_is_a_problem() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None)
    assert raised.value.problems == (NO_UPSTREAM,)


def test_invalid_toml_is_one_problem_with_the_line_and_column() -> None:
    assert problems('[server]\nlisten = "a"\nlisten = "b"\n') == [
        "x.toml: invalid TOML: Cannot overwrite a value (at line 3, column 13)"
    ]


def test_a_missing_file_is_one_clear_problem() -> None:
    assert check_config(Path("absent.toml")).problems == [
        "absent.toml: cannot read the file: No such file or directory"
    ]


def test_a_file_that_is_not_utf8_is_one_clear_problem() -> None:
    Path("x.toml").write_bytes(b'[log]\nlevel = "\xff"\n')
    assert check_config(Path("x.toml")).problems == [
        "x.toml: cannot read the file: not UTF-8 text (invalid byte at offset 15)"
    ]


def test_check_config_returns_nothing_for_a_valid_file() -> None:
    assert check_config(write(LOCAL)).problems == []


# --- flags ------------------------------------------------------------------------------------


def test_flags_replace_their_one_setting(in_tmp_path: Path) -> None:
    text = LOCAL + '[server]\nlisten = "127.0.0.1:1"\nadmin_listen = "127.0.0.1:2"\n'
    text += '[cache]\ndir = "from-file"\n'
    loaded = load(
        text,
        Overrides(listen="0.0.0.0:80", admin_listen="[::1]:81", cache_dir=Path("from-flag")),
    )
    assert (loaded.server.listen, loaded.server.admin_listen) == ("0.0.0.0:80", "[::1]:81")
    assert loaded.cache.dir == in_tmp_path / "from-flag"
    assert loaded.upstreams == load(text).upstreams


def test_a_relative_cache_dir_flag_is_taken_from_the_current_directory(in_tmp_path: Path) -> None:
    (in_tmp_path / "conf").mkdir()
    path = write(LOCAL, "conf/x.toml")
    loaded = load_settings(path, Overrides(cache_dir=Path("cache")))
    assert loaded.cache.dir == in_tmp_path / "cache"


def test_flags_are_checked_like_file_values_and_named_after_the_flag() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(
            None,
            Overrides(listen="localhost", upstream="example.com", admin_listen="[::1]:99999"),
        )
    assert raised.value.problems == (
        '--upstream: expected an http:// or https:// URL, got "example.com"',
        '--listen: expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got "localhost"',
        '--admin-listen: invalid port "99999" in "[::1]:99999": expected 0 to 65535',
    )


def test_a_flag_clashing_with_the_file_is_named_after_the_flag() -> None:
    text = LOCAL + '[server]\nlisten = "127.0.0.1:7000"\n'
    assert problems(text, Overrides(admin_listen="127.0.0.1:7000")) == [
        "--admin-listen: the same address as server.listen (127.0.0.1:7000)"
    ]


def test_port_zero_may_be_used_for_both_addresses() -> None:
    loaded = load(LOCAL, Overrides(listen="127.0.0.1:0", admin_listen="127.0.0.1:0"))
    assert loaded.server.listen == loaded.server.admin_listen == "127.0.0.1:0"


def test_the_upstream_flag_replaces_every_upstream_and_route() -> None:
    text = LOCAL + '[[routes]]\nmodels = ["x*"]\nupstreams = ["local"]\n'
    loaded = load(text, Overrides(upstream="http://10.0.0.9:8000/"))
    assert loaded.upstreams == (UpstreamSettings("default", "http://10.0.0.9:8000"),)
    assert loaded.routes == (RouteSettings(upstreams=("default",), name="default"),)


def test_the_upstream_flag_keeps_the_settings_of_an_upstreams_default_table() -> None:
    text = '[upstreams.default]\nfirst_byte_timeout = 0.5\n[upstreams.default.headers]\nX-A = "1"\n'
    upstream = load(text, Overrides(upstream="http://h:1")).upstream("default")
    assert (upstream.url, upstream.first_byte_timeout) == ("http://h:1", 0.5)
    assert upstream.headers == (("X-A", "1"),)


def test_with_the_upstream_flag_the_file_is_still_checked_but_not_its_route_references() -> None:
    text = '[upstreams.other]\nurl = "http://h"\nidle_timeout = -1\n'
    text += '[[routes]]\nupstreams = ["gone"]\n'
    assert problems(text, Overrides(upstream="http://h:1")) == [
        "x.toml: upstreams.other.idle_timeout: expected a positive number, got -1"
    ]


def test_an_upstreams_default_table_without_url_needs_the_upstream_flag() -> None:
    assert problems("[upstreams.default]\nidle_timeout = 1\n") == [
        "x.toml: upstreams.default.url: required key is missing"
    ]


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:80", ("::", 80)),
        ("proxy-1.internal:443", ("proxy-1.internal", 443)),
    ],
)
def test_host_port_pairs_are_parsed(text: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8080", 'expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got "8080"'),
        (
            ":8080",
            "a host is required: 127.0.0.1:8080 for this machine only,"
            " 0.0.0.0:8080 for every IPv4 interface",
        ),
        ("::1:8080", 'put an IPv6 address in brackets, as in [::1]:8080, got "::1:8080"'),
        ("[127.0.0.1]:80", 'expected an IPv6 address inside the brackets, got "[127.0.0.1]:80"'),
        ("[::1]", 'expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got "[::1]"'),
        ("host:http", 'invalid port "http" in "host:http": expected 0 to 65535'),
        ("host:65536", 'invalid port "65536" in "host:65536": expected 0 to 65535'),
        ("host:", 'invalid port "" in "host:": expected 0 to 65535'),
        ("999.1.1.1:80", 'invalid host "999.1.1.1" in "999.1.1.1:80"'),
        ("my host:80", 'invalid host "my host" in "my host:80"'),
        ("-bad:80", 'invalid host "-bad" in "-bad:80"'),
    ],
)
def test_a_bad_host_port_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_host_port(text)


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    # Host names; all-digit ones are refused on purpose (they read as odd IPv4 forms).
    st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
    ).filter(lambda host: not re.fullmatch(r"[0-9.]+", host)),
)


@settings(max_examples=300)
@given(host=hosts, port=st.integers(0, 65535))
def test_a_formatted_host_and_port_parse_back(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert parse_host_port(text) == (host, port)


@settings(max_examples=300)
@given(text=st.text(max_size=40))
def test_parse_host_port_refuses_with_value_error_only(text: str) -> None:
    try:
        host, port = parse_host_port(text)
    except ValueError:
        return
    assert 0 <= port <= 65535
    assert host
    assert not any(c.isspace() for c in host)


# --- the admin listener's token, telemetry and the payload log ---------------------------------

TELEMETRY_KEYS = """
[admin]
token_env = "ADMIN_TOKEN"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
tls_client_ca = "tls/ca.pem"

[telemetry]
access_log = false
queue_size = 10
flush_timeout = 1

[payload_log]
enabled = true
file = "logs/payload.jsonl"
max_bytes = 1000
keep = 0
http_url = "https://collector.example.com/ingest/"
http_token_env = "SINK_TOKEN"
http_timeout = 2
http_retries = 0
http_backoff = 0.5
batch_size = 8
queue_size = 16
max_record_bytes = 500
raw_events = true
"""


def test_the_new_sections_default_to_no_token_an_access_log_and_no_payload_log() -> None:
    loaded = load(LOCAL)
    assert loaded.admin == AdminSettings(token_env=None)
    assert loaded.telemetry == TelemetrySettings(access_log=True, queue_size=4096)
    assert loaded.telemetry.flush_timeout == 5.0
    payload = loaded.payload_log
    assert not payload.enabled
    assert (payload.file, payload.http_url, payload.raw_events) == (None, None, False)
    assert (payload.max_bytes, payload.keep, payload.max_record_bytes) == (100 << 20, 5, 1 << 20)
    assert (payload.queue_size, payload.batch_size) == (256, 64)
    assert (payload.http_timeout, payload.http_retries, payload.http_backoff) == (10.0, 3, 1.0)


def test_every_key_of_the_new_sections_is_read(in_tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = in_tmp_path / "conf" / "tls"
    write_pair(ca.issue_cert("localhost"), tls, "server")
    write_ca(ca, tls / "ca.pem")
    loaded = load_settings(write(LOCAL + TELEMETRY_KEYS, "conf/x.toml"))
    assert loaded.admin == AdminSettings(
        token_env="ADMIN_TOKEN",
        tls_cert=tls / "server.pem",
        tls_key=tls / "server.key",
        tls_client_ca=tls / "ca.pem",
    )
    assert loaded.telemetry == TelemetrySettings(access_log=False, queue_size=10, flush_timeout=1.0)
    assert loaded.payload_log == PayloadLogSettings(
        enabled=True,
        file=in_tmp_path / "conf" / "logs" / "payload.jsonl",
        max_bytes=1000,
        keep=0,
        http_url="https://collector.example.com/ingest",
        http_token_env="SINK_TOKEN",
        http_timeout=2.0,
        http_retries=0,
        http_backoff=0.5,
        batch_size=8,
        queue_size=16,
        max_record_bytes=500,
        raw_events=True,
    )
    for cls, value in (
        (AdminSettings, loaded.admin),
        (TelemetrySettings, loaded.telemetry),
        (PayloadLogSettings, loaded.payload_log),
    ):
        for field in dataclasses.fields(cls):
            assert getattr(value, field.name) != field.default, field.name


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[admin]\ntoken_env = "1X"\n', "x.toml: admin.token_env: expected an environment"),
        ("[telemetry]\nqueue_size = 0\n", "x.toml: telemetry.queue_size: expected an integer >= 1"),
        ("[telemetry]\naccess = true\n", 'x.toml: telemetry.access: unknown key (did you mean "a'),
        ("[payload_log]\nkeep = -1\n", "x.toml: payload_log.keep: expected an integer >= 0"),
        ('[payload_log]\nfile = "logs/"\n', "x.toml: payload_log.file: expected a file path"),
        (
            '[payload_log]\nhttp_url = "ftp://x"\n',
            'x.toml: payload_log.http_url: expected an http:// or https:// URL, got "ftp://x"',
        ),
        (
            "[payload_log]\nenabled = true\n",
            "x.toml: payload_log.enabled: the payload log needs a sink: set file or http_url",
        ),
        ("[payload_logs]\n", 'x.toml: payload_logs: unknown key (did you mean "payload_log"?)'),
    ],
)
def test_mistakes_in_the_new_sections_are_named(text: str, problem: str) -> None:
    [found] = problems(LOCAL + text)
    assert found.startswith(problem)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9090", "127.0.0.2:9090", "localhost:9090", "[::1]:9090"]
)
def test_a_loopback_admin_listener_needs_no_token(address: str) -> None:
    assert is_loopback(address)
    assert load(LOCAL + f'[server]\nadmin_listen = "{address}"\n').admin.token_env is None


@pytest.mark.parametrize("address", ["0.0.0.0:9090", "[::]:9090", "10.1.2.3:9090", "admin:9090"])
def test_an_admin_listener_beyond_loopback_requires_a_token(address: str) -> None:
    assert not is_loopback(address)
    assert problems(LOCAL + f'[server]\nadmin_listen = "{address}"\n') == [
        f"x.toml: admin.token_env: required: the admin listener {address} is not a loopback"
        " address, so it needs a bearer token: set admin.token_env"
    ]
    with_token = f'[server]\nadmin_listen = "{address}"\n[admin]\ntoken_env = "T"\n'
    assert load(LOCAL + with_token).admin.token_env == "T"


def test_an_admin_listen_flag_beyond_loopback_is_named_after_the_flag() -> None:
    assert problems(LOCAL, Overrides(admin_listen="0.0.0.0:9090")) == [
        "--admin-listen: the admin listener 0.0.0.0:9090 is not a loopback address, so it needs"
        " a bearer token: set admin.token_env"
    ]


def test_the_example_file_enables_no_payload_log_and_needs_no_token() -> None:
    loaded = load_settings(EXAMPLE)
    assert not loaded.payload_log.enabled
    assert loaded.admin.token_env is None


# --- client authentication ---------------------------------------------------------------------

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64
HASH_C = "sha256:" + "c" * 64


def test_client_authentication_is_off_by_default() -> None:
    loaded = load(LOCAL)
    assert loaded.auth == AuthSettings(client_keys=(), client_keys_file=None)
    assert not loaded.auth.enabled
    assert not load(LOCAL + "[auth]\n").auth.enabled


def test_key_hashes_from_the_file_and_its_keys_file_are_united(in_tmp_path: Path) -> None:
    (in_tmp_path / "conf").mkdir()
    (in_tmp_path / "conf" / "keys.txt").write_text(
        f"# team keys\n\n{HASH_B}   # alice\n  {HASH_C.upper().replace('SHA256', 'sha256')}\n"
        f"{HASH_A}\n"
    )
    config = LOCAL + f'[auth]\nclient_keys = ["{HASH_A.upper().replace("SHA256", "sha256")}"]\n'
    loaded = load_settings(write(config + 'client_keys_file = "keys.txt"\n', "conf/x.toml"))
    assert loaded.auth == AuthSettings(
        client_keys=(HASH_A, HASH_B, HASH_C), client_keys_file=in_tmp_path / "conf" / "keys.txt"
    )
    assert loaded.auth.enabled


def test_either_key_alone_turns_authentication_on(in_tmp_path: Path) -> None:
    assert load(LOCAL + f'[auth]\nclient_keys = ["{HASH_A}"]\n').auth.enabled
    (in_tmp_path / "keys").write_text(HASH_B + "\n")
    only_file = load(LOCAL + '[auth]\nclient_keys_file = "keys"\n').auth
    assert only_file.enabled
    assert only_file.client_keys == (HASH_B,)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[auth]\nclient_keys = ["sk-live-SECRET"]\n',
            'x.toml: auth.client_keys[0]: expected "sha256:" followed by 64 hex digits (the hash'
            " of a key, not the key itself)",
        ),
        (
            f'[auth]\nclient_keys = ["{HASH_A}", "sha256:abc"]\n',
            'x.toml: auth.client_keys[1]: expected "sha256:" followed by 64 hex digits',
        ),
        (
            '[auth]\nclient_keys = "sha256:abc"\n',
            'x.toml: auth.client_keys: expected an array, got "sha256:abc"',
        ),
        ("[auth]\nclient_keys = [1]\n", "x.toml: auth.client_keys[0]: expected a string, got 1"),
        (
            "[auth]\nclient_keys = []\n",
            "x.toml: auth.client_keys: expected at least one key hash, got an empty array (leave"
            " [auth] out to turn client authentication off)",
        ),
        ("[auth]\nclient_key = []\n", 'x.toml: auth.client_key: unknown key (did you mean "cli'),
        (
            '[auth]\nclient_keys_file = "dir/"\n',
            'x.toml: auth.client_keys_file: expected a file path, got "dir/"',
        ),
    ],
)
def test_mistakes_in_auth_are_named_and_never_echo_a_key(text: str, problem: str) -> None:
    [found] = problems(LOCAL + text)
    assert found.startswith(problem)
    assert "SECRET" not in found


def test_a_bad_line_of_the_keys_file_is_named_by_number_and_not_shown(in_tmp_path: Path) -> None:
    (in_tmp_path / "keys").write_text(f"# keys\n{HASH_A}\nsk-live-SECRET\n{HASH_B}\nsha256:00\n")
    found = problems(LOCAL + '[auth]\nclient_keys_file = "keys"\n')
    keys = in_tmp_path / "keys"
    assert found == [
        f'x.toml: auth.client_keys_file: {keys} line 3: expected "sha256:" followed by 64 hex'
        " digits (the hash of a key, not the key itself)",
        f'x.toml: auth.client_keys_file: {keys} line 5: expected "sha256:" followed by 64 hex'
        " digits",
    ]
    assert not any("SECRET" in problem for problem in found)


def test_a_keys_file_that_cannot_be_read_or_holds_no_hash_is_a_problem(in_tmp_path: Path) -> None:
    missing = in_tmp_path / "absent"
    assert problems(LOCAL + '[auth]\nclient_keys_file = "absent"\n') == [
        f"x.toml: auth.client_keys_file: cannot read {missing}: No such file or directory"
    ]
    (in_tmp_path / "empty").write_text("# nobody yet\n\n")
    assert problems(LOCAL + '[auth]\nclient_keys_file = "empty"\n') == [
        f"x.toml: auth.client_keys_file: {in_tmp_path / 'empty'} holds no key hash, so every"
        " request would be refused"
    ]
    (in_tmp_path / "latin1").write_bytes(b"\xff\n")
    assert problems(LOCAL + '[auth]\nclient_keys_file = "latin1"\n') == [
        f"x.toml: auth.client_keys_file: {in_tmp_path / 'latin1'}: not UTF-8 text (invalid byte"
        " at offset 0)"
    ]


def test_an_empty_key_array_is_fine_when_the_keys_file_has_hashes(in_tmp_path: Path) -> None:
    (in_tmp_path / "keys").write_text(HASH_A + "\n")
    config = LOCAL + '[auth]\nclient_keys = []\nclient_keys_file = "keys"\n'
    assert load(config).auth.client_keys == (HASH_A,)


def test_the_example_file_leaves_client_authentication_off() -> None:
    assert not load_settings(EXAMPLE).auth.enabled


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434"),
        ("https://api.example.com/openai/V1", "https://api.example.com/openai"),
    ],
)
def test_an_upstream_url_ending_in_v1_is_refused_with_the_url_to_write(url: str, root: str) -> None:
    """The way SDKs write base_url; tproxy appends the client's /v1/... and each request 404s."""
    [problem] = problems(f'[upstreams.local]\nurl = "{url}"\n')
    assert problem.startswith("x.toml: upstreams.local.url: ends in /v1, so ")
    assert problem.endswith(f'write "{root}"')
    with pytest.raises(ConfigError) as raised:
        load_settings(None, Overrides(upstream=url))
    assert raised.value.problems == (problem.replace("x.toml: upstreams.local.url", "--upstream"),)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://h:1/v12", "http://h:1/v1/x"])
def test_other_upstream_paths_are_accepted(url: str) -> None:
    assert load(f'[upstreams.local]\nurl = "{url}"\n').upstreams[0].url == url


def test_no_shared_store_table_means_no_shared_tier() -> None:
    assert load(LOCAL).shared_store is None


def test_the_shared_store_table_takes_a_url_cluster_nodes_or_sentinels() -> None:
    loaded = load(LOCAL + '[shared_store]\nurl = "redis://10.0.0.5:6379/0"\n').shared_store
    assert loaded == SharedStoreSettings(url="redis://10.0.0.5:6379/0")
    nodes = load(LOCAL + '[shared_store]\ncluster_nodes = ["10.0.0.5:7000"]\n').shared_store
    assert nodes is not None
    assert nodes.cluster_nodes == ("10.0.0.5:7000",)
    assert not nodes.tls
    table = '[shared_store]\nsentinels = ["10.0.0.5:26379", "10.0.0.6:26379"]\n'
    watched = load(LOCAL + table + 'sentinel_primary = "tproxy"\n').shared_store
    assert watched is not None
    assert (watched.sentinels, watched.sentinel_primary) == (
        ("10.0.0.5:26379", "10.0.0.6:26379"),
        "tproxy",
    )


def test_a_cluster_over_tls_takes_the_cas_to_check_its_nodes_against(in_tmp_path: Path) -> None:
    authority = trustme.CA()
    write_ca(authority, in_tmp_path / "ca.pem")
    table = '[shared_store]\ncluster_nodes = ["h:2"]\ntls = true\nca_file = "ca.pem"\n'
    loaded = load(LOCAL + table).shared_store
    assert loaded is not None
    assert loaded.tls
    assert loaded.ca_file is not None
    assert loaded.ca_file.resolve() == (in_tmp_path / "ca.pem").resolve()


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("", "shared_store: set exactly one of url, cluster_nodes and sentinels"),
        (
            'url = "redis://h:1"\ncluster_nodes = ["h:2"]\n',
            "shared_store: set exactly one of url, cluster_nodes and sentinels",
        ),
        ('url = "http://h:1"\n', "shared_store.url: expected a redis://, rediss:// or unix://"),
        ('url = "redis://:hunter2@h:1"\n', "shared_store.url: a URL must not hold a password"),
        ('url = "redis://h:1"\nkey_prefix = "{a}"\n', "shared_store.key_prefix: expected"),
        ('url = "redis://h:1"\nlookup_timeout = 0\n', "shared_store.lookup_timeout: expected"),
        ('url = "redis://h:1?ssl_cert_reqs=none"\n', "shared_store.url: expected no query"),
        ('url = "redis://h:1"\nca_file = "ca.pem"\n', "shared_store.ca_file: "),
        ('cluster_nodes = ["h:2"]\nca_file = "ca.pem"\n', "shared_store.ca_file: only used"),
        ('url = "rediss://h:1"\ntls = true\n', "shared_store.tls: not with a url"),
        ('sentinels = ["h:2"]\n', "shared_store: sentinels and sentinel_primary go together"),
        ('url = "redis://h:1"\nsentinel_primary = "m"\n', "sentinels and sentinel_primary go"),
        (
            'url = "redis://h:1"\nsentinel_password_env = "X"\n',
            "shared_store.sentinel_password_env: only used with sentinels",
        ),
        (
            'url = "redis://h:1"\nsentinels = ["h:2"]\nsentinel_primary = "m"\n',
            "shared_store: set exactly one of url, cluster_nodes and sentinels",
        ),
        ('cluster_nodes = ["h:2"]\ntls = "yes"\n', "shared_store.tls: expected"),
    ],
)
def test_a_bad_shared_store_table_is_refused(table: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(LOCAL + "[shared_store]\n" + table)
    assert any(problem in line for line in raised.value.problems), raised.value.problems
    assert "hunter2" not in str(raised.value)
