"""nginx for the benchmarks: found or installed, and configured as a proxy or a static server.

nginx is the reference of issue 8: what a mature C proxy adds in front of the same upstream,
and, serving the same answers from files, what the load generator can reach at all. It runs as
ONE process (``master_process off``: the event loop that serves requests is a worker's, without
the master that forks it), in the foreground, with its pid file, temporary directories and
error log under the run's working directory and no access log, so it is comparable with the
one-process Python servers and leaves nothing behind.

When ``nginx`` is not on PATH and this runs as root with ``apt-get``, it is installed from
Debian's packages (``nginx-light``, else ``nginx``); otherwise the caller skips the nginx
targets and says why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import debian
from load import Mode, request_body
from upstream import COMPLETION, stream_body

PACKAGES = ("nginx-light", "nginx")


def _version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def find_or_install() -> debian.Found:
    """nginx from PATH, else from Debian's packages when that is possible; never raises."""
    return debian.find_or_install("nginx", PACKAGES, _version)


def _main_section(directory: Path, connections: int) -> str:
    """What both configurations share: one foreground process, everything under ``directory``."""
    temp = "\n".join(
        f"    {name}_temp_path {directory / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
master_process off;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
{temp}
"""


def proxy_config(directory: Path, listen_port: int, upstream_port: int, connections: int) -> Path:
    """A reverse proxy in front of the benchmark upstream: unbuffered, kept-alive HTTP/1.1.

    ``connections`` bounds client plus upstream connections (two per proxied request).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(
        _main_section(directory, connections)
        + f"""    upstream bench {{
        server 127.0.0.1:{upstream_port};
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    return config


def static_config(directory: Path, listen_port: int) -> Path:
    """The upstream's two answers as files, the JSON one or the stream by request body length.

    The load's two request bodies differ in length (``"stream":false`` or ``true``), which is
    all nginx can tell them by without reading the body. The static module refuses a POST
    with 405; ``error_page 405 =200`` turns that into an internal GET of the answer's file.
    A stream is then one file sent in one write, not 51 events.
    """
    answers = directory / "answers"
    answers.mkdir(parents=True, exist_ok=True)
    (answers / "completion.json").write_bytes(COMPLETION)
    (answers / "stream.sse").write_bytes(stream_body())
    config = directory / "nginx.conf"
    config.write_text(
        _main_section(directory, 1024)
        + f"""    types {{
        application/json json;
        text/event-stream sse;
    }}
    map $http_content_length $answer {{
        default completion.json;
        {len(request_body(Mode.STREAM))} stream.sse;
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location = /v1/chat/completions {{
            error_page 405 =200 /answers/$answer;
            return 405;
        }}
        location /answers/ {{
            internal;
            root {directory};
        }}
    }}
}}
"""
    )
    return config


def command(binary: str, config: Path) -> list[str]:
    """Run ``config`` in the foreground; ``-e`` sends even the early errors to its own log."""
    directory = config.parent
    return [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
