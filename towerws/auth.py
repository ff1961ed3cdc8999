"""Who is on the other end of a websocket: credentials, users, authenticators.

An authenticator is anything with ``authenticate(credentials) -> Deferred[User | None]``
(``None``: not authenticated, close 4401).  It raises :class:`AuthUnavailable` when
it cannot decide right now (close 1013, the UI retries).  This module holds the
static-token authenticator used for development and tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs

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


class AuthUnavailable(Exception):
    """The authentication service could not answer; the client should retry later."""


class Authenticator(Protocol):
    def authenticate(self, credentials: Credentials) -> Deferred[User | None]: ...


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
