"""Writing files to a recipient's public key: write-only ingestion (README.md, *Recipient
slots*).

:class:`RecipientKeyProvider` is a :class:`~kmsfs.format.keys.DataKeyProvider` that needs no
key service: it draws each data key itself and wraps it, bound to the file id and the
encryption context, with RSAES-OAEP-SHA-256 to the public key of an asymmetric CMK
(``ENCRYPT_DECRYPT``, what AWS KMS's GetPublicKey exports). A host that holds only that
public key can make files it can never read back; a reader whose key service holds the
private key opens them (Decrypt with KeyId and EncryptionAlgorithm RSAES_OAEP_SHA_256).
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
    load_pem_public_key,
)

from kmsfs.errors import UsageError
from kmsfs.format.header import KEY_ARN_CAPACITY, SlotKind, recipient_payload
from kmsfs.format.keys import DATA_KEY_SIZE

#: AWS KMS's RSA key specs are 2048, 3072 and 4096 bits; nothing smaller is accepted
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 4096


def oaep_sha256() -> padding.OAEP:
    """RSAES_OAEP_SHA_256 as AWS KMS does it: MGF1 with SHA-256, SHA-256, no label."""
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def load_recipient_public_key(data: bytes, where: str = "the public key") -> rsa.RSAPublicKey:
    """An RSA public key (PEM or DER SubjectPublicKeyInfo) fit for a recipient slot."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key: Any = load_pem_public_key(data)
        else:
            key = load_der_public_key(data)
    except Exception as error:  # ValueError, UnsupportedAlgorithm: name no key material
        raise UsageError(f"{where} is not a PEM or DER public key ({error})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"{where} is not an RSA public key (RSA_2048/3072/4096 CMKs only)")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise UsageError(f"{where} is a {key.key_size}-bit RSA key; 2048 to 4096 bits are used")
    return key


def public_key_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class RecipientKeyProvider:
    """Data keys wrapped to a recipient CMK's public key; cannot unwrap anything.

    ``key_arn`` is the CMK whose public key this is: it is stored in the slot and is the
    KeyId the reader's key service is asked to Decrypt with.
    """

    slot_kind = SlotKind.RSAES_OAEP_SHA_256

    def __init__(self, public_key: rsa.RSAPublicKey, key_arn: str) -> None:
        if not key_arn or len(key_arn.encode("utf-8")) > KEY_ARN_CAPACITY:
            raise UsageError(
                f"a recipient key ARN of 1..{KEY_ARN_CAPACITY} bytes is needed, got {key_arn!r}"
            )
        self.public_key = public_key
        self.key_arn = key_arn

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        data_key = os.urandom(DATA_KEY_SIZE)
        wrapped = self.public_key.encrypt(
            recipient_payload(data_key, encryption_context), oaep_sha256()
        )
        return data_key, wrapped, self.key_arn

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        raise UsageError("a public key can only write files: reading them needs the key service")

    def decrypt_recipient_key(
        self, key_id: str, wrapped_key: bytes, encryption_algorithm: str
    ) -> bytes:
        raise UsageError("a public key can only write files: reading them needs the key service")
