"""towerws.broker_urls: one URL or a list of cluster nodes, parsed once, shown without passwords."""

from __future__ import annotations

import random

import pytest

from towerws import config
from towerws.broker_urls import DEFAULT_AMQP_URL, amqp_address, brokers, brokers_or_none, redact_url


def test_one_url_parses_and_hides_its_password() -> None:
    a = amqp_address("amqps://user:s%40cret@rabbit.example:5999/tower%2Fvh")
    assert (a.tls, a.host, a.port, a.username, a.password, a.vhost) == (
        True, "rabbit.example", 5999, "user", "s@cret", "tower/vh")
    assert "cret" not in str(a) and "cret" not in repr(a)
    assert str(a) == "amqps://user@rabbit.example:5999/tower%2Fvh"  # as written, minus the password
    assert a.login == "\0user\0s@cret" and a.node == "rabbit.example:5999"
    assert amqp_address("amqps://h").port == 5671 and amqp_address("amqp://h").vhost == "/"


def test_a_list_keeps_each_nodes_own_credentials_and_order() -> None:
    b = brokers("amqp://a:pa@10.0.0.1:5672/%2F, amqp://b:pb@10.0.0.2/%2F,amqp://10.0.0.3:5673/tower")
    assert [(x.host, x.port, x.username, x.password, x.vhost) for x in b] == [
        ("10.0.0.1", 5672, "a", "pa", "/"), ("10.0.0.2", 5672, "b", "pb", "/"), ("10.0.0.3", 5673, "guest", "guest", "tower")]
    assert len(b) == 3 and not b.tls
    assert "pa" not in str(b) and "pb" not in str(b) and "pa" not in repr(b)
    assert [x.node for x in b] == ["10.0.0.1:5672", "10.0.0.2:5672", "10.0.0.3:5673"]


def test_shuffled_spreads_a_fleet_over_the_cluster() -> None:
    b = brokers(",".join(f"amqp://10.0.0.{i}" for i in range(1, 4)))
    firsts = {b.shuffled(random.Random(seed))[0].host for seed in range(50)}
    assert firsts == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert sorted(a.host for a in b.shuffled(random.Random(1))) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize("text, message", [
    ("amqp://h1,amqps://h2", "mixes amqp:// and amqps://"),
    ("amqp://h1,", "URL 2 of 2 is empty"),
    (",amqp://h1", "URL 1 of 2 is empty"),
    ("amqp://u:secret@h1,http://u:secret@h2", "URL 2 of 2 must be an amqp:// or amqps:// URL"),
    ("amqp://h1,amqp://u:secret@h2:99999", "URL 2 of 2 has an invalid port"),
    ("amqp://h1:5672,amqp://H1", "lists h1:5672"),
    ("amqp://:1", "has no host"),
])
def test_bad_lists_say_which_url_and_never_a_password(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        brokers(text)
    assert "secret" not in str(info.value)


def test_none_means_broker_less() -> None:
    assert brokers_or_none(" None ") is None
    assert len(brokers_or_none(DEFAULT_AMQP_URL)) == 1


def test_redact_url_shows_any_text_without_its_password() -> None:
    assert redact_url("amqp://guest:pw@h:5672/%2F") == "amqp://guest@h:5672/%2F"
    assert redact_url("amqp://u:pw@[::1]:x/") == "amqp://u@[::1]:x/"


def test_the_option_takes_a_list_and_picks_the_queue_type() -> None:
    several = config.load({"amqp_url": "amqp://h1,amqp://h2,amqp://h3"}, environ={})
    assert len(several.amqp_url) == 3 and several.queue_type == "quorum"
    assert config.load({"amqp_url": "amqp://h1"}, environ={}).queue_type == "classic"
    forced = config.load({"amqp_url": "amqp://h1,amqp://h2", "queue_type": "classic"}, environ={})
    assert forced.queue_type == "classic"
    with pytest.raises(config.ConfigError, match="^--amqp-url .*URL 2 of 2 .*mixes|^--amqp-url .*mixes"):
        config.load({"amqp_url": "amqp://h1,amqps://u:pw@h2"}, environ={})
    with pytest.raises(config.ConfigError, match="^--queue-type "):
        config.load({"queue_type": "stream"}, environ={})
