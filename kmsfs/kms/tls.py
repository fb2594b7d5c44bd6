"""A self-signed TLS certificate for keyd's TCP listener (``kmsfs keyd tls-cert``).

Made with the ``cryptography`` x509 API: an ECDSA P-256 key (written 0600), a
certificate valid for ``localhost``, ``127.0.0.1``, ``::1`` and the names given (DNS
names or IP addresses), for 825 days (the longest browsers accept). Clients trust it by
file (``AWS_CA_BUNDLE=cert.pem``) or by the SHA-256 fingerprint printed when it is made.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmsfs.errors import UsageError

CERT_NAME = "tls-cert.pem"
KEY_NAME = "tls-key.pem"
VALID_DAYS = 825


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``AB:CD:...`` (openssl's form)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA256()))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_self_signed(
    cert_path: Path,
    key_path: Path,
    names: Sequence[str] = (),
    *,
    overwrite: bool = False,
    cert_mode: int = 0o644,
) -> str:
    """Write a new key (0600) and self-signed certificate (*cert_mode*: 0600 inside the
    keystore, whose files keyd checks are private); returns the certificate's SHA-256
    fingerprint. Refuses to replace existing files unless *overwrite*."""
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists():
                raise UsageError(f"{path} exists; give --force to replace it")
    all_names = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *names]))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, all_names[-1] if names else "keyd")]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in all_names]),
            critical=False,
        )
        # a CA certificate for itself, so that clients can trust it as a CA bundle
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, cert_mode)
    return fingerprint(cert_pem)


def _write(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
