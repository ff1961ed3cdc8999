"""amqps:// against the real RabbitMQ behind a TLS-terminating proxy, with throwaway certificates.

The shared broker is not reconfigured: the test's proxy terminates TLS (its own
CA, server and client certificates from :mod:`tlsfiles`) and pipes plain AMQP
to 127.0.0.1:5672.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization

from brokerproxy import BrokerProxy
from conftest import aio, aio_test, wait
from logcapture import LogCapture
from test_twistd import run_twistd
from tlsfiles import CA, server_options
from towerws import config

PASSWORD = "tls-pw-0815"  # what a refused attempt must never log (the broker's is guest)


class PKI:
    def __init__(self, directory: Path):
        self.ca = CA("towerws test CA")
        self.ca_file = str(directory / "ca.crt")
        Path(self.ca_file).write_bytes(self.ca.issued.cert_pem)
        self.server = self.ca.issue("localhost", dns=["localhost"])
        self.wrong_host = self.ca.issue("broker.example", dns=["broker.example"])
        self.stranger = CA("someone else's CA").issue("localhost", dns=["localhost"])
        self.client_cert, self.client_key = self.ca.issue("towerws", client=True).write(directory, "client")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_proxy() -> Any:
    """Start a TLS proxy with given server options; all are stopped afterwards."""
    started: list[BrokerProxy] = []

    async def start(options: Any) -> BrokerProxy:
        proxy = await BrokerProxy(tls=options).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(aio(proxy.stop()))


@aio_test
async def test_good_certificate_consumes_and_delivers(server_factory, tls_proxy, pki: PKI, publisher) -> None:
    # The proxy also requires a client certificate from the CA: towerws presents it.
    proxy = await tls_proxy(server_options(pki.server, client_ca=pki.ca))
    server = await server_factory(
        amqp_url=proxy.url("amqps", host="localhost"),
        amqp_ca_file=pki.ca_file,
        amqp_cert_file=pki.client_cert,
        amqp_key_file=pki.client_key,
    )
    ws = await server.connect()
    await ws.subscribe({"jobs": ["status_changed"]})
    await publisher.publish("jobs-status_changed", {"over": "tls"})
    assert await ws.recv_json() == {"over": "tls"}
    await ws.close()


async def refused(server_factory: Any, url: str, ca_file: str | None, expected: str) -> list[str]:
    """Start towerws on ``url``; wait for two failed attempts; return their log lines."""
    extra = {"amqp_ca_file": ca_file} if ca_file else {}
    with LogCapture(prefix="") as log:
        server = await server_factory(ready=False, amqp_url=url, reconnect_max_delay=0.2, **extra)
        await log.wait_for("cannot connect to the broker", count=2)  # and keeps retrying
        await wait(server.service.stopService())
    failures = log.matching("cannot connect to the broker")
    assert all(expected in line for line in failures), failures
    assert len(failures) >= 2 and log.count("Scheduling retry") == 0  # one line per attempt: ours, not also ClientService's
    assert not any(PASSWORD in line for line in log.lines)
    assert not any("Traceback" in line or "Unhandled" in line for line in log.lines), log.lines
    assert not server.service.bus.ready
    print(f"\n[tls] {len(failures)} attempts refused, e.g.: {failures[0]}")
    return failures


@pytest.mark.parametrize(
    "certificate,expected",
    [
        ("wrong_host", "TLS: the broker's certificate does not match the host name localhost"),
        ("stranger", "TLS handshake failed: certificate verify failed"),
    ],
    ids=["wrong-hostname", "unknown-ca"],
)
@aio_test
async def test_untrusted_certificate_is_refused_and_logged(
    server_factory, tls_proxy, pki: PKI, certificate: str, expected: str
) -> None:
    proxy = await tls_proxy(server_options(getattr(pki, certificate)))
    await refused(server_factory, proxy.url("amqps", host="localhost", password=PASSWORD), pki.ca_file, expected)


@aio_test
async def test_amqps_to_a_plaintext_port_never_falls_back(server_factory, pki: PKI) -> None:
    await refused(server_factory, f"amqps://guest:{PASSWORD}@localhost:5672/%2F", pki.ca_file, "TLS handshake failed")


# -- the TLS files in the configuration --------------------------------------------------------


def load(**cli: str) -> config.Settings:
    return config.load({"amqp_url": "amqps://guest:guest@localhost/", **cli}, environ={})


def test_tls_files_load(pki: PKI, tmp_path: Path) -> None:
    s = load(amqp_ca_file=pki.ca_file, amqp_cert_file=pki.client_cert, amqp_key_file=pki.client_key)
    assert (s.amqp_ca_file, s.amqp_cert_file, s.amqp_key_file) == (pki.ca_file, pki.client_cert, pki.client_key)
    both = tmp_path / "both.pem"  # certificate and key in one file
    both.write_bytes(Path(pki.client_cert).read_bytes() + Path(pki.client_key).read_bytes())
    assert load(amqp_cert_file=str(both)).amqp_key_file is None


def _broken_files(pki: PKI, tmp_path: Path) -> dict[str, str]:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        pki.server.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret-passphrase"),
        )
    )
    other_key = tmp_path / "other.key"
    other_key.write_bytes(pki.server.key_pem)
    return {"junk": str(junk), "encrypted": str(encrypted), "other_key": str(other_key)}


@pytest.mark.parametrize(
    "cli,expected",
    [
        ({"amqp_ca_file": "/nonexistent/ca.crt"}, "--amqp-ca-file (command line): /nonexistent/ca.crt: cannot read"),
        ({"amqp_ca_file": "junk"}, "--amqp-ca-file (command line): JUNK: no PEM certificate in it"),
        ({"amqp_cert_file": "junk"}, "--amqp-cert-file (command line): JUNK: no PEM certificate in it"),
        ({"amqp_cert_file": "CLIENT", "amqp_key_file": "junk"}, "--amqp-key-file (command line): JUNK: no PEM private key"),
        ({"amqp_cert_file": "CLIENT", "amqp_key_file": "encrypted"}, "is encrypted; give an unencrypted key"),
        ({"amqp_cert_file": "CLIENT"}, "--amqp-cert-file: CLIENT: no private key in it; give --amqp-key-file"),
        ({"amqp_key_file": "KEY"}, "--amqp-key-file: given without --amqp-cert-file"),
        ({"amqp_cert_file": "CLIENT", "amqp_key_file": "other_key"}, "does not belong to the certificate"),
        ({"amqp_ca_file": "CA", "amqp_url": "amqp://guest:guest@localhost/"}, "--amqp-ca-file: given, but --amqp-url is not amqps://"),
    ],
)
def test_bad_tls_files_fail_with_one_line(pki: PKI, tmp_path: Path, cli: dict[str, str], expected: str) -> None:
    files = {**_broken_files(pki, tmp_path), "CLIENT": pki.client_cert, "KEY": pki.client_key, "CA": pki.ca_file}
    cli = {k: files.get(v, v) for k, v in cli.items()}
    expected = expected.replace("JUNK", files["junk"]).replace("CLIENT", pki.client_cert)
    with pytest.raises(config.ConfigError) as info:
        load(**cli)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "secret-passphrase" not in message


def test_twistd_names_a_bad_tls_file_in_one_line() -> None:
    result = run_twistd("--amqp-url", "amqps://localhost/", "--amqp-ca-file", "/nonexistent/ca.crt")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--amqp-ca-file" in lines[0] and "/nonexistent/ca.crt" in lines[0], result.stderr
