"""Who is on the other end of a websocket, and what it may join.

An authenticator is anything with ``authenticate(credentials) -> Deferred[User | None]``
(``None``: not authenticated, close 4401).  It raises :class:`AuthUnavailable` when
it cannot decide right now (close 1013, the UI retries).  An authorizer decides,
per groups message, which of the allowlisted groups the user may see
(:class:`Decision`).  This module holds the static-token authenticator used for
development and tests, the allow-all authorizer that goes with it, the
cross-site checks (Origin, xrftoken), and the options that point at the Tower
API (``--tower-url``, ``--object-paths``); ``towerws.tower`` asks the Tower API.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred, succeed


@dataclass(frozen=True)
class User:
    id: int
    username: str = ""
    is_superuser: bool = False


@dataclass(frozen=True)
class Credentials:
    """What a handshake carried.  ``repr`` hides every secret so it can be logged."""

    token: str | None = field(default=None, repr=False)
    authorization: str | None = field(default=None, repr=False)
    cookie: str | None = field(default=None, repr=False)

    @classmethod
    def from_request(cls, headers: Mapping[str, str], query: str | Mapping[str, list[str]]) -> "Credentials":
        """Credentials of a handshake: ``?token=T``, ``Authorization: Token|Bearer T``, cookies.

        ``headers`` has lower-case names (as Autobahn gives them).
        """
        params = parse_qs(query) if isinstance(query, str) else query
        token = (params.get("token") or [None])[0] or None
        authorization = headers.get("authorization") or None
        if token is None and authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() in ("token", "bearer") and value.strip():
                token = value.strip()
        return cls(token=token, authorization=authorization, cookie=headers.get("cookie") or None)

    @property
    def by_cookie(self) -> bool:
        """Only browser cookies identify this caller: its groups messages need the xrftoken.

        A token or ``Authorization`` header takes precedence over cookies (the
        Tower authenticator forwards exactly one of them), so a cross-site page
        that adds its own token can only ever act as that token's owner.
        """
        return self.token is None and self.authorization is None and self.cookie is not None

    @property
    def csrftoken(self) -> str | None:
        """The ``csrftoken`` cookie (Django's anti-CSRF value), if the handshake carried one."""
        for part in (self.cookie or "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == CSRF_COOKIE:
                return value.strip().strip('"') or None
        return None

    def xrftoken_matches(self, xrftoken: str | None) -> bool:
        """AWX's rule: a cookie connection proves it is same-site with ``"xrftoken"`` = csrftoken cookie."""
        if not self.by_cookie:
            return True
        expected = self.csrftoken
        if expected is None or xrftoken is None:
            return False
        return hmac.compare_digest(expected.encode("utf-8", "replace"), xrftoken.encode("utf-8", "replace"))


CSRF_COOKIE = "csrftoken"


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake's ``Origin`` may open a websocket.

    No Origin (a non-browser client): allowed.  With ``allowed`` empty, the
    Origin's host must equal the request's Host (ports ignored, as Django's
    ``AllowedHostsOriginValidator`` does); otherwise the Origin must be one of
    ``allowed`` (normalised by :func:`normalise_origin`).
    """
    if not origin:
        return True
    try:
        normalised = normalise_origin(origin)
    except ValueError:
        return False  # "null" (sandboxed frames, file:) and junk
    if allowed:
        return normalised in allowed
    return urlsplit(normalised).hostname == host.strip().strip("[]").lower()


def normalise_origin(text: str) -> str:
    """``scheme://host[:port]`` in lower case, default port dropped; ``ValueError`` otherwise."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or (
        parts.query or parts.fragment or parts.username is not None
    ):
        raise ValueError(f"{text!r} is not an origin like https://host[:port]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != {"http": 80, "https": 443}[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def allowed_origins(text: str) -> tuple[str, ...]:
    """The ``allowed_origins`` option: comma-separated origins (empty: same host only)."""
    return tuple(normalise_origin(item) for item in text.split(",") if item.strip())


class AuthUnavailable(Exception):
    """The authentication service could not answer; the client should retry later."""


class Authenticator(Protocol):
    def authenticate(self, credentials: Credentials) -> Deferred[User | None]: ...


@dataclass(frozen=True)
class Decision:
    """What an authorizer made of the (allowlisted) groups of one message."""

    allowed: frozenset[str]
    #: (key, item) refused by the source of truth: "access denied to channel KEY for resource id ID"
    denied: tuple[tuple[str, str], ...] = ()
    #: (key, item) that could not be checked: "authorization service unavailable for KEY ID"
    unavailable: tuple[tuple[str, str], ...] = ()


class Authorizer(Protocol):
    def authorize(self, user: User, credentials: Credentials, groups: frozenset[str]) -> Deferred[Decision]:
        """Split ``groups`` (already allowlisted) into allowed, denied and unavailable.  Never fails."""


class AllowAll:
    """Static-token mode: the allowlist is the only rule."""

    def authorize(self, user: User, credentials: Credentials, groups: frozenset[str]) -> Deferred[Decision]:
        return succeed(Decision(allowed=groups))


@dataclass(frozen=True)
class TokenFile:
    """A loaded static tokens file: ``{"<token>": {"id": 7, "username": ...} | 7}``."""

    path: str
    users: Mapping[str, User] = field(repr=False)

    @classmethod
    def load(cls, path: str) -> "TokenFile":
        try:
            with open(path, encoding="utf-8") as fp:
                raw = json.load(fp)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object of token -> user")
        users = {}
        for index, (token, entry) in enumerate(raw.items(), 1):
            # Errors name the entry by position, never by the token itself.
            if isinstance(entry, int) and not isinstance(entry, bool):
                entry = {"id": entry}
            if not token or not isinstance(entry, dict):
                raise ValueError(f"{path}: entry {index} must map a token to a user id or object")
            uid = entry.get("id")
            if not isinstance(uid, int) or isinstance(uid, bool) or uid <= 0:
                raise ValueError(f"{path}: entry {index} needs a positive integer \"id\"")
            users[token] = User(
                id=uid,
                username=str(entry.get("username", "")),
                is_superuser=bool(entry.get("is_superuser", False)),
            )
        return cls(path=path, users=users)


class StaticTokenAuthenticator:
    """Development authenticator: a fixed table of tokens."""

    def __init__(self, users: Mapping[str, User]):
        self._users = dict(users)

    def authenticate(self, credentials: Credentials) -> Deferred[User | None]:
        return succeed(self._users.get(credentials.token) if credentials.token else None)


class DenyAll:
    """Used when no authenticator is configured: nobody gets in, and the log says why."""

    def authenticate(self, credentials: Credentials) -> Deferred[User | None]:
        return succeed(None)


# -- the Tower API's part of the configuration (used by towerws.tower) ---------------

ID_PLACEHOLDER = "{id}"
DEFAULT_OBJECT_PATHS = (
    "job_events:/api/v2/jobs/{id}/ ad_hoc_command_events:/api/v2/ad_hoc_commands/{id}/ "
    "workflow_events:/api/v2/workflow_jobs/{id}/ project_update_events:/api/v2/project_updates/{id}/ "
    "inventory_update_events:/api/v2/inventory_updates/{id}/ system_job_events:/api/v2/system_jobs/{id}/"
)
_KEY = re.compile(r"[A-Za-z0-9_]+\Z")


def tower_url(text: str) -> str:
    """``https://tower.example.com`` (optionally with a path prefix); no credentials in it."""
    parts = urlsplit(text.strip())
    try:
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    return text.strip().rstrip("/")


@dataclass(frozen=True)
class ObjectPaths:
    """Group KEY -> API path of the object its id names, e.g. ``job_events`` -> ``/api/v2/jobs/{id}/``."""

    paths: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> "ObjectPaths":
        paths: dict[str, str] = {}
        for entry in text.split():
            key, sep, path = entry.partition(":")
            if not sep or not _KEY.match(key) or not path.startswith("/"):
                raise ValueError(f"entry {entry!r} must look like KEY:/api/path/{ID_PLACEHOLDER}/")
            rest = path.replace(ID_PLACEHOLDER, "", 1)
            if ID_PLACEHOLDER not in path or any(c in rest for c in "{}?#%"):
                raise ValueError(f"entry {entry!r}: the path must contain {ID_PLACEHOLDER} once and no query")
            if key in paths:
                raise ValueError(f"key {key!r} is listed twice")
            paths[key] = path
        return cls(paths)

    def __str__(self) -> str:
        return " ".join(f"{k}:{v}" for k, v in self.paths.items())

    def path(self, key: str, ident: str) -> str | None:
        template = self.paths.get(key)
        return None if template is None else template.replace(ID_PLACEHOLDER, ident)
