"""Every use of txAMQP beyond its documented API, in one place.

txAMQP 0.8.2 (its last release) is the AMQP client; towerws fixes what it lacks
and speeds up what it does slowly, and this module is the only one that
reaches into it.  Each item has a tripwire in ``tests/test_internals.py`` that
fails, naming the internal, when a txAMQP upgrade changes it; txAMQP is pinned
exactly in ``setup.cfg``.

* :func:`install` -- run once, explicitly, at start-up (the twistd plugin's
  ``makeService``, ``Publisher.connect``): txAMQP's field-table codec
  (``txamqp.codec.Codec.decode_table`` / ``encode_table``) is replaced
  process-wide by the complete one of :mod:`towerws.amqp.spec`, its body
  decoder (``txamqp.connection.Body.decode``) by one that keeps bodies as
  bytes, and the ``returnValue`` DeprecationWarning its own code raises on
  every call is hidden.
* :class:`ClientBase` -- ``AMQClient`` with the internals towerws's fast
  frame reader uses, under names of our own: :meth:`ClientBase.handle_frame`
  (``_unpack_frame`` + ``frame_received``), :meth:`ClientBase.traffic_seen`
  (``reschedule_check_heartbeat``), :attr:`ClientBase.silence_limit`
  (``heartbeatInterval * MAX_UNSEEN_HEARTBEAT``: three intervals), and the hooks txAMQP calls
  (``do_close``, ``check_heartbeat``, ``channel_failed``) turned into
  :meth:`ClientBase.on_close`, :meth:`ClientBase.on_heartbeat_missed`,
  :meth:`ClientBase.on_channel_failed`.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import txamqp.codec
import txamqp.connection
from twisted.python.failure import Failure
from txamqp.protocol import AMQClient

from towerws.amqp.spec import decode_fields, encode_field_table

#: txAMQP's own methods, as they were before :func:`install`
ORIGINAL_DECODE_TABLE = txamqp.codec.Codec.decode_table
ORIGINAL_ENCODE_TABLE = txamqp.codec.Codec.encode_table
ORIGINAL_BODY_DECODE = txamqp.connection.Body.decode

# Twisted's @deprecated wrapper warns with stacklevel=2, i.e. at the caller of
# returnValue: the txAMQP generator (e.g. txamqp/protocol.py), so the filter can
# match on the module txamqp and its submodules.  The message regex is matched
# from the start of the message only; it names the deprecated function exactly.
_RETURNVALUE_MESSAGE = re.escape("twisted.internet.defer.returnValue was deprecated")
_TXAMQP_MODULES = r"txamqp(\..*)?\Z"


def _codec_decode_table(self: txamqp.codec.Codec) -> dict[Any, Any]:
    size = self.decode_long()
    body = self.read(size)
    if len(body) != size:
        raise ValueError(f"truncated AMQP field table: {len(body)} of {size} bytes")
    return decode_fields(body)


def _codec_encode_table(self: txamqp.codec.Codec, tbl: Any) -> None:
    self.write(encode_field_table(tbl))


def _decode_body(spec: Any, dec: txamqp.codec.Codec) -> txamqp.connection.Body:
    return txamqp.connection.Body(dec.decode_longbytes())


def install() -> None:
    """Make txAMQP read and write every AMQP 0-9-1 field type and keep bodies as bytes.  Idempotent.

    ``Header.decode`` (message properties, e.g. ``headers``) and
    ``Method.decode`` (e.g. ``connection.start``'s server properties) reach the
    table codec through ``Codec.decode(field_type)`` -> ``decode_table``, and the
    AMQPLAIN login response goes through ``encode_longstr`` -> ``encode_table``,
    so patching the class covers them all.
    """
    txamqp.codec.Codec.decode_table = _codec_decode_table
    txamqp.codec.Codec.encode_table = _codec_encode_table
    # txAMQP decodes each body frame "opportunistically" as text, which drops or
    # mixes chunks of a multi-frame body; a body is bytes, always.
    txamqp.connection.Body.decode = staticmethod(_decode_body)
    warnings.filterwarnings(
        "ignore", message=_RETURNVALUE_MESSAGE, category=DeprecationWarning, module=_TXAMQP_MODULES
    )


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return txamqp.codec.Codec.decode_table is _codec_decode_table


class ClientBase(AMQClient):
    """``AMQClient`` with its internals under names of our own (see the module docstring)."""

    def handle_frame(self, raw: bytes) -> None:
        """Decode one whole frame (header to frame-end octet) and process it the generic way."""
        self.frame_received(self._unpack_frame(raw))

    def traffic_seen(self) -> None:
        """The broker sent something: restart the missed-heartbeat countdown."""
        if self.heartbeatInterval > 0:
            self.reschedule_check_heartbeat()

    @property
    def silence_limit(self) -> float:
        """Seconds without any traffic from the broker after which the connection is aborted."""
        return self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT

    # -- txAMQP's hooks ----------------------------------------------------------------

    def on_close(self, reason: object) -> None:
        """The connection is closing (the broker's ``connection.close``, or the transport went)."""

    def on_heartbeat_missed(self) -> None:
        """No traffic for :attr:`silence_limit` seconds: the connection is about to be aborted."""

    def on_channel_failed(self, channel: Any, reason: Failure) -> None:
        """The broker closed ``channel`` (a channel error)."""

    def do_close(self, reason: object) -> None:
        self.on_close(reason)
        super().do_close(reason)

    def check_heartbeat(self) -> None:
        self.on_heartbeat_missed()
        super().check_heartbeat()

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        self.on_channel_failed(channel, reason)
