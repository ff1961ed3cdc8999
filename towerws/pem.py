"""PEM files named in the configuration: certificates, private keys, trust roots.

One reader for every TLS option (``--tower-ca-file``, ``--amqp-ca-file``,
``--amqp-cert-file``, ``--amqp-key-file``): the ``check_*`` functions validate a
file at start-up (``ValueError`` naming the file and the problem, never its
contents); :func:`trust_root` and :func:`client_certificate` turn files into
the Twisted TLS objects the clients use.
"""

from __future__ import annotations

import warnings
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"


def read(path: str) -> bytes:
    try:
        with open(path, "rb") as fp:
            return fp.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None


def certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in the PEM file ``path`` (at least one)."""
    data = read(path)
    try:
        with warnings.catch_warnings():
            # System bundles (/etc/ssl/certs/ca-certificates.crt) hold old roots whose
            # serial number is not positive; cryptography warns about each on load, at
            # start-up, where the operator can do nothing about it. Only that class,
            # only around this load: a certificate it cannot read still fails below.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"{path}: no PEM certificate in it")
    return certs


def private_key(path: str) -> Any:
    """The unencrypted private key in the PEM file ``path``."""
    data = read(path)
    if PRIVATE_KEY_MARKER not in data:
        raise ValueError(f"{path}: no PEM private key in it")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{path}: the private key is encrypted; give an unencrypted key") from None
    except ValueError:
        raise ValueError(f"{path}: the private key cannot be read") from None


def check_ca_file(path: str) -> str:
    """An option parser: ``path`` holds at least one PEM certificate."""
    certificates(path)
    return path


check_cert_file = check_ca_file


def check_key_file(path: str) -> str:
    """An option parser: ``path`` holds an unencrypted PEM private key."""
    private_key(path)
    return path


def check_client_certificate(cert_file: str, key_file: str | None) -> None:
    """The client certificate has its key (in ``key_file`` or its own file) and they match."""
    if key_file is None and PRIVATE_KEY_MARKER not in read(cert_file):
        raise ValueError(f"{cert_file}: no private key in it; give --amqp-key-file")
    key = private_key(key_file or cert_file)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    cert_key = certificates(cert_file)[0].public_key().public_bytes(serialization.Encoding.PEM, pub)
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != cert_key:
        raise ValueError(f"{key_file or cert_file}: the private key does not belong to the certificate in {cert_file}")


def trust_root(path: str | None) -> Any:
    """A Twisted trust root of every certificate in ``path``; ``None``: the platform's trust store."""
    if path is None:
        return None
    from twisted.internet import ssl

    pem = serialization.Encoding.PEM
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(c.public_bytes(pem)) for c in certificates(path)])


def client_certificate(cert_file: str | None, key_file: str | None) -> Any:
    """A Twisted ``PrivateCertificate`` from the certificate (and key) files; ``None`` without a certificate."""
    if cert_file is None:
        return None
    from twisted.internet import ssl

    data = read(cert_file)
    if key_file is not None:
        data += b"\n" + read(key_file)
    return ssl.PrivateCertificate.loadPEM(data)
