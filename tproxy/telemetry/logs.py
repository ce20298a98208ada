"""Log formatting: JSON lines or console lines, and the access line of one exchange."""

from __future__ import annotations

import json
import logging

from tproxy.config import LogSettings
from tproxy.telemetry.records import ExchangeRecord, iso_time

access_log = logging.getLogger("tproxy.access")

ACCESS_FIELDS = "tproxy_access"  # the LogRecord attribute holding an access line's fields


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line. Access lines carry their fields at the top level.

    ``worker``: the number of the ``--workers`` process writing, on every line: the workers
    share the supervisor's stderr, so each line must say whose it is.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": None,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            document["worker"] = self._worker
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            document.update(fields)  # an access line's own time among them
        else:
            document["time"] = iso_time(record.created)
            document["message"] = record.getMessage()
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"))


def log_formatter(
    settings: LogSettings, *, terminal: bool, worker: int | None = None
) -> logging.Formatter:
    """The formatter ``log.format`` asks for; ``auto`` is console on a terminal, JSON otherwise.
    A worker of ``--workers`` names itself on each line (``worker``).

    Access lines read well in both: their message is :meth:`ExchangeRecord.summary`.
    """
    if settings.format == "json" or (settings.format == "auto" and not terminal):
        return JsonLogFormatter(worker)
    whose = "" if worker is None else f"[worker {worker}] "
    return logging.Formatter(f"%(asctime)s %(levelname)-7s {whose}%(message)s")


def emit_access(records: list[ExchangeRecord]) -> None:
    """Log the access lines of ``records``; the access sink calls this in a worker thread.

    Each line is made and handed to the handlers directly: ``Logger.info`` would also look up
    its caller on the stack, for a source line nobody reads (a fifth of a line's cost).
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    for record in records:
        line = access_log.makeRecord(
            access_log.name,
            logging.INFO,
            __file__,
            0,
            "%s",
            (_Summary(record),),
            None,
            extra={ACCESS_FIELDS: record.to_json()},
        )
        access_log.handle(line)


class _Summary:
    """An access line's message for people, made only if a formatter shows it (the console's
    does; the JSON one shows the fields)."""

    __slots__ = ("_record",)

    def __init__(self, record: ExchangeRecord) -> None:
        self._record = record

    def __str__(self) -> str:
        return self._record.summary()
