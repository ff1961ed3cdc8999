"""Units of the Tower API client (towerws.tower), without the network: cache on a Clock, the authenticator,
forwarded credentials, parsing, the Tower options. Credentials and origins themselves: test_auth.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from test_twistd import run_twistd
from towerws import config
from towerws.auth import DEFAULT_OBJECT_PATHS, AuthUnavailable, Credentials, User
from towerws.tower import Answer, TowerAuthenticator, TTLCache, credential_key, forwarded_headers, parse_me


def result(d: Deferred) -> object:
    """The result of an already-fired Deferred (the failure's exception if it failed)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0].value if isinstance(out[0], Failure) else out[0]


# -- the cache ----------------------------------------------------------------------------------------------


def cache(clock: Clock, max_entries: int = 100) -> TTLCache:
    return TTLCache(clock, lambda v: 30.0 if v else 5.0, max_entries=max_entries)


def test_cache_keeps_positive_answers_for_their_ttl() -> None:
    clock, calls = Clock(), []
    c = cache(clock)
    ask = lambda: calls.append(1) or succeed("yes")  # noqa: E731
    assert result(c.get("k", ask)) == "yes"
    clock.advance(29.9)
    assert result(c.get("k", ask)) == "yes" and len(calls) == 1
    clock.advance(0.2)
    assert result(c.get("k", ask)) == "yes" and len(calls) == 2


def test_cache_keeps_negative_answers_briefly() -> None:
    clock, calls = Clock(), []
    c = cache(clock)
    ask = lambda: calls.append(1) or succeed(None)  # noqa: E731
    c.get("k", ask)
    clock.advance(4.9)
    c.get("k", ask)
    assert len(calls) == 1
    clock.advance(0.2)
    c.get("k", ask)
    assert len(calls) == 2


def test_cache_shares_one_computation_between_concurrent_callers() -> None:
    c = cache(Clock())
    pending: Deferred = Deferred()
    calls = []
    waiters = [c.get("k", lambda: calls.append(1) or pending) for _ in range(3)]
    assert c.waiting == 3 and len(calls) == 1
    pending.callback("yes")
    assert [result(w) for w in waiters] == ["yes"] * 3
    assert c.waiting == 0


def test_cache_never_keeps_failures_but_hands_them_to_every_waiter() -> None:
    c = cache(Clock())
    pending: Deferred = Deferred()
    waiters = [c.get("k", lambda: pending) for _ in range(2)]
    pending.errback(AuthUnavailable("down"))
    assert all(isinstance(result(w), AuthUnavailable) for w in waiters)
    assert len(c) == 0
    assert result(c.get("k", lambda: succeed("up"))) == "up"


def test_cache_ttl_zero_keeps_nothing() -> None:
    c = TTLCache(Clock(), lambda v: 0)
    c.get("k", lambda: succeed(1))
    assert len(c) == 0


def test_cache_is_bounded_oldest_first() -> None:
    c = cache(Clock(), max_entries=3)
    for key in "abcd":
        c.get(key, lambda: succeed(True))
    assert len(c) == 3
    calls = []
    c.get("a", lambda: calls.append(1) or succeed(True))  # evicted: asked again
    c.get("d", lambda: calls.append(2) or succeed(True))  # still there
    assert calls == [1]


class StubAPI:
    """Answers like the API would, counting requests (the network is tested end to end elsewhere)."""

    def __init__(self, answer: Answer | Exception):
        self.answer = answer
        self.seen: list[tuple[str, dict]] = []

    def get(self, path: str, headers: dict, expected: frozenset[int]) -> Deferred[Answer]:
        self.seen.append((path, dict(headers)))
        return fail(self.answer) if isinstance(self.answer, Exception) else succeed(self.answer)

    def failed(self, path: str, reason: str) -> None:
        pass


ME = json.dumps({"count": 1, "results": [{"id": 7, "username": "alice", "is_superuser": False}]}).encode()


def test_authenticator_keys_its_cache_without_the_secret() -> None:
    api = StubAPI(Answer(200, ME))
    auth = TowerAuthenticator(api, Clock(), 30, 5)
    user = result(auth.authenticate(Credentials(token="s3cret-token-value")))
    assert user == User(7, "alice", False)
    assert api.seen == [("/api/v2/me/", {"Authorization": "Bearer s3cret-token-value"})]
    # The cache is keyed by the credential's digest: asking with it finds the user without a request.
    key = credential_key({"Authorization": "Bearer s3cret-token-value"})
    assert len(auth.cache) == 1 and result(auth.cache.get(key, lambda: fail(AssertionError("asked again")))) == user


@pytest.mark.parametrize("answer,expected", [
    (Answer(401, b"{}"), None), (Answer(403, b"{}"), None),
    (Answer(200, b"not json"), AuthUnavailable), (Answer(200, b'{"results": [{"id": "7"}]}'), AuthUnavailable),
    (Answer(200, b'{"results": []}'), None), (AuthUnavailable("down"), AuthUnavailable),
])
def test_authenticator_answers(answer, expected) -> None:
    got = result(TowerAuthenticator(StubAPI(answer), Clock(), 30, 5).authenticate(Credentials(token="t")))
    if expected is AuthUnavailable:
        assert isinstance(got, AuthUnavailable)
    else:
        assert got == expected


# -- credentials -------------------------------------------------------------------------------------------------


def test_forwarded_headers_pick_exactly_one_credential() -> None:
    both = Credentials.from_request({"cookie": "sessionid=s; csrftoken=c", "authorization": "Token t"}, "")
    assert forwarded_headers(both) == {"Authorization": "Token t"} and not both.by_cookie
    query = Credentials.from_request({"cookie": "sessionid=s"}, "token=q")
    assert forwarded_headers(query) == {"Authorization": "Bearer q"} and not query.by_cookie
    cookie = Credentials.from_request({"cookie": "sessionid=s; csrftoken=c"}, "")
    assert forwarded_headers(cookie) == {"Cookie": "sessionid=s; csrftoken=c"} and cookie.by_cookie
    assert forwarded_headers(Credentials()) is None


@pytest.mark.parametrize("token", ["a\r\nX-Injected: 1", "a b", "é", "x" * 5000, "\x00"])
def test_query_tokens_that_are_no_tokens_are_not_forwarded(token: str) -> None:
    assert forwarded_headers(Credentials(token=token)) is None


def test_credential_key_is_a_digest() -> None:
    key = credential_key({"Cookie": "sessionid=very-secret"})
    assert "secret" not in key and key == credential_key({"Cookie": "sessionid=very-secret"})
    assert len(key) == 64 and int(key, 16) >= 0  # a hex digest
    assert key != credential_key({"Authorization": "sessionid=very-secret"})


# -- /api/v2/me/ ------------------------------------------------------------------------------------------------------


def test_parse_me_list_and_object_forms() -> None:
    me = {"id": 3, "username": "u", "is_superuser": True, "extra": 1}
    assert parse_me(json.dumps({"count": 1, "results": [me]}).encode()) == User(3, "u", True)
    assert parse_me(json.dumps(me).encode()) == User(3, "u", True)
    assert parse_me(b'{"count": 0, "results": []}') is None


@pytest.mark.parametrize("body", [b"[]", b'{"results": {}}', b'{"id": true}', b'{"id": 0}', b'{"id": 1, "username": 5}',
                                  b"\xff", b"{", b'{"results": [7]}'])
def test_parse_me_rejects_malformed(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_me(body)


# -- options -----------------------------------------------------------------------------------------------------------


def test_every_id_group_needs_a_path_with_tower_url() -> None:
    cli = {"tower_url": "https://t", "groups": "jobs:summary job_events:<id> host_events:<id>"}
    with pytest.raises(config.ConfigError, match="^--object-paths: .*host_events") as info:
        config.load(cli, environ={})
    assert "\n" not in str(info.value)
    # Without --tower-url there is nothing to check against.
    config.load({"groups": cli["groups"]}, environ={})
    # With a path for it, fine.
    config.load({**cli, "object_paths": DEFAULT_OBJECT_PATHS + " host_events:/api/v2/hosts/{id}/"}, environ={})


def test_tower_timeout_must_fit_in_the_handshake() -> None:
    with pytest.raises(config.ConfigError, match="^--tower-timeout"):
        config.load({"tower_url": "https://t", "tower_timeout": "10", "open_handshake_timeout": "10"}, environ={})


def test_ca_file_is_checked_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    for path in (str(bad), str(tmp_path / "missing.pem")):
        with pytest.raises(config.ConfigError, match=f"^--tower-ca-file .*{path}"):
            config.load({"tower_ca_file": path}, environ={})


@pytest.mark.parametrize("args,expected", [
    (["--tower-url", "https://t", "--groups", "jobs:summary host_events:<id>"], "--object-paths"),
    (["--tower-url", "tower"], "--tower-url"),
    (["--allowed-origins", "evil"], "--allowed-origins"),
    (["--max-groups-messages-per-second", "0"], "--max-groups-messages-per-second"),
])
def test_twistd_refuses_bad_tower_options_in_one_line(args: list[str], expected: str) -> None:
    result = run_twistd(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr

