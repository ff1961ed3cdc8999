"""towerws.auth: credentials of a handshake, the xrftoken and Origin rules, static tokens, and the
options that point at the Tower API. Pure: no network, no reactor (the Tower API client: test_tower_units.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from towerws import config
from towerws.auth import (
    DEFAULT_OBJECT_PATHS,
    AllowAll,
    Credentials,
    Decision,
    DenyAll,
    ObjectPaths,
    StaticTokenAuthenticator,
    TokenFile,
    User,
    allowed_origins,
    normalise_origin,
    origin_allowed,
    tower_url,
)


def result(d: Deferred) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


# -- credentials ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, query, token", [
    ({}, "token=q", "q"),
    ({}, {"token": ["q"]}, "q"),  # Autobahn's parsed params
    ({"authorization": "Token t"}, "", "t"),
    ({"authorization": "bearer  t "}, "", "t"),
    ({"authorization": "Token t"}, "token=q", "q"),  # the query's token first
    ({"authorization": "Basic dTpw"}, "", None),  # not a token scheme
    ({"authorization": "Token "}, "", None),
    ({}, "token=", None),
    ({"cookie": "sessionid=s"}, "", None),
])
def test_credentials_from_a_handshake(headers: dict, query: Any, token: str | None) -> None:
    credentials = Credentials.from_request(headers, query)
    assert credentials.token == token
    assert credentials.authorization == (headers.get("authorization") or None)
    assert credentials.cookie == (headers.get("cookie") or None)


def test_only_cookies_make_a_cookie_connection() -> None:
    assert Credentials(cookie="sessionid=s").by_cookie
    assert not Credentials(cookie="sessionid=s", token="t").by_cookie
    assert not Credentials(cookie="sessionid=s", authorization="Basic x").by_cookie
    assert not Credentials().by_cookie


@pytest.mark.parametrize("cookie, csrftoken", [
    ("sessionid=s; csrftoken=abc", "abc"), ('csrftoken="abc"', "abc"), ("csrftoken=", None),
    ("xcsrftoken=abc", None), (None, None), ("csrftoken", None),
])
def test_csrftoken_cookie(cookie: str | None, csrftoken: str | None) -> None:
    assert Credentials(cookie=cookie).csrftoken == csrftoken


@pytest.mark.parametrize("cookie,xrftoken,ok", [
    ("sessionid=s; csrftoken=abc", "abc", True),
    ('sessionid=s; csrftoken="abc"', "abc", True),
    ("csrftoken=abc;sessionid=s", "abc", True),
    ("sessionid=s; csrftoken=abc", "abd", False),
    ("sessionid=s; csrftoken=abc", None, False),
    ("sessionid=s; xcsrftoken=abc", "abc", False),
    ("sessionid=s; csrftoken=", "", False),
    ("sessionid=s", "abc", False),
])
def test_xrftoken_rule(cookie: str, xrftoken, ok: bool) -> None:
    assert Credentials(cookie=cookie).xrftoken_matches(xrftoken) is ok
    # Token connections need none.
    assert Credentials(cookie=cookie, token="t").xrftoken_matches(None) is True


def test_credentials_repr_hides_secrets() -> None:
    text = repr(Credentials(token="tok-x", authorization="Bearer tok-x", cookie="sessionid=sess-x"))
    assert "tok-x" not in text and "sess-x" not in text


# -- origins --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin,host,allowed,ok", [
    ("", "h", (), True),
    ("https://tower.example.com", "tower.example.com", (), True),
    ("https://Tower.Example.com:8443", "tower.example.com", (), True),
    ("https://evil.example", "tower.example.com", (), False),
    ("https://tower.example.com.evil.example", "tower.example.com", (), False),
    ("null", "tower.example.com", (), False),
    ("http://[::1]:8080", "[::1]", (), True),
    ("https://ui.example", "tower.example.com", ("https://ui.example",), True),
    ("https://tower.example.com", "tower.example.com", ("https://ui.example",), False),
    ("http://ui.example", "x", ("https://ui.example",), False),
])
def test_origin_allowed(origin: str, host: str, allowed: tuple, ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def test_origin_normalisation() -> None:
    assert normalise_origin("HTTPS://UI.Example:443/") == "https://ui.example"
    assert normalise_origin("http://ui.example:8080") == "http://ui.example:8080"
    assert allowed_origins(" https://a.example , http://b.example:81,") == ("https://a.example", "http://b.example:81")
    for bad in ("ui.example", "ftp://x", "https://x/path", "https://u:p@x", "https://x:99999"):
        with pytest.raises(ValueError):
            normalise_origin(bad)


# -- static tokens ---------------------------------------------------------------------------------------------


def tokens(tmp_path: Path, content: Any) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_token_file_loads_objects_and_bare_ids(tmp_path: Path) -> None:
    path = tokens(tmp_path, {"tok-a": {"id": 1, "username": "admin", "is_superuser": True}, "tok-b": 8})
    loaded = TokenFile.load(path)
    assert loaded.users == {"tok-a": User(1, "admin", True), "tok-b": User(8)}
    assert "tok-a" not in repr(loaded)  # the tokens are never shown


@pytest.mark.parametrize("content, error", [
    ("{", "is not valid JSON"),
    ([["tok-secret", 1]], "must hold a JSON object of token -> user"),
    ({"tok-secret": True}, "entry 1 must map a token to a user id or object"),
    ({"ok": 1, "tok-secret": "7"}, "entry 2 must map a token to a user id or object"),
    ({"tok-secret": {"id": 0}}, 'entry 1 needs a positive integer "id"'),
    ({"tok-secret": {"id": "7"}}, 'entry 1 needs a positive integer "id"'),
    ({"tok-secret": {"id": True}}, 'entry 1 needs a positive integer "id"'),
    ({"tok-secret": {"username": "x"}}, 'entry 1 needs a positive integer "id"'),
    ({"": 1}, "entry 1 must map a token"),
])
def test_token_file_errors_name_the_file_and_entry_never_the_token(tmp_path: Path, content: Any, error: str) -> None:
    path = tokens(tmp_path, content)
    with pytest.raises(ValueError) as info:
        TokenFile.load(path)
    assert path in str(info.value) and error in str(info.value)
    assert "tok-secret" not in str(info.value)


def test_a_missing_token_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=f"^cannot read {path}: No such file or directory$"):
        TokenFile.load(path)


def test_static_tokens_deny_all_allow_all() -> None:
    auth = StaticTokenAuthenticator({"t": User(7, "alice")})
    assert result(auth.authenticate(Credentials(token="t"))) == User(7, "alice")
    assert result(auth.authenticate(Credentials(token="other"))) is None
    assert result(auth.authenticate(Credentials(cookie="sessionid=t"))) is None  # a token or nothing
    assert result(DenyAll().authenticate(Credentials(token="t"))) is None
    groups = frozenset({"jobs-summary", "job_events-1"})
    assert result(AllowAll().authorize(User(7), Credentials(token="t"), groups)) == Decision(allowed=groups)


# -- the Tower API's options ------------------------------------------------------------------------------------------


def test_object_paths_default_covers_every_default_id_group() -> None:
    s = config.load({"tower_url": "https://tower.example.com/"}, environ={})
    assert s.tower_url == "https://tower.example.com"
    assert s.object_paths.path("job_events", "42") == "/api/v2/jobs/42/"
    assert s.object_paths.paths.keys() == s.groups.id_keys
    assert ObjectPaths.parse(str(s.object_paths)) == ObjectPaths.parse(DEFAULT_OBJECT_PATHS)


@pytest.mark.parametrize("text", ["job_events", "job_events:/api/v2/jobs/", "job_events:api/{id}/", "a-b:/x/{id}/",
                                  "k:/x/{id}/{id}/", "k:/x/{id}/?a=1", "k:/x/{id}/ k:/y/{id}/", "k:/x/{ide}/"])
def test_object_paths_reject_bad_entries(text: str) -> None:
    with pytest.raises(ValueError):
        ObjectPaths.parse(text)


@pytest.mark.parametrize("text", ["tower.example.com", "ftp://x", "https://u:p@x", "https://x?a=1", "https://x:bad"])
def test_tower_url_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        tower_url(text)


def test_object_paths_lookup_and_text() -> None:
    paths = ObjectPaths.parse("job_events:/api/v2/jobs/{id}/ host_events:/api/v2/hosts/{id}/events/")
    assert paths.path("host_events", "5") == "/api/v2/hosts/5/events/"
    assert paths.path("unknown", "5") is None
    assert str(paths) == "job_events:/api/v2/jobs/{id}/ host_events:/api/v2/hosts/{id}/events/"
    assert ObjectPaths.parse("") == ObjectPaths({})


def test_tower_url_keeps_a_path_prefix() -> None:
    assert tower_url(" https://tower.example.com/awx/ ") == "https://tower.example.com/awx"
    assert tower_url("http://10.0.0.1:8013") == "http://10.0.0.1:8013"
