"""JSON log lines and where they go (the process-level checks are in test_process_ops.py)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from twisted.internet.task import Clock

from towerws.logs import RateLimitedLog, check_twistd_options, event_as_json, json_observer, twistd_log_file


def emit(**kw) -> list[dict]:
    out = io.StringIO()
    publisher = LogPublisher(json_observer(out, "node-a"))
    log = Logger(namespace="towerws.test", observer=publisher)
    log.emit(**kw)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and out.getvalue().endswith("\n")
    return json.loads(lines[0])


def test_event_fields_are_kept_and_the_message_formatted() -> None:
    record = emit(level=LogLevel.info, format="websocket {conn} closed: user {user} from {peer}",
                  conn=3, user=7, peer="tcp4:127.0.0.1:5000", reason="a \"quoted\"\nline")
    assert record["message"] == "websocket 3 closed: user 7 from tcp4:127.0.0.1:5000"
    assert (record["conn"], record["user"], record["peer"]) == (3, 7, "tcp4:127.0.0.1:5000")
    assert record["reason"] == "a \"quoted\"\nline"  # escaped: still one line
    assert (record["level"], record["namespace"], record["node_id"]) == ("info", "towerws.test", "node-a")
    assert record["time"].endswith("+00:00")
    assert not any(key.startswith("log_") for key in record)


def test_objects_become_text_and_failures_carry_their_traceback() -> None:
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    record = emit(level=LogLevel.critical, format="it broke: {thing}", thing=object(), log_failure=failure)
    assert record["thing"].startswith("<object object at")
    assert "ZeroDivisionError" in record["traceback"] and record["level"] == "critical"


def test_log_destination_follows_twistd() -> None:
    assert twistd_log_file({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_log_file({"nodaemon": True, "logfile": "-"}) is sys.stdout


def test_log_file_when_twistd_was_given_one(tmp_path: Path) -> None:
    out = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "towerws.log")})
    assert isinstance(out, LogFile)
    out.write(event_as_json({"log_format": "hello", "log_time": 0.0}, "n"))
    out.close()
    assert json.loads((tmp_path / "towerws.log").read_text())["message"] == "hello"


@pytest.mark.parametrize("twistd,expected", [({"syslog": True}, "syslog"),
                                              ({"logfile": "-", "nodaemon": False}, "daemon")])
def test_twistd_options_json_cannot_honour(twistd: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        check_twistd_options(twistd)


def test_rate_limited_log_holds_back_and_counts() -> None:
    events: list[dict] = []
    clock = Clock()
    limited = RateLimitedLog(Logger(observer=events.append), clock, interval=10)
    for _ in range(5):
        limited.warn("bad body for {group}", group="g")
    clock.advance(10)
    limited.warn("bad body for {group}", group="g")
    assert len(events) == 2
    assert events[0]["log_level"] == LogLevel.warn and events[0]["suppressed"] == 0
    assert events[1]["suppressed"] == 4
