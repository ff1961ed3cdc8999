"""The AMQP 0-9-1 definitions txAMQP 0.8.2 lacks: the protocol spec and a complete field-table codec.

txAMQP's PyPI release ships no protocol definition (its ``DEFAULT_SPEC`` path
points at a ``specs/`` folder that only exists in its source repository), so
towerws carries its own: ``amqp0-9-1.xml``, package data, loaded by
:func:`load_spec`.

Its field-table codec (``txamqp.codec.Codec.decode_table`` / ``encode_table``)
knows only ``S``, ``I`` (read as *unsigned*), ``F`` and ``t``; a message whose
``headers`` carry a long-long, a timestamp, an array, a decimal, a float, a
byte array or a void raises inside the protocol's ``dataReceived``, and it can
only *write* strings and int32s.  :func:`decode_field_table` and
:func:`encode_field_table` are a complete AMQP 0-9-1 field-table codec using RabbitMQ's type letters
(the ones pika and the RabbitMQ Java client use, see the RabbitMQ "AMQP 0-9-1
errata", section 3):

=====  ===============================  ==============================
type   wire                             Python
=====  ===============================  ==============================
``t``  octet, non-zero is true          ``bool``
``b``  int8                             ``int``
``B``  uint8                            ``int``
``s``  int16 (RabbitMQ; ``U`` too)      ``int``
``u``  uint16                           ``int``
``I``  int32                            ``int``
``i``  uint32                           ``int``
``l``  int64                            ``int``
``L``  int64: the spec says uint64,     ``int``
       RabbitMQ and pika read it signed
``f``  float32                          ``float``
``d``  float64                          ``float``
``D``  scale octet + int32              ``decimal.Decimal``
``S``  uint32 length + bytes            ``str`` if UTF-8, else ``bytes``
``x``  uint32 length + bytes            ``bytes``
``A``  uint32 length + values           ``list``
``T``  uint64 seconds (UTC)             aware UTC ``datetime``
``F``  nested table                     ``dict``
``V``  nothing                          ``None``
=====  ===============================  ==============================

Timestamps decode to timezone-aware UTC datetimes (pika does the same); a value
beyond ``datetime``'s range (year > 9999) decodes to its int seconds instead of
failing.  Encoding: ``str`` -> S, ``bytes``/``bytearray``/``memoryview`` -> x,
``bool`` -> t, ``int`` -> I if it fits int32 else l, ``float`` -> d,
``Decimal`` -> D, ``datetime`` -> T (naive means UTC, sub-seconds dropped),
``dict`` -> F, ``list``/``tuple`` -> A, ``None`` -> V.  Anything else, or a
value out of its type's range, raises ``ValueError``; so does an unknown type
letter or a truncated table on decode (the caller decides what to do), and
tables/arrays nested more than :data:`MAX_DEPTH` levels deep, either way.
:func:`towerws.amqp.txamqp_internals.install` puts them in txAMQP's place.

Pure functions and data: nothing here changes txAMQP.
"""

from __future__ import annotations

import calendar
import functools
import importlib.resources
import struct
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import txamqp.spec

__all__ = [
    "MAX_DEPTH",
    "METHODS_USED",
    "decode_field_table",
    "decode_fields",
    "encode_field_table",
    "load_spec",
]

SPEC_RESOURCE = "amqp0-9-1.xml"

#: (class, method) pythonized names of every AMQP method towerws invokes.
METHODS_USED: tuple[tuple[str, str], ...] = (
    ("connection", "start_ok"),
    ("connection", "tune_ok"),
    ("connection", "open"),
    ("connection", "close"),
    ("connection", "close_ok"),
    ("channel", "open"),
    ("channel", "close"),
    ("channel", "close_ok"),
    ("channel", "flow_ok"),
    ("exchange", "declare"),
    ("exchange", "delete"),
    ("queue", "declare"),
    ("queue", "bind"),
    ("queue", "unbind"),
    ("queue", "delete"),
    ("queue", "purge"),
    ("basic", "qos"),
    ("basic", "consume"),
    ("basic", "cancel"),
    ("basic", "ack"),
    ("basic", "nack"),
    ("basic", "reject"),
    ("basic", "publish"),
    ("basic", "get"),
    ("confirm", "select"),
)


@functools.cache
def load_spec() -> txamqp.spec.Spec:
    """The AMQP 0-9-1 spec, parsed once from the package's ``amqp0-9-1.xml``."""
    data = importlib.resources.files(__package__).joinpath(SPEC_RESOURCE).read_bytes()
    return txamqp.spec.load_string(data, specfilename=SPEC_RESOURCE)


# -- field tables: decoding ------------------------------------------------------------

#: tables and arrays nested deeper than this are refused (ValueError), both ways,
#: rather than let a hostile message or a cyclic value hit the recursion limit
MAX_DEPTH = 64

_Decoder = Callable[[memoryview, int], tuple[Any, int]]

_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_DECIMAL = struct.Struct("!Bi")


def _fixed(fmt: str) -> _Decoder:
    packer = struct.Struct(fmt)
    size = packer.size

    def decode(buf: memoryview, pos: int) -> tuple[Any, int]:
        return packer.unpack_from(buf, pos)[0], pos + size

    return decode


def _bool(buf: memoryview, pos: int) -> tuple[bool, int]:
    return buf[pos] != 0, pos + 1


def _sized(buf: memoryview, pos: int) -> tuple[bytes, int]:
    (size,) = _U32.unpack_from(buf, pos)
    start = pos + 4
    end = start + size
    if end > len(buf):
        raise ValueError(f"field of {size} bytes overruns its table")
    return bytes(buf[start:end]), end


def _maybe_text(data: bytes) -> str | bytes:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _longstr(buf: memoryview, pos: int) -> tuple[str | bytes, int]:
    data, pos = _sized(buf, pos)
    return _maybe_text(data), pos


def _decimal(buf: memoryview, pos: int) -> tuple[Decimal, int]:
    scale, value = _DECIMAL.unpack_from(buf, pos)
    return Decimal(value).scaleb(-scale), pos + _DECIMAL.size


def _timestamp(buf: memoryview, pos: int) -> tuple[datetime | int, int]:
    (seconds,) = _U64.unpack_from(buf, pos)
    try:
        return datetime.fromtimestamp(seconds, timezone.utc), pos + 8
    except (OverflowError, OSError, ValueError):
        # beyond datetime's range: keep the number rather than fail the frame
        return seconds, pos + 8


def _void(buf: memoryview, pos: int) -> tuple[None, int]:
    return None, pos


_SCALARS: dict[int, _Decoder] = {
    ord("t"): _bool,
    ord("b"): _fixed("!b"),
    ord("B"): _fixed("!B"),
    ord("s"): _fixed("!h"),
    ord("U"): _fixed("!h"),
    ord("u"): _fixed("!H"),
    ord("I"): _fixed("!i"),
    ord("i"): _fixed("!I"),
    ord("l"): _fixed("!q"),
    ord("L"): _fixed("!q"),
    ord("f"): _fixed("!f"),
    ord("d"): _fixed("!d"),
    ord("D"): _decimal,
    ord("S"): _longstr,
    ord("x"): _sized,
    ord("T"): _timestamp,
    ord("V"): _void,
}
_ARRAY, _TABLE = ord("A"), ord("F")


def _value(buf: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    kind = buf[pos]
    if kind == _ARRAY:
        return _array(buf, pos + 1, depth + 1)
    if kind == _TABLE:
        return _table(buf, pos + 1, depth + 1)
    decoder = _SCALARS.get(kind)
    if decoder is None:
        raise ValueError(f"unknown AMQP field type {bytes([kind])!r} at offset {pos}")
    return decoder(buf, pos + 1)


def _container_end(buf: memoryview, pos: int, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise ValueError(f"AMQP field table nested deeper than {MAX_DEPTH} levels")
    (size,) = _U32.unpack_from(buf, pos)
    end = pos + 4 + size
    if end > len(buf):
        raise ValueError(f"table or array of {size} bytes overruns its container")
    return end


def _array(buf: memoryview, pos: int, depth: int) -> tuple[list[Any], int]:
    end = _container_end(buf, pos, depth)
    pos += 4
    items = []
    while pos < end:
        value, pos = _value(buf, pos, depth)
        items.append(value)
    if pos != end:
        raise ValueError("array contents overrun the array's length")
    return items, pos


def _fields(buf: memoryview, pos: int, end: int, depth: int) -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    while pos < end:
        keylen = buf[pos]
        key = _maybe_text(bytes(buf[pos + 1 : pos + 1 + keylen]))
        table[key], pos = _value(buf, pos + 1 + keylen, depth)
    if pos != end:
        raise ValueError("table contents overrun the table's length")
    return table


def _table(buf: memoryview, pos: int, depth: int) -> tuple[dict[Any, Any], int]:
    end = _container_end(buf, pos, depth)
    return _fields(buf, pos + 4, end, depth), end


def decode_fields(body: bytes | bytearray | memoryview) -> dict[Any, Any]:
    """The fields of a table whose size prefix has already been read; ``ValueError`` if truncated."""
    buf = memoryview(body)
    try:
        return _fields(buf, 0, len(buf), 0)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated AMQP field table: {exc}") from exc


def decode_field_table(data: bytes | bytearray | memoryview) -> dict[Any, Any]:
    """Decode one field table, as on the wire: uint32 size, then the fields.

    Raises ``ValueError`` for an unknown type letter, a truncated table or
    trailing bytes.
    """
    buf = memoryview(data)
    if len(buf) < 4:
        raise ValueError("truncated AMQP field table: no size")
    (size,) = _U32.unpack_from(buf, 0)
    if size != len(buf) - 4:
        raise ValueError(f"AMQP field table says {size} bytes, has {len(buf) - 4}")
    return decode_fields(buf[4:])


# -- field tables: encoding ------------------------------------------------------------

_INT32 = (-(2**31), 2**31)
_INT64 = (-(2**63), 2**63)


def _encode_key(out: bytearray, key: Any) -> None:
    if isinstance(key, str):
        raw = key.encode("utf-8")
    elif isinstance(key, bytes):
        raw = key
    else:
        raise ValueError(f"field table keys must be str or bytes, not {type(key).__name__}")
    if len(raw) > 255:
        raise ValueError(f"field table key longer than 255 bytes: {key!r}")
    out.append(len(raw))
    out += raw


def _encode_sized(out: bytearray, kind: bytes, raw: bytes | bytearray | memoryview) -> None:
    if len(raw) >= 2**32:
        raise ValueError("field value longer than 4 GiB")
    out += kind
    out += _U32.pack(len(raw))
    out += raw


def _encode_decimal(out: bytearray, value: Decimal) -> None:
    if not value.is_finite():
        raise ValueError(f"cannot encode {value!r} as an AMQP decimal")
    scale = max(0, -int(value.as_tuple().exponent))  # an int once finite
    unscaled = int(value.scaleb(scale))
    if scale > 255 or not _INT32[0] <= unscaled < _INT32[1]:
        raise ValueError(f"{value!r} does not fit an AMQP decimal (scale octet, int32)")
    out += b"D"
    out += _DECIMAL.pack(scale, unscaled)


def _encode_value(out: bytearray, value: Any, depth: int) -> None:
    # bool before int: bool is an int subclass
    if isinstance(value, str):
        _encode_sized(out, b"S", value.encode("utf-8"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _encode_sized(out, b"x", value)
    elif isinstance(value, bool):
        out += b"t\x01" if value else b"t\x00"
    elif isinstance(value, int):
        if _INT32[0] <= value < _INT32[1]:
            out += b"I" + struct.pack("!i", value)
        elif _INT64[0] <= value < _INT64[1]:
            out += b"l" + struct.pack("!q", value)
        else:
            raise ValueError(f"integer {value} does not fit an AMQP int64")
    elif isinstance(value, float):
        out += b"d" + struct.pack("!d", value)
    elif isinstance(value, Decimal):
        _encode_decimal(out, value)
    elif isinstance(value, datetime):
        seconds = int(value.timestamp()) if value.tzinfo else calendar.timegm(value.utctimetuple())
        if seconds < 0:
            raise ValueError(f"timestamp before 1970: {value!r}")
        out += b"T" + _U64.pack(seconds)
    elif isinstance(value, Mapping):
        out += b"F"
        _encode_table(out, value, depth + 1)
    elif isinstance(value, (list, tuple)):
        out += b"A"
        start = _reserve_size(out, depth + 1)
        for item in value:
            _encode_value(out, item, depth + 1)
        _patch_size(out, start)
    elif value is None:
        out += b"V"
    else:
        raise ValueError(f"cannot encode {type(value).__name__} {value!r} in an AMQP field table")


def _reserve_size(out: bytearray, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise ValueError(f"field table nested deeper than {MAX_DEPTH} levels (or cyclic)")
    out += b"\0\0\0\0"
    return len(out)


def _patch_size(out: bytearray, start: int) -> None:
    size = len(out) - start
    if size >= 2**32:
        raise ValueError("field table longer than 4 GiB")
    _U32.pack_into(out, start - 4, size)


def _encode_table(out: bytearray, table: Mapping[Any, Any], depth: int) -> None:
    start = _reserve_size(out, depth)
    for key, value in table.items():
        _encode_key(out, key)
        _encode_value(out, value, depth)
    _patch_size(out, start)


def encode_field_table(table: Mapping[Any, Any]) -> bytes:
    """Encode ``table`` as on the wire: uint32 size, then the fields."""
    out = bytearray()
    _encode_table(out, table, 0)
    return bytes(out)
