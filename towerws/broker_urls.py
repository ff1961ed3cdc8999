"""Broker URLs: ``amqp://`` / ``amqps://`` parsing, and showing them without their passwords.

One parser for every reader of a broker URL: the server's ``--amqp-url``, the
synchronous emitter and ``towerws-publish`` (:mod:`towerws.emit`), the Twisted
publisher.  A parsed :class:`AMQPAddress` keeps the password out of ``str()``
and ``repr()``; :func:`redact_url` shows any text (even an unparsable one)
without it.  Pure: no I/O, no AMQP client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

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
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{self.vhost}"

    @property
    def login(self) -> str:
        """The SASL PLAIN response: authorization id (empty), user name, password."""
        return f"\0{self.username}\0{self.password}"


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


def amqp_url_or_none(text: str) -> AMQPAddress | None:
    """``amqp_url``: a broker URL, or ``none`` for the single-node in-process bus."""
    if text.strip().lower() == "none":
        return None
    return amqp_address(text)


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
