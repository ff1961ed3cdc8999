"""towerws.amqp.publisher without a broker: the publish contract (invalid group or body refused before any
I/O), what connect refuses before connecting, and its timeout on a MemoryReactorClock.

Against the real broker: ``test_publish.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from amqphelpers import fired
from test_amqp_confirms import FakeChannel
from towerws.amqp.confirms import Confirms
from towerws.amqp.publisher import Publisher
from towerws.broker_urls import amqp_address
from towerws.bus import PublishError
from towerws.messages import InvalidBody


def publisher() -> tuple[Publisher, FakeChannel]:
    channel = FakeChannel()
    reactor = MemoryReactorClock()
    return Publisher(None, Confirms(channel, "towerws", reactor, 5), amqp_address("amqp://localhost/")), channel


@pytest.mark.parametrize("group, body, error", [
    ("", b"{}", ValueError), ("job events", b"{}", ValueError), ("x" * 256, b"{}", ValueError),
    ("jobs-summary", b"not json", InvalidBody), ("jobs-summary", b"\xff", InvalidBody),
    ("jobs-summary", b"[NaN]", InvalidBody), ("jobs-summary", "{}", TypeError),
])
def test_invalid_group_or_body_fails_before_io(group: str, body: Any, error: type) -> None:
    pub, channel = publisher()
    assert fired(pub.publish(group, body)).check(error)
    assert channel.sent == [] and pub.confirms.in_flight == 0


def test_a_valid_message_goes_to_the_confirm_channel() -> None:
    pub, channel = publisher()
    d = pub.publish("jobs-summary", b'{"n": 1}')
    assert [(key, body) for _, key, body, _ in channel.sent] == [("jobs-summary", b'{"n": 1}')]
    assert not d.called  # waits for the broker's confirm
    pub.confirms.settle(1, multiple=False, ok=True)
    assert fired(d) is None and pub.confirms.in_flight == 0


@pytest.mark.parametrize("url", ["http://localhost/", "amqp://guest:pw@/", "amqp://h:99999/"])
def test_an_invalid_url_fails_without_connecting(url: str) -> None:
    reactor = MemoryReactorClock()
    failure = fired(Publisher.connect(url, reactor=reactor))
    assert failure.check(ValueError) and failure.getErrorMessage().startswith("invalid AMQP URL: ")
    assert "pw" not in failure.getErrorMessage()
    assert reactor.tcpClients == [] and reactor.sslClients == []


def test_an_unreadable_ca_file_fails_without_connecting(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    missing = str(tmp_path / "ca.pem")
    failure = fired(Publisher.connect("amqps://localhost/", reactor=reactor, ca_file=missing))
    assert failure.check(ValueError) and missing in failure.getErrorMessage()
    assert reactor.tcpClients == [] and reactor.sslClients == []


def connect_unanswered(timeout: float = 3) -> Any:
    """A connect whose TCP connection attempt never completes (a black-holed address), after ``timeout``."""
    reactor = MemoryReactorClock()
    d = Publisher.connect("amqp://guest:secretpw@192.0.2.1:5673/", reactor=reactor, timeout=timeout)
    # MemoryReactor resolves every name to 127.0.0.1 and never completes the attempt.
    assert [port for _, port, *_ in reactor.tcpClients] == [5673]
    reactor.advance(timeout - 0.1)
    assert not d.called
    reactor.advance(0.1)
    return fired(d)


def test_a_connection_attempt_that_never_completes_fails_within_the_timeout() -> None:
    failure = connect_unanswered()
    assert failure.check(PublishError)
    assert "amqp://guest@192.0.2.1:5673/" in failure.getErrorMessage() and "secretpw" not in failure.getErrorMessage()


@pytest.mark.xfail(strict=True, reason=(
    "towerws.amqp.publisher: HostnameEndpoint fails a cancelled attempt with ConnectingCancelledError, which is "
    "no CancelledError, so the timeout reads 'cannot connect ...: ConnectingCancelledError: HostnameAddress(...)'"))
def test_a_connection_attempt_that_never_completes_says_no_answer_within() -> None:
    assert connect_unanswered().getErrorMessage() == "no answer from the AMQP broker amqp://guest@192.0.2.1:5673/ within 3 s"
