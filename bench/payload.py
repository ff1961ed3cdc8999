"""The message body every publisher sends and every load-generator client decodes.

``{"seq":        42,"t": 1795879692329480,"pad":"xxx..."}``: ``seq`` counts the
messages of one group from 0 (so a client can tell missing and repeated
messages), ``t`` is the send time in integer microseconds since the epoch
(``time.time_ns() // 1000``, one clock for all processes of the machine) and
``pad`` fills the body to the requested size.  Both numbers are right-aligned in
fixed-width fields (JSON allows the leading spaces), so the load generator reads
them by slicing, at about a microsecond per message, instead of a JSON parse.
"""

from __future__ import annotations

import json

#: bytes of a typical Tower job event (a few hundred): the default body size
DEFAULT_SIZE = 200

#: the fixed prefix, the fields' slices and the marker a delivery starts with
_PREFIX = b'{"seq":%10d,"t":%17d,"pad":"'
_SUFFIX = b'"}'
SEQ = slice(7, 17)
SENT_US = slice(22, 39)
MARKER = b'{"seq":'


def make_body(seq: int, sent_us: int, size: int = DEFAULT_SIZE) -> bytes:
    """A JSON body of ``size`` bytes (at least the fields' 49) carrying ``seq`` and ``sent_us``."""
    head = _PREFIX % (seq, sent_us)
    pad = max(0, size - len(head) - len(_SUFFIX))
    return head + b"x" * pad + _SUFFIX


def read_body(body: bytes) -> tuple[int, int]:
    """``(seq, sent_us)`` of a body made by :func:`make_body`."""
    return int(body[SEQ]), int(body[SENT_US])


#: what a probe body starts with (the rebind scenario: "is this group bound and delivering?")
PROBE_MARKER = b'{"probe":'


def make_probe(round_: int, group: str, sent_us: int) -> bytes:
    """A probe body: which probe round, for which group (a client may hold many), sent when."""
    return b'{"probe":%d,"g":"%s","t":%d}' % (round_, group.encode(), sent_us)


def read_probe(body: bytes) -> tuple[int, str, int]:
    """``(round, group, sent_us)`` of a body made by :func:`make_probe`."""
    fields = json.loads(body)
    return int(fields["probe"]), str(fields["g"]), int(fields["t"])


def messages_per_group(rate: float, duration: float, ngroups: int) -> int:
    """How many messages each group gets when ``rate``/s for ``duration`` s go round-robin over ``ngroups``.

    Publishers send whole rounds, so every group of a stream gets the same count
    and the same ``seq`` range; the runner computes the range with this too.
    """
    return max(1, round(rate * duration / ngroups))
