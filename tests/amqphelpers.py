"""Small helpers for the AMQP unit tests: decoded AMQP methods and settled Deferreds, no broker."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from txamqp.message import Message

from towerws.amqp.spec import load_spec


def fired(d: Deferred) -> Any:
    """The result (or Failure) ``d`` already has; ``None`` if it has not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0] if results else None


def amqp_method(klass: str, method: str) -> Any:
    """The spec's description of an AMQP method, e.g. ``amqp_method("connection", "start")``."""
    return load_spec().classes.bypyname[klass].methods.bypyname[method]


def close_message(method: str, code: int, text: str) -> Message:
    """A ``connection_close`` / ``channel_close`` the broker could send."""
    klass, name = method.split("_")
    return Message(amqp_method(klass, name), [code, text, 0, 0])
