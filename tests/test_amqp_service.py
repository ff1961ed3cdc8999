"""towerws.amqp.service without a broker: the queue's arguments, the publish contract (refused before any
I/O), the state before start, and the clear message for a queue declared as the other type.

Against the real broker: ``test_pipeline.py``, ``test_broker_faults.py``, ``test_cluster.py``, ..."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from txamqp.client import Closed

from amqphelpers import close_message, fired
from towerws.amqp.endpoint import QueueTypeConflict
from towerws.amqp.service import AMQPService
from towerws.config import QUEUE_PREFIX, load
from towerws.hub import Hub
from towerws.messages import InvalidBody
from towerws.websocket.protocol import text_frame

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def service(**options: str) -> tuple[AMQPService, MemoryReactorClock]:
    settings = load({"amqp_url": URL, "node_id": "n1", **options}, environ={})
    reactor = MemoryReactorClock()
    return AMQPService(settings, Hub(text_frame), reactor), reactor


def test_classic_queue_arguments() -> None:
    svc, _ = service(queue_type="classic", queue_expires="60", queue_max_length="1000")
    assert svc.queue == QUEUE_PREFIX + "n1"
    assert svc.queue_arguments() == {"x-expires": 60_000, "x-max-length": 1000, "x-overflow": "drop-head"}


def test_quorum_queue_arguments() -> None:
    svc, _ = service(queue_type="quorum", queue_expires="0.5", queue_max_length="7")
    assert svc.queue_arguments() == {
        "x-expires": 500, "x-max-length": 7, "x-overflow": "drop-head",
        "x-queue-type": "quorum", "x-queue-leader-locator": "balanced",
    }


def test_before_start_nothing_is_ready_and_nothing_connects() -> None:
    svc, reactor = service()
    assert (svc.state, svc.ready, svc.broker, svc.bound_count) == ("stopped", False, None, 0)
    assert (svc.consumed, svc.dropped) == (0, 0)
    assert not svc.when_ready().called
    assert reactor.tcpClients == []


@pytest.mark.parametrize("group, body, error", [
    ("", b"{}", ValueError), ("jobs summary", b"{}", ValueError), ("x" * 256, b"{}", ValueError),
    ("jobs-summary", b"{", InvalidBody), ("jobs-summary", b"Infinity", InvalidBody),
    ("jobs-summary", "{}", TypeError),
])
def test_an_invalid_publish_fails_at_once_without_io(group: str, body: Any, error: type) -> None:
    svc, reactor = service()
    failure = fired(svc.publish(group, body))
    assert failure is not None and failure.check(error)
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []  # no wait for a connection, no timer


def test_a_valid_publish_waits_for_a_connection_then_times_out() -> None:
    svc, reactor = service(publish_timeout="2")
    d = svc.publish("jobs-summary", b"{}")
    reactor.advance(1.9)
    assert not d.called
    reactor.advance(0.1)
    failure = fired(d)
    assert failure.getErrorMessage() == (
        "no broker node confirmed the message within 2 s (not connected to a broker)")


def refused(code: int, text: str) -> Closed:
    """What txAMQP raises when the broker closes the channel over a queue.declare."""
    return Closed(close_message("channel_close", code, text))


@pytest.mark.parametrize("configured, existing", [("quorum", "classic"), ("classic", "quorum")])
def test_a_queue_of_the_other_type_is_explained(configured: str, existing: str) -> None:
    svc, _ = service(queue_type=configured)
    exc = refused(406, f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{svc.queue}' in vhost '/': "
                       f"received the value '{configured}' of type 'longstr' but current is none")
    explained = svc._explain_declare_refusal(exc)  # no public seam: see the report
    assert isinstance(explained, QueueTypeConflict)
    text = str(explained)
    assert text.startswith(f"queue {svc.queue} exists as a {existing} queue, but --queue-type is {configured}; "
                           "nothing was changed.")
    assert f"rabbitmqctl delete_queue {svc.queue} --if-empty" in text and f"keep --queue-type {existing}" in text


@pytest.mark.parametrize("code, text", [
    (406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'towerws.n1'"),
    (403, "ACCESS_REFUSED - access to queue 'towerws.n1' in vhost '/' refused for user 'guest'"),
])
def test_other_refusals_pass_through(code: int, text: str) -> None:
    svc, _ = service()
    exc = refused(code, text)
    assert svc._explain_declare_refusal(exc) is exc
