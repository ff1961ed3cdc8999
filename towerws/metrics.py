"""Prometheus metrics of one node, and the ``/metrics`` resource that exposes them.

Each :class:`~towerws.app.TowerService` owns one :class:`Metrics` with its own
``CollectorRegistry``, so several in-process servers (tests) never collide.
Labels are bounded enumerations (outcomes); a group name or a user id is never
a label.

The hot path stays cheap: per message the hub and the AMQP side bump plain
integers (``Hub.delivered_frames``, ``AMQPService.consumed``, ...) which
:class:`_Totals` reads only when Prometheus scrapes; the one per-message
observation is the latency histogram's, a :class:`LatencyHistogram` (a bisect
and two additions, about 10x cheaper than ``prometheus_client.Histogram.observe``
with its locks).  Gauges are computed at scrape time from the live objects
(``set_function``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from towerws import __version__

# No *_created series: a timestamp per label value that no alert or graph here uses.
disable_created_metrics()

#: handshake outcomes (``towerws_handshakes_total{outcome}``)
HANDSHAKE_OUTCOMES = (
    "accepted", "unauthenticated", "auth_unavailable", "too_many_connections", "origin_refused", "not_found",
    "shutting_down",
)
#: groups-message outcomes (``towerws_subscribe_requests_total{outcome}``)
SUBSCRIBE_OUTCOMES = ("ok", "partly_denied", "denied", "invalid", "broker_unavailable", "superseded")
#: Tower API outcomes (``towerws_auth_requests_total{outcome}``), for the Tower API client
AUTH_OUTCOMES = ("ok", "unauthenticated", "error", "timeout")

# AMQP receive -> queued for every subscriber: microseconds when idle,
# milliseconds for a big fan-out, more when the reactor is overloaded.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Totals(Collector):
    """Counters kept as plain ints by their owners, read at scrape time."""

    def __init__(self, totals: dict[str, tuple[str, Callable[[], int]]]):
        self._totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, read) in self._totals.items():
            yield CounterMetricFamily(name, doc, value=read())


class LatencyHistogram(Collector):
    """A histogram kept in plain numbers, exposed at scrape time.

    ``observe`` runs once per delivered message in the reactor thread, and so does
    the scrape (``MetricsResource``): no lock is needed.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        self._name, self._doc = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        buckets, total = [], 0
        for bound, count in zip([*self._bounds, float("inf")], self._counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self._name, self._doc, buckets=buckets, sum_value=self._sum)


class Metrics:
    """Every metric of one node.  Build it, then :meth:`bind` it to the live objects."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # memory, CPU, open files: read from /proc at scrape time
        self.info = Info("towerws", "towerws version and node id", registry=r)
        self.connections = Gauge("towerws_connections", "open authenticated websocket connections", registry=r)
        self.groups = Gauge("towerws_groups_active", "groups with at least one local subscriber", registry=r)
        self.bindings = Gauge("towerws_amqp_bindings", "groups this node's queue is bound to", registry=r)
        self.amqp_up = Gauge("towerws_amqp_consuming", "1 while the broker connection is up and consuming", registry=r)
        self.amqp_broker = Gauge(
            "towerws_amqp_broker", "1 for the broker node (host:port of a configured URL) this node consumes from",
            ["broker"], registry=r,
        )
        self.handshakes = Counter(
            "towerws_handshakes", "websocket handshakes by outcome", ["outcome"], registry=r
        )
        self.subscribes = Counter(
            "towerws_subscribe_requests", "groups messages by outcome", ["outcome"], registry=r
        )
        self.amqp_reconnects = Counter(
            "towerws_amqp_reconnects", "broker connections set up again after the first", registry=r
        )
        self.slow_client_disconnects = Counter(
            "towerws_slow_client_disconnects", "clients dropped for not reading fast enough", registry=r
        )
        self.auth_requests = Counter(
            "towerws_auth_requests", "Tower API authentication requests by outcome", ["outcome"], registry=r
        )
        self.auth_cache_hits = Counter(
            "towerws_auth_cache_hits", "handshakes authenticated from the cache, without an API request", registry=r
        )
        self.latency = LatencyHistogram(
            "towerws_delivery_latency_seconds",
            "AMQP read to the message queued for every subscriber (written out at the end of that reactor turn)",
            LATENCY_BUCKETS,
        )
        r.register(self.latency)
        # Every label value exists from the start, so rate() sees a 0 -> 1 step.
        for counter, outcomes in (
            (self.handshakes, HANDSHAKE_OUTCOMES),
            (self.subscribes, SUBSCRIBE_OUTCOMES),
            (self.auth_requests, AUTH_OUTCOMES),
        ):
            for outcome in outcomes:
                counter.labels(outcome)

    def bind(self, node_id: str, connections: Callable[[], int], groups: Callable[[], int],
             bindings: Callable[[], int], consuming: Callable[[], bool],
             totals: dict[str, tuple[str, Callable[[], int]]],
             brokers: Sequence[str] = (), broker: Callable[[], str | None] = lambda: None) -> None:
        """Point the gauges and the int-backed counters at the live objects.

        ``brokers``: every configured broker node (a bounded label set); ``broker()``
        the one in use.
        """
        self.info.info({"version": __version__, "node_id": node_id})
        self.connections.set_function(connections)
        self.groups.set_function(groups)
        self.bindings.set_function(bindings)
        self.amqp_up.set_function(lambda: 1.0 if consuming() else 0.0)
        for node in brokers:
            self.amqp_broker.labels(node).set_function(lambda node=node: 1.0 if broker() == node else 0.0)
        self.registry.register(_Totals(totals))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsResource(Resource):
    """``GET /metrics``, rendered in the reactor thread (collection reads live objects)."""

    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        body, content_type = self.metrics.exposition(accept)
        request.setHeader("content-type", content_type)
        return body

