"""A fake Tower API for the tests: a real ``twisted.web`` server on loopback.

It answers ``/api/v2/me/`` and object paths (``/api/v2/jobs/42/``) from a
fixture of users and permissions, records every request (path and headers),
and can be made slow, held (answers wait until released), failing (any status)
or served over TLS with its own CA.  Only the Tower API is faked: towerws, the
broker and the websocket clients in these tests are the real ones.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from conftest import TIMEOUT

#: group key -> the API collection its ids live in (the default --object-paths)
KINDS = {
    "job_events": "jobs",
    "ad_hoc_command_events": "ad_hoc_commands",
    "workflow_events": "workflow_jobs",
    "project_update_events": "project_updates",
    "inventory_update_events": "inventory_updates",
    "system_job_events": "system_jobs",
}


@dataclass(frozen=True)
class FakeUser:
    id: int
    username: str
    is_superuser: bool = False
    session: str | None = None  # sessionid cookie value
    csrftoken: str | None = None
    token: str | None = None  # OAuth2 / personal access token


ALICE = FakeUser(7, "alice", session="sess-alice-0123456789", csrftoken="csrf-alice-abcdef", token="tok-alice-secret")
BOB = FakeUser(8, "bob", session="sess-bob-0123456789", csrftoken="csrf-bob-abcdef", token="tok-bob-secret")
ADMIN = FakeUser(1, "admin", is_superuser=True, token="tok-admin-secret")
USERS = (ALICE, BOB, ADMIN)


def object_path(key: str, ident: int | str) -> str:
    return f"/api/v2/{KINDS[key]}/{ident}/"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass(eq=False)
class FakeTower(Resource):
    """The API.  ``objects`` maps an object path to the ids of users who may see it."""

    users: tuple[FakeUser, ...] = USERS
    objects: dict[str, set[int]] = field(default_factory=dict)
    #: decides for any object path of a known kind instead of ``objects``: rule(user id, path)
    rule: Callable[[int, str], bool] | None = None
    requests: list[Seen] = field(default_factory=list)
    #: answer every request with this status instead (500, 502, 429, ...)
    force_status: int | None = None
    #: seconds before answering
    delay: float = 0.0
    #: answer /api/v2/me/ with the bare object instead of the list form
    me_as_object: bool = False
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)
        self._held: list[Callable[[], None]] | None = None
        self._watchers: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self._port: Any = None
        self.url = ""

    # -- running -------------------------------------------------------------------

    def start(self, tls: "TLSFiles | None" = None) -> "FakeTower":
        site = Site(self)
        if tls is None:
            self._port = reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            self._port = reactor.listenSSL(0, site, tls.server_options(), interface="127.0.0.1")
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._port.getHost().port}"
        return self

    def stop(self) -> Deferred[None]:
        self.release()
        return self._port.stopListening()

    # -- control ---------------------------------------------------------------------

    def hold(self) -> None:
        """Keep answers back until :meth:`release` (requests are still recorded)."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for answer in held:
            answer()

    def paths(self) -> list[str]:
        return [seen.path for seen in self.requests]

    def count(self, path: str) -> int:
        return sum(1 for seen in self.requests if seen.path == path)

    async def until(self, condition: Callable[["FakeTower"], bool], timeout: float = TIMEOUT) -> None:
        """Wait (bounded) until ``condition(self)`` holds; checked on every request."""
        if condition(self):
            return
        d: Deferred[None] = Deferred()
        self._watchers.append((lambda: condition(self), d))
        await asyncio.wait_for(d.asFuture(asyncio.get_running_loop()), timeout)

    # -- the API -------------------------------------------------------------------------

    def render_GET(self, request: Request) -> Any:
        path = request.path.decode()
        headers = {k.decode().lower(): b",".join(v).decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append(Seen(path, headers))
        for watcher in list(self._watchers):
            if watcher[0]():
                self._watchers.remove(watcher)
                watcher[1].callback(None)
        finished = [False]
        request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))

        def answer() -> None:
            if finished[0]:
                return  # the client gave up (timeout)
            code, body = self._answer(path, headers)
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            # A real Tower sets cookies too; towerws must never send them on with other requests.
            request.addCookie(b"csrftoken", b"set-by-the-api", path=b"/")
            request.write(json.dumps(body).encode())
            request.finish()

        if self._held is not None:
            self._held.append(answer)
        elif self.delay:
            reactor.callLater(self.delay, answer)
        else:
            answer()
        return NOT_DONE_YET

    def _caller(self, headers: dict[str, str]) -> FakeUser | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return next((u for u in self.users if u.token and u.token == value), None)
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "sessionid":
                return next((u for u in self.users if u.session and u.session == value), None)
        return None

    def _answer(self, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        if self.force_status is not None:
            return self.force_status, {"detail": "forced"}
        user = self._caller(headers)
        if user is None:
            return 401, {"detail": "Authentication credentials were not provided."}
        if path == "/api/v2/me/":
            me = {"id": user.id, "username": user.username, "is_superuser": user.is_superuser}
            return 200, me if self.me_as_object else {"count": 1, "results": [me]}
        if self.rule is not None and any(path.startswith(f"/api/v2/{k}/") for k in KINDS.values()):
            return (200, {"id": path}) if self.rule(user.id, path) else (403, {"detail": "denied"})
        if path not in self.objects:
            return 404, {"detail": "Not found."}
        if user.is_superuser or user.id in self.objects[path]:
            return 200, {"id": path}
        return 403, {"detail": "You do not have permission to perform this action."}


# -- TLS with a private CA ------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca_file: str
    cert_pem: bytes
    key_pem: bytes

    def server_options(self) -> Any:
        return ssl.PrivateCertificate.loadPEM(self.cert_pem + self.key_pem).options()


def make_tls_files(directory: Path) -> TLSFiles:
    """A private CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("towerws test CA", ca_key, "towerws test CA", ca_key, ca=True)
    server = cert("127.0.0.1", server_key, "towerws test CA", ca_key, ca=False)
    ca_file = directory / "tower-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return TLSFiles(str(ca_file), server.public_bytes(serialization.Encoding.PEM), key_pem)


# -- fixtures (imported by the test modules that use them) ----------------------------------


@pytest.fixture
def fake_tower() -> Any:
    fake = FakeTower().start()
    yield fake
    pytest_twisted.blockon(fake.stop())


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait (bounded) for server-side state that has no event of its own, e.g. a close being processed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
