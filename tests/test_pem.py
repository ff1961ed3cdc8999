"""towerws.pem: PEM files named in the configuration -- checks at start-up and the Twisted TLS objects.

Every error names the file and the problem, never the file's contents (a key file may hold a secret).
A CA bundle with an old root (serial number not positive) loads without a warning, and files that
hold no certificate still fail.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl

from tlsfiles import CA
from towerws import config, pem

SECRET = "s3cr3t-do-not-print"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("towerws test CA")


@pytest.fixture
def files(tmp_path: Path, ca: CA) -> dict[str, str]:
    """A CA file, a client certificate and its key (separately and combined), another CA's key."""
    client = ca.issue("towerws-client", client=True)
    cert, key = client.write(tmp_path, "client")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(client.cert_pem + client.key_pem)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.issued.cert_pem)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.issued.cert_pem + CA("another CA").issued.cert_pem)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(ca.issue("someone else").key_pem)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(client.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(SECRET.encode()),
    ))
    return {"cert": cert, "key": key, "combined": str(combined), "ca": str(ca_file), "bundle": str(bundle),
            "other_key": str(other_key), "encrypted": str(encrypted)}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(check: object, *args: object) -> str:
    with pytest.raises(ValueError) as info:
        check(*args)  # type: ignore[operator]
    message = str(info.value)
    assert SECRET not in message and "\n" not in message, message
    return message


# -- certificates -----------------------------------------------------------------------------------


def test_a_ca_file_with_certificates_passes(files: dict[str, str]) -> None:
    assert pem.check_ca_file(files["ca"]) == files["ca"]
    assert pem.check_cert_file(files["cert"]) == files["cert"]
    assert len(pem.certificates(files["bundle"])) == 2


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.pem")
    assert refused(pem.check_ca_file, path) == f"{path}: cannot read: No such file or directory"


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    assert refused(pem.check_ca_file, str(tmp_path)).startswith(f"{tmp_path}: cannot read: ")


@pytest.mark.parametrize("text", [
    f"not a certificate {SECRET}",
    f"-----BEGIN CERTIFICATE-----\n{SECRET}\n-----END CERTIFICATE-----\n",  # PEM armour, junk inside
    "",
])
def test_not_a_pem_certificate(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "ca.pem", text)
    assert refused(pem.check_ca_file, path) == f"{path}: no PEM certificate in it"


def test_a_key_is_not_a_certificate(files: dict[str, str]) -> None:
    assert refused(pem.check_ca_file, files["key"]) == f"{files['key']}: no PEM certificate in it"


# -- private keys -------------------------------------------------------------------------------------


def test_an_unencrypted_key_passes(files: dict[str, str]) -> None:
    assert pem.check_key_file(files["key"]) == files["key"]
    assert pem.check_key_file(files["combined"]) == files["combined"]


def test_a_certificate_is_not_a_key(files: dict[str, str]) -> None:
    assert refused(pem.check_key_file, files["cert"]) == f"{files['cert']}: no PEM private key in it"


def test_an_encrypted_key_is_refused_clearly(files: dict[str, str]) -> None:
    path = files["encrypted"]
    assert refused(pem.check_key_file, path) == f"{path}: the private key is encrypted; give an unencrypted key"


def test_a_broken_key_is_refused_without_its_contents(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.key", f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n")
    assert refused(pem.check_key_file, path) == f"{path}: the private key cannot be read"


# -- a client certificate and its key ----------------------------------------------------------------------


def test_a_matching_pair_passes(files: dict[str, str]) -> None:
    assert pem.check_client_certificate(files["cert"], files["key"]) is None
    assert pem.check_client_certificate(files["combined"], None) is None  # the key in the certificate's file


def test_a_key_of_another_certificate_is_refused(files: dict[str, str]) -> None:
    message = refused(pem.check_client_certificate, files["cert"], files["other_key"])
    assert message == f"{files['other_key']}: the private key does not belong to the certificate in {files['cert']}"


def test_a_certificate_without_its_key_asks_for_the_key_file(files: dict[str, str]) -> None:
    message = refused(pem.check_client_certificate, files["cert"], None)
    assert message == f"{files['cert']}: no private key in it; give --amqp-key-file"


def test_an_encrypted_client_key_is_refused(files: dict[str, str]) -> None:
    assert "is encrypted" in refused(pem.check_client_certificate, files["cert"], files["encrypted"])


# -- the Twisted TLS objects -----------------------------------------------------------------------------


def test_trust_root(files: dict[str, str]) -> None:
    assert pem.trust_root(None) is None  # the platform's trust store
    assert pem.trust_root(files["bundle"]) is not None
    with pytest.raises(ValueError, match="no PEM certificate"):
        pem.trust_root(files["key"])


def test_client_certificate(files: dict[str, str]) -> None:
    assert pem.client_certificate(None, None) is None
    with open(files["cert"], "rb") as fp:
        digest = ssl.Certificate.loadPEM(fp.read()).digest()
    for cert_file, key_file in ((files["cert"], files["key"]), (files["combined"], None)):
        private = pem.client_certificate(cert_file, key_file)
        assert isinstance(private, ssl.PrivateCertificate)
        assert private.digest() == digest and private.privateKey is not None


# -- bundles with old roots ----------------------------------------------------------------------------


SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def negative_serial_pem() -> bytes:
    """A certificate whose serial number is -43: cryptography loads it with a deprecation warning.

    cryptography refuses to build one, so the serial INTEGER of a built certificate
    is replaced in its DER by a one-byte negative one (0xd5); nothing checks the signature.
    """
    cert = CA("negative-serial").issued.cert
    der = cert.public_bytes(serialization.Encoding.DER)
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")
    field = bytes([0x02, len(serial)]) + serial
    assert der.count(field) == 1
    body = base64.encodebytes(_with_serial(der, field, bytes([0x02, 1, 0xD5])))
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


def _with_serial(der: bytes, old: bytes, new: bytes) -> bytes:
    """``der`` with the serial INTEGER ``old`` replaced by ``new``, the enclosing SEQUENCE lengths fixed."""
    shrink = len(old) - len(new)

    def header(length: int) -> bytes:
        if length < 128:
            return bytes([length])
        size = (length.bit_length() + 7) // 8
        return bytes([0x80 | size]) + length.to_bytes(size, "big")

    def parse(data: bytes, at: int) -> tuple[int, int]:
        """(length, offset of the content) of the TLV at ``at``."""
        first = data[at + 1]
        if first < 128:
            return first, at + 2
        size = first & 0x7F
        return int.from_bytes(data[at + 2:at + 2 + size], "big"), at + 2 + size

    _, tbs_at = parse(der, 0)
    tbs_len, tbs_content = parse(der, tbs_at)
    tbs = der[tbs_content:tbs_content + tbs_len].replace(old, new, 1)
    rest = der[tbs_content + tbs_len:]
    tbs_tlv = b"\x30" + header(tbs_len - shrink) + tbs
    return b"\x30" + header(len(tbs_tlv) + len(rest)) + tbs_tlv + rest


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    """A CA bundle: a normal root and one with a negative serial number."""
    path = tmp_path / "bundle.crt"
    path.write_bytes(CA("normal").issued.cert_pem + negative_serial_pem())
    return str(path)


def test_the_negative_serial_certificate_does_warn_when_loaded_plainly(bundle: str) -> None:
    """The fixture is what it claims: cryptography warns about it (else the next test proves nothing)."""
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    with pytest.warns(CryptographyDeprecationWarning, match="serial number"):
        x509.load_pem_x509_certificates(Path(bundle).read_bytes())


def test_a_bundle_with_a_negative_serial_loads_without_a_warning(bundle: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(pem.certificates(bundle)) == 2
        assert pem.trust_root(bundle) is not None
        assert config.load({"tower_ca_file": bundle}, environ={}).tower_ca_file == bundle


@pytest.mark.skipif(not SYSTEM_BUNDLE.is_file(), reason=f"no system CA bundle at {SYSTEM_BUNDLE}")
def test_the_system_bundle_loads_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.load({"tower_ca_file": str(SYSTEM_BUNDLE)}, environ={}).tower_ca_file == str(SYSTEM_BUNDLE)


def test_files_without_a_certificate_still_fail(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        pem.certificates(str(junk))
    with pytest.raises(config.ConfigError, match="^--tower-ca-file .*no PEM certificate"):
        config.load({"tower_ca_file": str(junk)}, environ={})
