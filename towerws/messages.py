"""What a message is: the rules every path checks before any I/O.

* **Group names** are AMQP routing keys: non-empty, at most 255 bytes of UTF-8, no
  whitespace (:func:`check_group`); a subscribable group is ``KEY-ITEM``
  (:func:`group_name`, :func:`split_group`; which ones exist is the allowlist's
  business, :mod:`towerws.subscribe`).
* **Bodies** are one RFC 8259 JSON document in UTF-8 (:func:`check_body`):
  ``NaN``, ``Infinity`` and ``-Infinity``, which Python's ``json`` accepts and a
  browser's ``JSON.parse`` throws on, are refused (:func:`loads`).
* **Names** of exchanges and nodes are AMQP short strings: non-empty, at most
  255 bytes, no whitespace (:func:`check_name`).

Pure (no I/O, no AMQP client): the consumer, the hub, every publisher (the
synchronous emitter, the Twisted publisher, the HTTP publish API, the node's
bus) and the configuration share these definitions.
"""

from __future__ import annotations

import json
from typing import Any

#: AMQP short string: the limit of routing keys, exchange and queue names
MAX_SHORTSTR_BYTES = 255
MAX_GROUP_BYTES = MAX_SHORTSTR_BYTES
#: the separator of a group's KEY and ITEM (``job_events-42``)
GROUP_SEPARATOR = "-"


class InvalidBody(ValueError):
    """A message body that is not one UTF-8 RFC 8259 JSON document; it is never delivered."""


# -- names -------------------------------------------------------------------------


def check_name(name: str, what: str = "name", max_bytes: int = MAX_SHORTSTR_BYTES) -> str:
    """Return ``name`` if it can be an AMQP name (exchange, queue, routing key); else TypeError/ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {name[:64]!r} is not valid Unicode: {exc.reason}") from None
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes long; at most {max_bytes} are allowed")
    if any(ch.isspace() for ch in name):
        raise ValueError(f"{what} {name[:64]!r} must not contain whitespace")
    return name


def check_group(group: str) -> None:
    """Raise TypeError/ValueError if ``group`` cannot be a routing key towerws clients subscribe to."""
    check_name(group, "group", MAX_GROUP_BYTES)


def group_name(key: str, item: str | int) -> str:
    """The group a (KEY, ITEM) pair of a groups message names: ``KEY-ITEM``."""
    return f"{key}{GROUP_SEPARATOR}{item}"


def split_group(group: str) -> tuple[str, str] | None:
    """``(KEY, ITEM)`` of a ``KEY-ITEM`` group name (KEYs are words: the first ``-`` splits), or ``None``."""
    key, sep, item = group.partition(GROUP_SEPARATOR)
    return (key, item) if sep else None


# -- bodies ------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder, built once: json.loads(..., parse_constant=...) would build a new one per call.
_STRICT = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str) -> Any:
    """``json.loads`` for RFC 8259 JSON: ``NaN``/``Infinity``/``-Infinity`` raise ``ValueError``.

    ``json.JSONDecodeError`` (a ``ValueError``) for text that is not JSON;
    ``RecursionError`` for nesting too deep for the parser.
    """
    if not isinstance(text, str):
        raise TypeError(f"JSON text must be a str, not {type(text).__name__}")
    return _STRICT.decode(text)


def check_body(body: bytes) -> None:
    """Raise :class:`InvalidBody` unless ``body`` is one UTF-8 RFC 8259 JSON document."""
    try:
        loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidBody("body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidBody("body is nested too deeply") from None
    except json.JSONDecodeError:
        raise InvalidBody("body is not valid JSON") from None
    except ValueError as exc:  # NaN, Infinity
        raise InvalidBody(f"body is not valid JSON: {exc}") from None


def check_message(group: str, body: bytes) -> None:
    """Raise TypeError/ValueError unless ``body`` (UTF-8 JSON bytes) can be published to ``group``."""
    check_group(group)
    if not isinstance(body, bytes):
        raise TypeError(f"body must be bytes, not {type(body).__name__}")
    check_body(body)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj`` that :func:`check_body` accepts; ``ValueError`` for NaN/Infinity."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
