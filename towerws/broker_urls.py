"""Broker URLs: ``amqp://`` / ``amqps://`` parsing, lists of cluster nodes, and showing them without passwords.

One parser for every reader of broker URLs: the server's ``--amqp-url``, the
synchronous emitter and ``towerws-publish`` (:mod:`towerws.emit`), the Twisted
publisher.  A value is one URL or a comma-separated list, one URL per node of a
RabbitMQ cluster (:class:`Brokers`); each may carry its own credentials, all use
the same scheme.  A parsed :class:`AMQPAddress` keeps the password out of
``str()`` and ``repr()``, and no error message ever quotes a URL;
:func:`redact_url` shows any text (even an unparsable one) without its password.
Pure: no I/O, no AMQP client.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


@dataclass(frozen=True)
class AMQPAddress:
    """A parsed ``amqp://`` / ``amqps://`` URL.  ``str()`` never shows the password."""

    url: str = field(repr=False)  # keeps the password: never shown
    tls: bool
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    vhost: str

    def __str__(self) -> str:
        # The URL as an operator writes it (vhost URL-encoded: "/" is %2F), minus the password.
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(self.username, safe='')}@{self.node}/{quote(self.vhost, safe='')}"

    @property
    def login(self) -> str:
        """The SASL PLAIN response: authorization id (empty), user name, password."""
        return f"\0{self.username}\0{self.password}"

    @property
    def node(self) -> str:
        """``host:port``: which broker node this is, for logs, /readyz and a metric label."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Brokers:
    """The broker URLs of one setting: one, or one per node of a cluster; never empty, one scheme."""

    addresses: tuple[AMQPAddress, ...]

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("has no URL")
        if len({a.tls for a in self.addresses}) > 1:
            raise ValueError("mixes amqp:// and amqps:// URLs: use one scheme for every broker")
        seen: set[tuple[str, int, str]] = set()
        for address in self.addresses:
            key = (address.host.lower(), address.port, address.vhost)
            if key in seen:
                raise ValueError(f"lists {address.node} vhost {address.vhost!r} twice")
            seen.add(key)

    @property
    def tls(self) -> bool:
        return self.addresses[0].tls

    def __len__(self) -> int:
        return len(self.addresses)

    def __iter__(self) -> Iterator[AMQPAddress]:
        return iter(self.addresses)

    def __str__(self) -> str:
        return ",".join(str(a) for a in self.addresses)

    def shuffled(self, rng: random.Random | None = None) -> list[AMQPAddress]:
        """The addresses in random order: a fleet of clients spreads over the cluster (as kombu does)."""
        order = list(self.addresses)
        (rng or random).shuffle(order)
        return order


def amqp_address(text: str) -> AMQPAddress:
    """Parse one broker URL; ``ValueError`` (never showing the password) if it is not one."""
    parts = urlsplit(text)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError("must be an amqp:// or amqps:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if not parts.hostname:
        raise ValueError("has no host")
    # An empty path means the default vhost "/", as in other AMQP clients.
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return AMQPAddress(
        url=text,
        tls=parts.scheme == "amqps",
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        vhost=vhost,
    )


def brokers(text: str) -> Brokers:
    """Parse one URL or a comma-separated list of them (``%2C`` for a comma inside a password)."""
    parts = [part.strip() for part in text.split(",")]
    addresses = []
    for number, part in enumerate(parts, 1):
        where = f"URL {number} of {len(parts)} " if len(parts) > 1 else ""
        if not part:
            raise ValueError(f"{where}is empty")
        try:
            addresses.append(amqp_address(part))
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
    return Brokers(tuple(addresses))


def brokers_or_none(text: str) -> Brokers | None:
    """``amqp_url``: broker URL(s), or ``none`` for the single-node in-process bus."""
    if text.strip().lower() == "none":
        return None
    return brokers(text)


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs (the path as typed)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable AMQP URL>"
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:  # not a number: show it as typed, it is no secret
        port = parts.netloc.rpartition(":")[2]
    if port is not None:
        netloc += f":{port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def url_password(url: str) -> str:
    """The password in ``url`` (to scrub it from a library's error text), or ``""``."""
    try:
        return unquote(urlsplit(url).password or "")
    except ValueError:
        return ""
