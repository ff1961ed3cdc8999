"""towerws.metrics: the latency histogram, the gauges bound to live objects, the int-backed counters,
and /metrics with its content type negotiation. No server: a Metrics of its own per test."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.web.test.requesthelper import DummyRequest

from towerws import __version__
from towerws.metrics import (
    AUTH_OUTCOMES,
    HANDSHAKE_OUTCOMES,
    LATENCY_BUCKETS,
    SUBSCRIBE_OUTCOMES,
    LatencyHistogram,
    Metrics,
    MetricsResource,
)

LATENCY = "towerws_delivery_latency_seconds"
BROKERS = ["rabbit-1:5672", "rabbit-2:5672", "rabbit-3:5671"]


class Live:
    """Stands in for the node's objects the gauges read at scrape time."""

    def __init__(self) -> None:
        self.connections, self.groups, self.bindings, self.consuming = 0, 0, 0, False
        self.broker: str | None = None
        self.consumed = 0


def bound(live: Live, brokers: list[str] = BROKERS) -> Metrics:
    metrics = Metrics()
    metrics.bind(
        node_id="node-a",
        connections=lambda: live.connections,
        groups=lambda: live.groups,
        bindings=lambda: live.bindings,
        consuming=lambda: live.consuming,
        totals={"towerws_amqp_messages_consumed": ("messages consumed", lambda: live.consumed)},
        brokers=brokers,
        broker=lambda: live.broker,
    )
    return metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- the latency histogram ------------------------------------------------------------------------


def test_histogram_buckets_are_less_than_or_equal_and_cumulative() -> None:
    metrics = Metrics()
    for value in (0.00005, 0.0001, 0.00011, 0.003, 0.003, 2.5, 7.0):
        metrics.latency.observe(value)

    def le(bound: str) -> float | None:
        return sample(metrics, f"{LATENCY}_bucket", le=bound)

    assert le("0.0001") == 2  # 0.00005 and exactly 0.0001
    assert le("0.00025") == 3
    assert le("0.0025") == 3 and le("0.005") == 5
    assert le("1.0") == 5 and le("2.5") == 6  # exactly 2.5 is in the 2.5 bucket
    assert le("+Inf") == 7 and sample(metrics, f"{LATENCY}_count") == 7
    assert sample(metrics, f"{LATENCY}_sum") == pytest.approx(0.00005 + 0.0001 + 0.00011 + 0.006 + 2.5 + 7.0)


def test_histogram_exposes_every_bucket_from_the_start() -> None:
    histogram = LatencyHistogram("h_seconds", "doc", [0.1, 1.0])
    (family,) = histogram.collect()
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == "h_seconds_bucket"]
    assert buckets == [("0.1", 0), ("1.0", 0), ("+Inf", 0)]
    assert len(LATENCY_BUCKETS) + 1 == len([
        s for s in next(Metrics().latency.collect()).samples if s.name == f"{LATENCY}_bucket"
    ])


# -- bind: gauges and totals read at scrape time --------------------------------------------------------


def test_gauges_follow_the_live_objects() -> None:
    live = Live()
    metrics = bound(live)
    assert sample(metrics, "towerws_connections") == 0 and sample(metrics, "towerws_amqp_consuming") == 0
    live.connections, live.groups, live.bindings, live.consuming, live.consumed = 3, 2, 5, True, 41
    assert sample(metrics, "towerws_connections") == 3
    assert sample(metrics, "towerws_groups_active") == 2
    assert sample(metrics, "towerws_amqp_bindings") == 5
    assert sample(metrics, "towerws_amqp_consuming") == 1
    assert sample(metrics, "towerws_amqp_messages_consumed_total") == 41
    assert sample(metrics, "towerws_info", version=__version__, node_id="node-a") == 1


def test_broker_gauge_is_one_for_the_node_in_use_zero_for_the_others() -> None:
    live = Live()
    metrics = bound(live)

    def brokers() -> dict[str, float]:
        (family,) = [f for f in metrics.registry.collect() if f.name == "towerws_amqp_broker"]
        return {s.labels["broker"]: s.value for s in family.samples}

    # The label set is exactly the configured brokers, all 0 while connecting.
    assert brokers() == dict.fromkeys(BROKERS, 0.0)
    live.broker = "rabbit-2:5672"
    assert brokers() == {"rabbit-1:5672": 0.0, "rabbit-2:5672": 1.0, "rabbit-3:5671": 0.0}
    live.broker = "rabbit-3:5671"  # failover
    assert brokers() == {"rabbit-1:5672": 0.0, "rabbit-2:5672": 0.0, "rabbit-3:5671": 1.0}
    live.broker = "elsewhere:5672"  # never a new label value
    assert brokers() == dict.fromkeys(BROKERS, 0.0)


def test_broker_gauge_has_no_series_without_a_broker() -> None:
    metrics = bound(Live(), brokers=[])
    assert [s for f in metrics.registry.collect() if f.name == "towerws_amqp_broker" for s in f.samples] == []


def test_every_outcome_exists_from_the_start() -> None:
    metrics = Metrics()
    for name, outcomes in (("towerws_handshakes_total", HANDSHAKE_OUTCOMES),
                           ("towerws_subscribe_requests_total", SUBSCRIBE_OUTCOMES),
                           ("towerws_auth_requests_total", AUTH_OUTCOMES)):
        for outcome in outcomes:
            assert sample(metrics, name, outcome=outcome) == 0, (name, outcome)
    metrics.handshakes.labels("accepted").inc()
    assert sample(metrics, "towerws_handshakes_total", outcome="accepted") == 1


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.slow_client_disconnects.inc()
    assert sample(a, "towerws_slow_client_disconnects_total") == 1
    assert sample(b, "towerws_slow_client_disconnects_total") == 0


def test_no_created_series() -> None:
    body, _ = Metrics().exposition(None)
    assert b"_created" not in body


# -- /metrics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept, content_type", [
    (None, "text/plain; version=0.0.4"),
    ("text/plain", "text/plain; version=0.0.4"),
    ("*/*", "text/plain; version=0.0.4"),
    ("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5", "application/openmetrics-text"),
])
def test_exposition_negotiates_the_format(accept: str | None, content_type: str) -> None:
    metrics = bound(Live())
    body, got = metrics.exposition(accept)
    assert got.startswith(content_type)
    if content_type.startswith("application/openmetrics-text"):
        assert body.endswith(b"# EOF\n")
    else:
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"towerws_connections", "towerws_amqp_broker", LATENCY, "towerws_handshakes"} <= names


def test_metrics_resource_sets_the_negotiated_content_type() -> None:
    metrics = bound(Live())
    resource = MetricsResource(metrics)
    for accept, expected in ((None, b"text/plain"), (b"application/openmetrics-text", b"application/openmetrics-text")):
        request = DummyRequest([b""])
        if accept is not None:
            request.requestHeaders.addRawHeader(b"accept", accept)
        body = resource.render_GET(request)
        assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(expected)
        assert b"towerws_connections 0.0" in body
