"""The request ids tproxy makes for requests that bring none.

Safe in a header and a log line (32 lower-case hex digits), unique within a process (a counter)
and across the processes that share one log: each draws its own random prefix, a forked worker
too.
"""

from __future__ import annotations

import os
import re

from tproxy.app import _RequestIds

HEX32 = re.compile(rb"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = _RequestIds()
    made = [ids.next() for _ in range(10_000)]
    assert all(HEX32.fullmatch(request_id) for request_id in made)
    assert len(set(made)) == len(made)


def test_each_instance_draws_its_own_prefix() -> None:
    first, second = _RequestIds().next(), _RequestIds().next()
    assert first[:16] != second[:16]


def test_a_forked_child_draws_its_own_prefix() -> None:
    ids = _RequestIds()
    parent = ids.next()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, ids.next())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert HEX32.fullmatch(child)
    assert child[:16] != parent[:16]
    assert ids.next()[:16] == parent[:16]
