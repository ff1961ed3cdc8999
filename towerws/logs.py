"""Log output: ``--log-format json`` lines, and warnings that cannot flood the log.

:class:`RateLimitedLog` logs a warning at most once per interval, counting the
ones it held back: for events an outsider can repeat at will (garbage AMQP
bodies, a publisher retrying with a wrong secret).

``--log-format json``: one JSON object per line, for log shippers.

twistd owns log output.  In text mode towerws leaves it alone.  In json mode
the plugin builds a :func:`json_observer` writing where twistd would have
written (:func:`twistd_log_file`), and twistd uses it because it is the
``ILogObserver`` component of the application (see ``TowerService.setServiceParent``).

Each line has ``time``, ``level``, ``namespace``, ``message`` (the formatted
text), ``node_id``, and every structured field of the event (``conn``,
``user``, ``peer``, ``reason``, ...); a failure adds ``traceback``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import FileLogObserver, LogEvent, Logger, formatEvent
from twisted.python.logfile import LogFile

_PLAIN = (str, int, float, bool, type(None))


class RateLimitedLog:
    """Logs a warning at most once per ``interval`` seconds, counting the ones it held back."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0):
        self._log, self._clock, self._interval = log, clock, interval
        self._next = 0.0
        self._held = 0

    def warn(self, fmt: str, **kw: Any) -> None:
        now = self._clock.seconds()
        if now < self._next:
            self._held += 1
            return
        self._log.warn(fmt + " ({suppressed} similar suppressed)", suppressed=self._held, **kw)
        self._held = 0
        self._next = now + self._interval


def event_as_json(event: LogEvent, node_id: str) -> str:
    """One log event as one line of JSON (newline included)."""
    record: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_"):
            continue
        record[key] = value if isinstance(value, _PLAIN) else str(value)
    level = event.get("log_level")
    record.update(
        time=datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        level=level.name if level is not None else "info",
        namespace=event.get("log_namespace", ""),
        message=formatEvent(event),
        node_id=node_id,
    )
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str], node_id: str) -> FileLogObserver:
    return FileLogObserver(out, lambda event: event_as_json(event, node_id))


def check_twistd_options(twistd: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for twistd logging options json mode cannot honour."""
    if twistd.get("syslog"):
        raise ValueError("--log-format json cannot write to syslog (twistd --syslog); use one or the other")
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise ValueError("--log-format json: a daemon cannot log to stdout (twistd --logfile -)")


def twistd_log_file(twistd: Mapping[str, Any]) -> IO[str]:
    """Where twistd itself writes its text log, by the same rule.

    Standard output with ``--nodaemon`` and no ``--logfile`` (or ``--logfile -``),
    else the ``--logfile`` (default ``twistd.log``), a size-rotated ``LogFile``.
    """
    name = twistd.get("logfile") or ""
    if name == "-" or (not name and twistd.get("nodaemon")):
        return sys.stdout
    return LogFile.fromFullPath(name or "twistd.log")
