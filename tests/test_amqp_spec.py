"""towerws.amqp.spec (and its installation into txAMQP): the AMQP 0-9-1 spec file, the field-table codec, the warning filter.

The spec is cross-checked against pika's independently generated one (ids,
synchronous flags and the exact bytes of every method and of the basic
properties); the codec is checked with hypothesis, hand-built byte vectors and
a real RabbitMQ carrying a pika-published message into txAMQP.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import pika
import pika.data
import pika.spec
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator
from twisted.internet.task import Clock
from txamqp.client import TwistedDelegate
from txamqp.codec import Codec
from txamqp.connection import Header
from txamqp.connection import Method as MethodFrame
from txamqp.content import Content
from txamqp.protocol import AMQClient

from conftest import AMQP_URL, need_broker
from towerws.amqp import spec as amqpspec
from towerws.amqp import txamqp_internals

DEADLINE = 10.0


@pytest.fixture(autouse=True)
def _codec() -> None:
    txamqp_internals.install()


# -- the spec ------------------------------------------------------------------------


def test_methods_used_exist() -> None:
    spec = amqpspec.load_spec()
    assert amqpspec.load_spec() is spec  # cached
    for klass, method in amqpspec.METHODS_USED:
        assert method in spec.classes.bypyname[klass].methods.bypyname, (klass, method)
        assert callable(getattr(spec.klass, f"{klass}_{method}"))


@pytest.mark.parametrize(
    ("klass", "method", "ids"),
    [
        ("basic", "deliver", (60, 60)),
        ("basic", "publish", (60, 40)),
        ("basic", "get_ok", (60, 71)),
        ("queue", "bind", (50, 20)),
        ("confirm", "select", (85, 10)),
        ("connection", "open", (10, 40)),
        ("channel", "close_ok", (20, 41)),
    ],
)
def test_known_ids(klass: str, method: str, ids: tuple[int, int]) -> None:
    meth = amqpspec.load_spec().classes.bypyname[klass].methods.bypyname[method]
    assert (meth.klass.id, meth.id) == ids


def test_frame_constants() -> None:
    consts = {c.name: c.id for c in amqpspec.load_spec().constants}
    assert consts["frame-method"] == 1
    assert consts["frame-header"] == 2
    assert consts["frame-body"] == 3
    assert consts["frame-heartbeat"] == 8
    assert consts["frame-end"] == 206
    assert consts["reply-success"] == 200


def test_nowait_is_where_txamqp_looks_for_it() -> None:
    # AMQChannel.invoke reads method.fields.byname["nowait"]; any other name makes
    # a nowait=True call wait forever for a reply.
    spec = amqpspec.load_spec()
    for klass, method in [("queue", "bind"), ("queue", "declare"), ("basic", "consume"), ("confirm", "select")]:
        assert "nowait" in spec.classes.byname[klass].methods.bypyname[method].fields.byname


def test_connection_open_defaults() -> None:
    # AMQClient.start calls channel0.connection_open(vhost) for a non-0-8 spec
    spec = amqpspec.load_spec()
    calls = []

    class Recorder(spec.klass):
        def invoke(self, method: Any, args: tuple, content: Any = None) -> None:
            calls.append((method.name, args))

    Recorder().connection_open("/towerws")
    assert calls == [("open", ("/towerws", "", False))]


def _sample(field_type: str, i: int) -> Any:
    return {
        "bit": i % 2 == 0,
        "octet": i + 1,
        "short": 1000 + i,
        "long": 100000 + i,
        "longlong": 2**40 + i,
        "shortstr": f"s{i}",
        "longstr": f"long string {i}",
        "table": {"k": i, "s": "v"},
    }[field_type]


def _txamqp_method_bytes(meth: Any, args: list[Any]) -> bytes:
    out = BytesIO()
    codec = Codec(out)
    MethodFrame(meth, *args).encode(codec)
    codec.flush()
    return out.getvalue()[4 + 4 :]  # longstr size, class id, method id


def test_spec_matches_pika_byte_for_byte() -> None:
    """Every method: same ids and flags as pika, and the same bytes for the same arguments."""
    spec = amqpspec.load_spec()
    ours = {(c.id << 16) | m.id: m for c in spec.classes for m in c.methods}
    theirs = {index: cls for index, cls in pika.spec.methods.items() if index >> 16 != 30}  # access: gone in 0-9-1
    assert sorted(ours) == sorted(theirs)
    for index, meth in ours.items():
        pika_cls = theirs[index]
        args = [_sample(f.type, i) for i, f in enumerate(meth.fields)]
        pika_method = pika_cls(*args)
        where = f"{meth.klass.name}.{meth.name}"
        with_content = {"Basic.Publish", "Basic.Return", "Basic.Deliver", "Basic.GetOk"}
        assert bool(meth.content) == (pika_cls.NAME in with_content), where
        assert bool(meth.responses) == pika_method.synchronous, where  # pika: "expects a reply"
        assert _txamqp_method_bytes(meth, args) == b"".join(pika_method.encode()), where


PIKA_HEADERS: dict[str, Any] = {
    "long-long": 2**40 + 7,
    "negative": -123456,
    "timestamp": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc),
    "array": [1, "two", [3, None], {"four": 4}],
    "nested": {"a": {"b": "c"}, "flag": False},
    "yes": True,
    "price": Decimal("12.34"),
    "raw": b"\x00\xffbin",
    "text": "h\u00e9llo",
    "void": None,
}


def test_basic_properties_match_pika() -> None:
    props = dict(
        content_type="application/json",
        content_encoding="utf-8",
        headers=PIKA_HEADERS,
        delivery_mode=2,
        priority=5,
        correlation_id="corr",
        reply_to="reply",
        expiration="60000",
        message_id="mid",
        timestamp=1700000000,
        type="kind",
        user_id="guest",
        app_id="tower",
        cluster_id="c1",
    )
    pika_bytes = b"".join(pika.spec.BasicProperties(**props).encode())
    basic = amqpspec.load_spec().classes.byname["basic"]
    header = Header(basic, 0, 11, **{k.replace("_", "-"): v for k, v in props.items()})
    out = BytesIO()
    codec = Codec(out)
    header.encode(codec)
    codec.flush()
    assert out.getvalue()[4 + 12 :] == pika_bytes  # longstr size, class, weight, body size

    frame = struct.pack("!HHQ", 60, 0, 11) + pika_bytes
    decoded = Header.decode(amqpspec.load_spec(), Codec(BytesIO(struct.pack("!I", len(frame)) + frame)))
    assert decoded.size == 11
    assert decoded.properties["headers"] == PIKA_HEADERS
    assert decoded.properties["timestamp"] == 1700000000
    assert decoded.properties["cluster-id"] == "c1"


# -- the codec: properties ------------------------------------------------------------------

keys = st.text(max_size=20)
int32 = st.integers(-(2**31), 2**31 - 1)
decimals = st.builds(lambda unscaled, scale: Decimal(unscaled).scaleb(-scale), int32, st.integers(0, 12))
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(timezone.utc)
).map(lambda d: d.replace(microsecond=0))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    int32,
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    decimals,
    timestamps,
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=40,
)
tables = st.dictionaries(keys, values, max_size=8)


def typed(value: Any) -> Any:
    """``value`` with every leaf tagged by its type (tuples read back as lists).

    Plain ``==`` would take True for 1 and b"a" for nothing; this keeps the
    comparison strict about types while leaving numbers to compare by value
    (so -0.0 == 0.0, Decimal("1E+3") == Decimal("1000")).
    """
    if isinstance(value, dict):
        return ("dict", {k: typed(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return ("list", [typed(v) for v in value])
    for kind in (bool, int, float, Decimal, str, bytes, datetime):
        if isinstance(value, kind):  # bool before int; pika's long is an int subclass
            return (kind.__name__, value)
    return (type(value).__name__, value)


@settings(max_examples=300, deadline=None)
@given(tables)
def test_round_trip(table: dict[str, Any]) -> None:
    encoded = amqpspec.encode_field_table(table)
    assert typed(amqpspec.decode_field_table(encoded)) == typed(table)
    # the same through txAMQP's Codec, as Header/Method frames use it
    out = BytesIO()
    Codec(out).encode_table(table)
    assert out.getvalue() == encoded
    assert typed(Codec(BytesIO(encoded)).decode_table()) == typed(table)


no_float_scalars = scalars.filter(lambda v: not isinstance(v, float))
no_float_tables = st.dictionaries(
    keys,
    st.recursive(
        no_float_scalars,
        lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=5)),
        max_leaves=40,
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(no_float_tables)
def test_agrees_with_pika(table: dict[str, Any]) -> None:
    """pika reads what we write, and we read what pika writes (pika 1.4 has no floats)."""
    decoded, end = pika.data.decode_table(amqpspec.encode_field_table(table), 0)
    assert typed(decoded) == typed(table)
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, table)
    assert typed(amqpspec.decode_field_table(b"".join(pieces))) == typed(table)


# -- the codec: byte vectors ------------------------------------------------------------------


def field(key: str, kind: bytes, payload: bytes) -> bytes:
    raw = key.encode()
    return bytes([len(raw)]) + raw + kind + payload


def wire_table(*fields: bytes) -> bytes:
    body = b"".join(fields)
    return struct.pack("!I", len(body)) + body


def sized(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


UTC = timezone.utc
VECTORS = [
    (b"t", b"\x01", True),
    (b"t", b"\x00", False),
    (b"t", b"\x07", True),
    (b"b", struct.pack("!b", -5), -5),
    (b"B", struct.pack("!B", 250), 250),
    (b"s", struct.pack("!h", -300), -300),
    (b"U", struct.pack("!h", -301), -301),
    (b"u", struct.pack("!H", 65000), 65000),
    (b"I", struct.pack("!i", -(2**31)), -(2**31)),
    (b"i", struct.pack("!I", 2**32 - 1), 2**32 - 1),
    (b"l", struct.pack("!q", -(2**63)), -(2**63)),
    (b"l", struct.pack("!q", 2**40), 2**40),
    (b"L", struct.pack("!q", -1), -1),  # signed, as RabbitMQ reads it
    (b"f", struct.pack("!f", 1.5), 1.5),
    (b"d", struct.pack("!d", -2.25), -2.25),
    (b"D", struct.pack("!Bi", 3, -12345), Decimal("-12.345")),
    (b"D", struct.pack("!Bi", 0, 7), Decimal("7")),
    (b"S", sized("h\u00e9llo".encode()), "h\u00e9llo"),
    (b"S", sized(b"\xff\xfe"), b"\xff\xfe"),
    (b"x", sized(b"abc\x00"), b"abc\x00"),
    (b"x", sized(b"ok"), b"ok"),
    (
        b"A",
        sized(b"I" + struct.pack("!i", 1) + b"S" + sized(b"a") + b"V" + b"A" + sized(b"t\x01")),
        [1, "a", None, [True]],
    ),
    (b"A", sized(b""), []),
    (b"T", struct.pack("!Q", 1700000000), datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
    (b"T", struct.pack("!Q", 2**62), 2**62),  # beyond datetime: the seconds
    (
        b"F",
        wire_table(field("inner", b"I", struct.pack("!i", 3)), field("e", b"F", wire_table())),
        {"inner": 3, "e": {}},
    ),
    (b"V", b"", None),
]


@pytest.mark.parametrize(
    ("kind", "payload", "expected"), VECTORS, ids=[f"{v[0].decode()}-{i}" for i, v in enumerate(VECTORS)]
)
def test_decode_vector(kind: bytes, payload: bytes, expected: Any) -> None:
    data = wire_table(field("before", b"t", b"\x01"), field("key", kind, payload), field("after", b"V", b""))
    want = {"before": True, "key": expected, "after": None}
    assert typed(amqpspec.decode_field_table(data)) == typed(want)
    codec = Codec(BytesIO(data + b"rest"))
    assert typed(codec.decode_table()) == typed(want)
    assert codec.read(4) == b"rest"


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (True, b"t\x01"),
        (5, b"I" + struct.pack("!i", 5)),
        (-(2**31), b"I" + struct.pack("!i", -(2**31))),
        (2**31, b"l" + struct.pack("!q", 2**31)),
        (1.5, b"d" + struct.pack("!d", 1.5)),
        (Decimal("-1.50"), b"D" + struct.pack("!Bi", 2, -150)),
        (Decimal("1E+3"), b"D" + struct.pack("!Bi", 0, 1000)),
        ("\u00e9", b"S" + sized("\u00e9".encode())),
        (b"\xff", b"x" + sized(b"\xff")),
        (bytearray(b"ab"), b"x" + sized(b"ab")),
        (datetime(2023, 11, 14, 22, 13, 20), b"T" + struct.pack("!Q", 1700000000)),  # naive is UTC
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), b"T" + struct.pack("!Q", 1700000000)),
        ([1, None], b"A" + sized(b"I" + struct.pack("!i", 1) + b"V")),
        ((), b"A" + sized(b"")),
        ({"k": None}, b"F" + wire_table(field("k", b"V", b""))),
        (None, b"V"),
    ],
)
def test_encode_vector(value: Any, wire: bytes) -> None:
    assert amqpspec.encode_field_table({"v": value}) == wire_table(field("v", wire[:1], wire[1:]))


@pytest.mark.parametrize(
    "value", [2**63, -(2**63) - 1, object(), {1, 2}, Decimal("NaN"), Decimal("1e-300"), Decimal(2**40), {3: "int key"}]
)
def test_encode_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        amqpspec.encode_field_table({"v": value})


def test_unknown_type_letter() -> None:
    data = wire_table(field("ok", b"V", b""), field("bad", b"Z", b"\x00"))
    with pytest.raises(ValueError, match=r"unknown AMQP field type b'Z'"):
        amqpspec.decode_field_table(data)
    with pytest.raises(ValueError, match=r"unknown AMQP field type b'Z'"):
        Codec(BytesIO(data)).decode_table()


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",  # no size
        struct.pack("!I", 10) + b"\x01k",  # shorter than it says
        wire_table(field("k", b"I", b"\x00\x01")),  # int32 cut short
        wire_table(field("k", b"S", struct.pack("!I", 99) + b"abc")),  # string overruns
        wire_table(field("k", b"A", struct.pack("!I", 2) + b"I\x00\x00\x00\x01")),  # array item overruns the array
        wire_table(field("k", b"V", b"")) + b"\x00",  # trailing byte
    ],
)
def test_malformed_tables(data: bytes) -> None:
    with pytest.raises(ValueError):
        amqpspec.decode_field_table(data)


def test_linear_time() -> None:
    # a quadratic codec would take minutes here
    big = {f"k{i}": [i, str(i), {"n": i}] for i in range(20000)}
    deep: Any = "leaf"
    for _ in range(amqpspec.MAX_DEPTH // 2 - 1):
        deep = {"d": [deep]}
    for table in (big, {"deep": deep}):
        assert amqpspec.decode_field_table(amqpspec.encode_field_table(table)) == table


def test_nesting_limit() -> None:
    ok: Any = None
    for _ in range(amqpspec.MAX_DEPTH):
        ok = [ok]
    assert amqpspec.decode_field_table(amqpspec.encode_field_table({"v": ok})) == {"v": ok}
    with pytest.raises(ValueError, match="deeper"):
        amqpspec.encode_field_table({"v": [ok]})
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="deeper"):
        amqpspec.encode_field_table({"v": cyclic})
    hostile = b"V"
    for _ in range(5000):  # 25 kB: fits one frame, would blow the recursion limit
        hostile = b"A" + sized(hostile)
    with pytest.raises(ValueError, match="deeper"):
        amqpspec.decode_field_table(wire_table(field("v", hostile[:1], hostile[1:])))


def test_install_is_idempotent() -> None:
    txamqp_internals.install()
    txamqp_internals.install()
    assert Codec.decode_table is not txamqp_internals.ORIGINAL_DECODE_TABLE
    assert Codec(BytesIO(amqpspec.encode_field_table(PIKA_HEADERS))).decode_table() == PIKA_HEADERS


def test_txamqp_own_codec_cannot_read_pika_headers() -> None:
    """Without install_codec, txAMQP fails on the headers pika publishes: the fix is needed."""
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, PIKA_HEADERS)
    data = b"".join(pieces)
    assert Codec(BytesIO(data)).decode_table() == PIKA_HEADERS
    with pytest.raises(ValueError):
        txamqp_internals.ORIGINAL_DECODE_TABLE(Codec(BytesIO(data)))
    # it knows only S, I, F and t: every other type pika sends stops it
    for key in ("long-long", "timestamp", "array", "price", "raw", "void"):
        single: list[bytes] = []
        pika.data.encode_table(single, {key: PIKA_HEADERS[key]})
        with pytest.raises(ValueError):
            txamqp_internals.ORIGINAL_DECODE_TABLE(Codec(BytesIO(b"".join(single))))
    # and the one int type it knows, it reads as unsigned
    pieces = []
    pika.data.encode_table(pieces, {"n": -1})
    assert txamqp_internals.ORIGINAL_DECODE_TABLE(Codec(BytesIO(b"".join(pieces)))) == {"n": 2**32 - 1}
    assert Codec(BytesIO(b"".join(pieces))).decode_table() == {"n": -1}


# -- against RabbitMQ ----------------------------------------------------------------------------


class Route(NamedTuple):
    exchange: str
    queue: str
    key: str


# Not UTF-8 anywhere, so txAMQP keeps every body frame as bytes (it turns a frame
# that decodes as UTF-8 into str); three body frames at RabbitMQ's 128 KiB frame-max.
BODY = b"\xff\xfe not UTF-8 \x00\x01" + bytes(range(256)) * 1100


@pytest.fixture
def route() -> Iterator[Route]:
    need_broker()
    tag = uuid.uuid4().hex[:10]
    r = Route(f"towerws-test-amqpspec-{tag}", f"towerws-test-amqpspec-{tag}", "rich.headers")
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        ch = conn.channel()
        ch.exchange_declare(r.exchange, "direct", auto_delete=False)
        ch.queue_declare(r.queue, arguments={"x-expires": 120000})
        ch.queue_bind(r.queue, r.exchange, r.key)
    yield r
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        ch = conn.channel()
        ch.queue_delete(r.queue)
        ch.exchange_delete(r.exchange)


def pika_publish(r: Route, headers: dict[str, Any]) -> None:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(headers=headers, delivery_mode=1)
        ch.basic_publish(r.exchange, r.key, BODY, props, mandatory=True)


def bounded(d: defer.Deferred, seconds: float = DEADLINE) -> defer.Deferred:
    """Fail with TimeoutError instead of hanging."""
    return d.addTimeout(seconds, reactor)


@defer.inlineCallbacks
def txamqp_connect(delegate: TwistedDelegate | None = None) -> Any:
    delegate = delegate or TwistedDelegate()
    creator = ClientCreator(reactor, AMQClient, delegate=delegate, vhost="/", spec=amqpspec.load_spec())
    client = yield bounded(creator.connectTCP("127.0.0.1", 5672))
    try:
        yield bounded(client.authenticate("guest", "guest"))
        channel = yield bounded(client.channel(1))
        yield bounded(channel.channel_open())
    except BaseException:
        client.transport.abortConnection()
        raise
    return client, channel


@defer.inlineCallbacks
def txamqp_close(client: Any, channel: Any) -> Any:
    if not client.closed:
        try:
            yield bounded(channel.channel_close())
            yield client.close(within=5)
        finally:
            client.transport.loseConnection()
    yield bounded(client.disconnected.wait())


@pytest_twisted.inlineCallbacks
def test_txamqp_consumes_pika_headers(route: Route) -> Any:
    txamqp_internals.install()
    pika_publish(route, PIKA_HEADERS)
    client, channel = yield txamqp_connect()
    try:
        reply = yield bounded(channel.basic_consume(queue=route.queue, consumer_tag="t1", no_ack=False))
        assert reply.consumer_tag == "t1"
        queue = yield bounded(client.queue("t1"))
        msg = yield bounded(queue.get())
        assert msg.method.name == "deliver"
        assert msg.routing_key == route.key
        headers = msg.content.properties["headers"]
        assert typed(headers) == typed(PIKA_HEADERS)
        assert headers["timestamp"] == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
        assert isinstance(msg.content.body, bytes)
        assert msg.content.body == BODY
        channel.basic_ack(delivery_tag=msg.delivery_tag)
        yield bounded(channel.basic_cancel(consumer_tag="t1"))
    finally:
        yield txamqp_close(client, channel)


class ConfirmDelegate(TwistedDelegate):
    """TwistedDelegate has no handler for the broker's basic.ack (confirm mode): without
    one, txAMQP's dispatch raises AttributeError and the client closes the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.confirmed: defer.Deferred = defer.Deferred()

    def basic_ack(self, ch: Any, msg: Any) -> None:
        if not self.confirmed.called:
            self.confirmed.callback(msg.delivery_tag)


@pytest_twisted.inlineCallbacks
def test_txamqp_round_trip_through_broker(route: Route) -> Any:
    """What txAMQP writes (floats included, which pika cannot) RabbitMQ takes and gives back."""
    txamqp_internals.install()
    headers = {**PIKA_HEADERS, "float": 0.25, "floats": [1e300, -0.5], "tuple": (1, "x")}
    delegate = ConfirmDelegate()
    client, channel = yield txamqp_connect(delegate)
    try:
        yield bounded(channel.confirm_select())
        channel.basic_publish(
            exchange=route.exchange,
            routing_key=route.key,
            mandatory=True,
            content=Content(BODY, properties={"headers": headers, "content-type": "application/octet-stream"}),
        )
        assert (yield bounded(delegate.confirmed)) == 1
        msg = yield bounded(channel.basic_get(queue=route.queue, no_ack=True))
        assert msg.method.name == "get-ok"
        assert typed(msg.content.properties["headers"]) == typed({**headers, "tuple": [1, "x"]})
        assert msg.content.properties["content-type"] == "application/octet-stream"
        assert msg.content.body == BODY
        empty = yield bounded(channel.basic_get(queue=route.queue, no_ack=True))
        assert empty.method.name == "get-empty"
    finally:
        yield txamqp_close(client, channel)


# -- the returnValue warning -------------------------------------------------------------------------


RETURNVALUE_WARNING = "twisted.internet.defer.returnValue was deprecated"


def _trigger_in_txamqp() -> None:
    """Call a txAMQP inlineCallbacks function that ends in defer.returnValue."""
    client = AMQClient(TwistedDelegate(), "/", amqpspec.load_spec(), clock=Clock())
    result = []
    client.channel(1).addCallback(result.append)
    assert len(result) == 1


@defer.inlineCallbacks
def _return_value_here() -> Any:
    yield defer.succeed(None)
    defer.returnValue(42)


def test_returnvalue_filter_is_narrow() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")

        _trigger_in_txamqp()
        assert [str(w.message) for w in caught if RETURNVALUE_WARNING in str(w.message)], caught
        assert any("txamqp" in w.filename for w in caught)
        caught.clear()

        txamqp_internals.install()
        txamqp_internals.install()
        _trigger_in_txamqp()
        assert caught == []

        # the same warning from anywhere else still shows
        _return_value_here()
        assert [w.filename for w in caught] == [__file__]
        caught.clear()
        # and so does any other DeprecationWarning, from here or from txAMQP
        warnings.warn("something else", DeprecationWarning)
        warnings.warn_explicit(
            "another deprecation", DeprecationWarning, "txamqp/protocol.py", 1, module="txamqp.protocol"
        )
        assert [str(w.message) for w in caught] == ["something else", "another deprecation"]


def test_returnvalue_filter_under_w_error() -> None:
    """With DeprecationWarning as an error, txAMQP works only once the filter is in place."""
    code = (
        "import sys; sys.path.insert(0, {root!r})\n"
        "from towerws.amqp import spec as amqpspec, txamqp_internals\n"
        "from twisted.internet.task import Clock\n"
        "from txamqp.client import TwistedDelegate\n"
        "from txamqp.protocol import AMQClient\n"
        "if sys.argv[1] == 'silence': txamqp_internals.install()\n"
        "d = AMQClient(TwistedDelegate(), '/', amqpspec.load_spec(), clock=Clock()).channel(1)\n"
        "d.addCallbacks(lambda ch: print('ok'), lambda f: print('failed', f.getErrorMessage()))\n"
    )
    root = str(Path(amqpspec.__file__).resolve().parents[2])
    for mode, expected in (("silence", "ok"), ("plain", "failed " + RETURNVALUE_WARNING)):
        out = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-c", code.format(root=root), mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert out.startswith(expected), (mode, out)


def test_naive_timestamp_is_utc_like_pika() -> None:
    naive = datetime(2001, 2, 3, 4, 5, 6)
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, {"t": naive})
    assert amqpspec.encode_field_table({"t": naive}) == b"".join(pieces)
    assert amqpspec.decode_field_table(b"".join(pieces)) == {"t": naive.replace(tzinfo=UTC)}
