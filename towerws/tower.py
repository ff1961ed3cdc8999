"""The Tower API as the source of truth: who a caller is, and which objects they may see.

towerws has no database.  With ``--tower-url`` every handshake is authenticated
by ``GET /api/v2/me/`` carrying the caller's own credentials (one of: the
``Authorization`` header, ``?token=`` as ``Authorization: Bearer``, the
``Cookie`` header), and every id-keyed group (``job_events-42``) is authorized
by ``GET`` of the object's API path (``/api/v2/jobs/42/``) with the same
credentials.

* :class:`TowerAPI` -- a pooled ``treq`` client with a timeout, TLS verification
  (optionally against a private CA) and no cookie jar; API unreachable, timing
  out or answering 5xx raises :class:`~towerws.auth.AuthUnavailable`.
* :class:`TTLCache` -- answers kept for a while; concurrent asks for one key share
  one API request.
* :class:`TowerAuthenticator` / :class:`TowerAuthorizer` -- the two seams of
  ``towerws.auth`` implemented on top of them.

Nothing secret is logged, and caches are keyed by a SHA-256 digest of the
credentials, never the credentials themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar
from typing import Any, Generic, TypeVar


import treq
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from towerws import pem
from towerws.auth import AuthUnavailable, Credentials, Decision, ObjectPaths, User
from towerws.messages import split_group
from towerws.metrics import Metrics

ME_PATH = "/api/v2/me/"
#: statuses that answer the question; any other is "unavailable"
ME_ANSWERS = frozenset({200, 401, 403})
OBJECT_ANSWERS = frozenset({200, 401, 403, 404})
#: API requests in flight at once; one groups message may ask about many objects.
MAX_CONCURRENT_REQUESTS = 32
#: bound on each cache, whatever the number of distinct callers
MAX_CACHE_ENTRIES = 100_000
MAX_TOKEN_LENGTH = 4096

log = Logger(namespace="towerws.tower")

# -- credentials --------------------------------------------------------------------


def forwarded_headers(credentials: Credentials) -> dict[str, str] | None:
    """The one credential header sent to the API on the caller's behalf (``None``: nothing to send).

    A token or ``Authorization`` header wins over cookies, matching
    :attr:`Credentials.by_cookie`: the xrftoken rule applies exactly when the
    cookie is what identified the caller.
    """
    if credentials.authorization:
        return {"Authorization": credentials.authorization}
    if credentials.token:
        token = credentials.token
        # A query value is URL-decoded: keep anything that is not a plain token out of headers.
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
            return None
        return {"Authorization": f"Bearer {token}"}
    if credentials.cookie:
        return {"Cookie": credentials.cookie}
    return None


def credential_key(headers: Mapping[str, str]) -> str:
    """A cache key for credentials that keeps no usable secret."""
    material = "\n".join(f"{name}: {value}" for name, value in sorted(headers.items()))
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def parse_me(body: bytes) -> User | None:
    """The user of a ``/api/v2/me/`` answer: ``results[0]`` of a list, or the object itself.

    ``None`` for an empty list; ``ValueError`` for anything else unexpected.
    """
    data = json.loads(body.decode("utf-8"))
    if isinstance(data, dict) and "results" in data:
        results = data["results"]
        if not isinstance(results, list):
            raise ValueError('"results" is not a list')
        if not results:
            return None
        data = results[0]
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    uid, username, superuser = data.get("id"), data.get("username", ""), data.get("is_superuser", False)
    if not isinstance(uid, int) or isinstance(uid, bool) or uid <= 0:
        raise ValueError('the user has no positive integer "id"')
    if not isinstance(username, str) or not isinstance(superuser, bool):
        raise ValueError('"username" or "is_superuser" has the wrong type')
    return User(id=uid, username=username, is_superuser=superuser)


# -- the cache ----------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Answers kept for ``ttl(answer)`` seconds; one computation per key in flight.

    Failures are handed to every waiter and never cached.  The oldest entries
    go first once there are ``max_entries``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: Callable[[V], float],
        max_entries: int = MAX_CACHE_ENTRIES,
        on_hit: Callable[[], object] = lambda: None,
    ):
        self._clock = clock
        self._on_hit = on_hit  # answered without a new computation (cached or shared)
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, list[Deferred[V]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiting(self) -> int:
        """Callers currently waiting for an answer in flight."""
        return sum(len(waiters) for waiters in self._inflight.values())

    def get(self, key: K, compute: Callable[[], Deferred[V]]) -> Deferred[V]:
        entry = self._entries.get(key)
        if entry is not None:
            expires, value = entry
            if self._clock.seconds() < expires:
                self._on_hit()
                return succeed(value)
            del self._entries[key]
        waiter: Deferred[V] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is None:
            self._inflight[key] = waiters = [waiter]
            maybeDeferred(compute).addBoth(self._settle, key)
        else:
            self._on_hit()
            waiters.append(waiter)
        return waiter

    def _settle(self, result: V | Failure, key: K) -> None:
        waiters = self._inflight.pop(key)
        if not isinstance(result, Failure):
            ttl = self._ttl(result)
            if ttl > 0:
                self._entries[key] = (self._clock.seconds() + ttl, result)
                while len(self._entries) > self._max:
                    del self._entries[next(iter(self._entries))]
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


# -- the HTTP client -------------------------------------------------------------------


class _NoCookies(CookieJar):
    """treq keeps cookies an answer sets and sends them with later requests: here those
    would be other users' requests, so this jar never stores anything."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@dataclass(frozen=True)
class Answer:
    code: int
    body: bytes


class TowerAPI(Service):
    """GET requests to the Tower API with a caller's credentials; a service so its pool closes on stop."""

    def __init__(
        self, base_url: str, timeout: float, reactor: Any, ca_file: str | None = None, metrics: Metrics | None = None
    ):
        self.base_url = base_url
        self.metrics = metrics
        self.timeout = timeout
        self._clock: IReactorTime = reactor
        trust_root = pem.trust_root(ca_file)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_CONCURRENT_REQUESTS
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trust_root), connectTimeout=timeout, pool=self._pool)
        self._http = HTTPClient(agent, cookiejar=_NoCookies())
        self._slots = DeferredSemaphore(MAX_CONCURRENT_REQUESTS)
        # Outages are logged when they start and end, not once per request.
        self._failures = 0

    def get(self, path: str, headers: Mapping[str, str], expected: frozenset[int]) -> Deferred[Answer]:
        """The answer to ``GET path`` if its status is one of ``expected``.

        Anything else -- network errors, timeouts, 5xx, redirects (the API never
        redirects its own paths: a wrong URL), 429 -- fails with :class:`AuthUnavailable`.
        """
        return self._slots.run(self._get, path, headers, expected)

    def _get(self, path: str, headers: Mapping[str, str], expected: frozenset[int]) -> Deferred[Answer]:
        d = Deferred.fromCoroutine(self._request(path, headers, expected))
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._available, self._unavailable, errbackArgs=(path,))
        return d

    async def _request(self, path: str, headers: Mapping[str, str], expected: frozenset[int]) -> Answer:
        response = await self._http.get(
            self.base_url + path,
            headers={"Accept": "application/json", **headers},
            allow_redirects=False,
        )
        body = await treq.content(response)
        if response.code not in expected:
            raise AuthUnavailable(f"answered HTTP {response.code}")
        return Answer(response.code, body)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_requests.labels(outcome).inc()

    def _available(self, answer: Answer) -> Answer:
        self._count("ok" if answer.code == 200 else "unauthenticated")
        if self._failures:
            log.info("tower API {url} answers again ({failures} requests failed)", url=self.base_url,
                     failures=self._failures)
            self._failures = 0
        return answer

    def _unavailable(self, failure: Failure, path: str) -> None:
        timed_out = failure.check(DeferredTimeout) is not None
        self._count("timeout" if timed_out else "error")
        reason = "timed out" if timed_out else failure.getErrorMessage() or failure.type.__name__
        self.failed(path, reason)
        raise AuthUnavailable(f"tower API unavailable: {reason}")

    def failed(self, path: str, reason: str) -> None:
        """Count a failed request; the first of an outage is logged (path and error, never a header)."""
        if not self._failures:
            log.warn("tower API {url}{path} unavailable: {reason}", url=self.base_url, path=path, reason=reason)
        self._failures += 1

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()


# -- authentication and authorization ----------------------------------------------------


class TowerAuthenticator:
    """``GET /api/v2/me/`` with the caller's credentials: 200 -> the user, 401/403 -> not authenticated."""

    def __init__(
        self,
        api: TowerAPI,
        clock: IReactorTime,
        ttl: float,
        negative_ttl: float,
        on_cache_hit: Callable[[], object] = lambda: None,
    ):
        self.api = api
        self.cache: TTLCache[str, User | None] = TTLCache(
            clock, lambda u: ttl if u is not None else negative_ttl, on_hit=on_cache_hit
        )

    def authenticate(self, credentials: Credentials) -> Deferred[User | None]:
        headers = forwarded_headers(credentials)
        if headers is None:
            return succeed(None)
        return self.cache.get(credential_key(headers), lambda: Deferred.fromCoroutine(self._ask(headers)))

    async def _ask(self, headers: Mapping[str, str]) -> User | None:
        answer = await self.api.get(ME_PATH, headers, ME_ANSWERS)
        if answer.code != 200:
            return None
        try:
            return parse_me(answer.body)
        except ValueError as exc:  # includes invalid JSON and UTF-8
            self.api.failed(ME_PATH, f"unexpected answer: {str(exc)[:200]}")
            raise AuthUnavailable("unexpected answer") from None


class TowerAuthorizer:
    """Each id-keyed group is checked with ``GET`` of its object: 200 allowed; 401/403/404 denied."""

    def __init__(self, api: TowerAPI, paths: ObjectPaths, clock: IReactorTime, ttl: float, negative_ttl: float):
        self.api = api
        self.paths = paths
        self.cache: TTLCache[tuple[int, str], bool] = TTLCache(clock, lambda ok: ttl if ok else negative_ttl)

    def authorize(self, user: User, credentials: Credentials, groups: frozenset[str]) -> Deferred[Decision]:
        return Deferred.fromCoroutine(self._authorize(user, credentials, groups))

    async def _authorize(self, user: User, credentials: Credentials, groups: frozenset[str]) -> Decision:
        headers = forwarded_headers(credentials)
        allowed: set[str] = set()
        checked: list[tuple[str, str, str]] = []
        checks: list[Deferred[bool]] = []
        for group in sorted(groups):
            key, ident = split_group(group) or (group, "")
            path = self.paths.path(key, ident)
            if path is None:
                allowed.add(group)  # not an object group: the allowlist decided
                continue
            checked.append((group, key, ident))
            checks.append(self._check(user, headers, path))
        denied, unavailable = [], []
        # All checks of the message run at once; DeferredList waits for every one.
        results = await DeferredList(checks, consumeErrors=True)
        for (group, key, ident), (ok, result) in zip(checked, results):
            if ok and result:
                allowed.add(group)
            elif ok:
                denied.append((key, ident))
            else:
                if not result.check(AuthUnavailable):
                    log.failure("authorization check of {group} failed", result, group=group)
                unavailable.append((key, ident))
        return Decision(frozenset(allowed), tuple(denied), tuple(unavailable))

    def _check(self, user: User, headers: Mapping[str, str] | None, path: str) -> Deferred[bool]:
        if headers is None:  # cannot happen for an authenticated caller; deny rather than ask
            return succeed(False)
        return self.cache.get((user.id, path), lambda: Deferred.fromCoroutine(self._ask(headers, path)))

    async def _ask(self, headers: Mapping[str, str], path: str) -> bool:
        answer = await self.api.get(path, headers, OBJECT_ANSWERS)
        return answer.code == 200
