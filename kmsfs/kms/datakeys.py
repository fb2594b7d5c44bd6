"""The format's data keys, from keyd: a :class:`kmsfs.format.DataKeyProvider` over the client.

Used by the offline tools (``kmsfs encrypt/decrypt/inspect``) and by ``kmsfs.open``. The
mount has its own asynchronous path (``kmsfs/fs/keys.py``). Each call opens a short
connection: a file needs at most one or two of them, and a file object may live long.
"""

from __future__ import annotations

import struct
import uuid

from kmsfs.kms.client import KMSClient


class KeydDataKeyProvider:
    def __init__(self, keyd_socket: str | None = None) -> None:
        self.keyd_socket = keyd_socket

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        with KMSClient(self.keyd_socket) as client:
            response = client.generate_data_key(key_id, encryption_context=encryption_context)
        return response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        with KMSClient(self.keyd_socket) as client:
            return client.decrypt(wrapped_blob, encryption_context=encryption_context)["Plaintext"]


def blob_key_version(wrapped_blob: bytes) -> tuple[str, int] | None:
    """``(key id, key version)`` named by one of keyd's ciphertext blobs (see kms/service.py).

    None for a blob of another shape (e.g. one from AWS KMS, which is opaque).
    """
    if len(wrapped_blob) < 49 or wrapped_blob[0] != 1:
        return None
    key_bytes, version = struct.unpack_from(">16sI", wrapped_blob, 1)
    return str(uuid.UUID(bytes=key_bytes)), version
