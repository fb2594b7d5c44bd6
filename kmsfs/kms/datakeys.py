"""The format's data keys, from keyd: a :class:`kmsfs.format.DataKeyProvider` over the client.

Used by the offline tools (``kmsfs encrypt/decrypt/inspect``) and by ``kmsfs.open``. The
mount has its own asynchronous path (``kmsfs/fs/keys.py``). Each call opens a short
connection: a file needs at most one or two of them, and a file object may live long.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Collection

from kmsfs.errors import CorruptHeader
from kmsfs.kms.client import KMSClient


class KeydDataKeyProvider:
    """``recipient_keys``: the CMKs whose recipient slots (format version 3, a data key
    wrapped to the CMK's public key) are accepted: None accepts any the slot names (a
    single file the user asked to decrypt), a cipher directory passes the one its sealed
    kmsfs.conf names, or none (see :func:`check_recipient_key`)."""

    def __init__(
        self, keyd_socket: str | None = None, *, recipient_keys: Collection[str] | None = None
    ) -> None:
        self.keyd_socket = keyd_socket
        self.recipient_keys = None if recipient_keys is None else frozenset(recipient_keys)

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        with KMSClient(self.keyd_socket) as client:
            response = client.generate_data_key(key_id, encryption_context=encryption_context)
        return response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        with KMSClient(self.keyd_socket) as client:
            return client.decrypt(wrapped_blob, encryption_context=encryption_context)["Plaintext"]

    def decrypt_recipient_key(
        self, key_id: str, wrapped_key: bytes, encryption_algorithm: str
    ) -> bytes:
        """AWS KMS Decrypt of an asymmetric ciphertext: KeyId and EncryptionAlgorithm are
        required, and there is no encryption context."""
        check_recipient_key(key_id, self.recipient_keys)
        with KMSClient(self.keyd_socket) as client:
            response = client.call(
                "Decrypt",
                {
                    "KeyId": key_id,
                    "CiphertextBlob": bytes(wrapped_key),
                    "EncryptionAlgorithm": encryption_algorithm,
                },
            )
        return base64.b64decode(response["Plaintext"])


def check_recipient_key(key_id: str, accepted: frozenset[str] | None) -> None:
    """Refuse a recipient slot naming a CMK the caller does not accept (CorruptHeader):
    anyone with a public key can make such a file, so a cipher directory takes them only
    for the recipient CMK its sealed kmsfs.conf names."""
    if accepted is None or key_id in accepted:
        return
    if not accepted:
        raise CorruptHeader(
            "the file's data key is wrapped to a public key (a recipient slot), and this "
            "cipher directory accepts none (kmsfs init --recipient-key)"
        )
    raise CorruptHeader(
        f"the file's data key is wrapped to the public key of {key_id}, not to this "
        "cipher directory's recipient key"
    )


def blob_key_version(wrapped_blob: bytes) -> tuple[str, int] | None:
    """``(key id, key version)`` named by one of keyd's ciphertext blobs (see kms/service.py).

    None for a blob of another shape (e.g. one from AWS KMS, which is opaque).
    """
    if len(wrapped_blob) < 49 or wrapped_blob[0] != 1:
        return None
    key_bytes, version = struct.unpack_from(">16sI", wrapped_blob, 1)
    return str(uuid.UUID(bytes=key_bytes)), version
