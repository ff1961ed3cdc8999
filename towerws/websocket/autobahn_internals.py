"""Every use of Autobahn beyond its documented API, in one place.

Each item here has a tripwire in ``tests/test_internals.py`` that fails, naming
the internal, when an Autobahn upgrade changes it; Autobahn is pinned in
``setup.cfg`` to the release series this was written against.

* :class:`RawSend` -- Autobahn writes everything (the handshake response, data
  frames, pings, the close frame) through ``WebSocketProtocol.sendData(data,
  sync, chopsize)``; overriding it routes all of it through the protocol's own
  ``send_raw`` (its fan-out path), without Autobahn's per-send debug-log call.
* :func:`with_class_options` -- Autobahn copies the factory's ~40 protocol
  options, listed in ``CONFIG_ATTRS``, onto every new connection; the options go
  on a subclass instead and ``CONFIG_ATTRS`` is emptied.
* :func:`send_close` -- ``sendCloseFrame``: ``sendClose()`` only takes codes 1000
  and 3000-4999, towerws also closes with 1001, 1003 and 1013.
* :func:`close_codes` -- ``localCloseCode`` / ``remoteCloseCode``: the codes of the
  close frames sent and received, for the access log.
* :func:`closed_first` -- ``closedByMe``: whether this side's close frame started the
  closing handshake (Autobahn's own protocol-error closes included) rather than
  answering the peer's, so the access log shows the code that started it.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol


class RawSend:
    """Mixin for a ``WebSocketProtocol``: every byte Autobahn sends goes to ``self.send_raw(data)``."""

    def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # sync/chopsize (Autobahn's test-suite options) are never set by towerws.
        self.send_raw(data)


def with_class_options(protocol: type[WebSocketProtocol], factory: Any) -> type[WebSocketProtocol]:
    """A subclass of ``protocol`` carrying the factory's protocol options as class attributes.

    Autobahn copies each option from the factory onto every new connection
    (``setattr`` into each instance's dict) and pretty-prints them for a debug log
    line that is formatted even when debug logging is off: measured, about a fifth
    of the CPU time of a handshake, and memory in every idle connection.  With the
    options on the class and an empty ``CONFIG_ATTRS`` that copy does nothing.
    """
    options = {
        # staticmethod: a callable option (e.g. perMessageCompressionAccept) must
        # not turn into a bound method when read through the instance.
        name: staticmethod(value) if callable(value) else value
        for name in protocol.CONFIG_ATTRS
        for value in (getattr(factory, name),)
    }
    return type(protocol.__name__, (protocol,), {**options, "CONFIG_ATTRS": (), "__module__": protocol.__module__})


def send_close(protocol: WebSocketProtocol, code: int, reason: str) -> None:
    """Start the closing handshake with any valid close code (``sendClose`` refuses 1001-1015)."""
    protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"))


def close_codes(protocol: WebSocketProtocol) -> tuple[int | None, int | None]:
    """(code of the close frame this side sent, code of the one it received); ``None`` where there was none."""
    return protocol.localCloseCode, protocol.remoteCloseCode


def closed_first(protocol: WebSocketProtocol) -> bool:
    """Whether this side sent the first close frame (``False``: it answered one, or sent none)."""
    return bool(protocol.closedByMe)
