"""PEM files: a CA bundle with an old root (serial number not positive) loads without a
warning, and files that hold no certificate still fail."""

from __future__ import annotations

import base64
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tlsfiles import CA
from towerws import config, pem

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
