"""Group names are AMQP routing keys: the rules every publisher checks before any I/O.

Pure (no I/O, no AMQP client), so the synchronous emitter (``towerws.emit``), the
Twisted publisher (``towerws.publish``) and the in-process bus share one definition.
"""

from __future__ import annotations

MAX_GROUP_BYTES = 255  # AMQP short string: the routing key limit


def check_group(group: str) -> None:
    """Raise TypeError/ValueError if ``group`` cannot be a routing key towerws clients subscribe to."""
    if not isinstance(group, str):
        raise TypeError(f"group must be a str, not {type(group).__name__}")
    if not group:
        raise ValueError("group must not be empty")
    try:
        size = len(group.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"group {group!r} is not valid Unicode: {exc}") from exc
    if size > MAX_GROUP_BYTES:
        raise ValueError(f"group is {size} bytes long; at most {MAX_GROUP_BYTES} are allowed")
    if any(ch.isspace() for ch in group):
        raise ValueError(f"group {group!r} must not contain whitespace")
