"""Data keys: how the format gets them (a provider protocol) and what it derives from them.

The format never talks to keyd itself. It asks a :class:`DataKeyProvider` for a fresh data
key when a file gets its header, and to unwrap the stored blob when a file is opened. The
filesystem and the CLI pass a provider backed by the keyd client; tests pass an in-memory
fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: the entry the format adds to every encryption context it sends to the key service
FILE_ID_CONTEXT_KEY = "kmsfs:file-id"

DATA_KEY_SIZE = 32
FILE_ID_SIZE = 16
_KEY_SCHEDULE_INFO = b"kmsfs format v1 key schedule"


@runtime_checkable
class DataKeyProvider(Protocol):
    """Where data keys come from: keyd (GenerateDataKey / Decrypt) or a test fake.

    A provider may also offer ``take_prepared_key(key_id, stored_context) ->
    (file_id, data_key, wrapped_key, key_arn)``: a key made ahead of time for a file id
    it chose, bound to ``full_context(file_id, stored_context)``. When present, a new
    header uses it instead of :meth:`generate_data_key` (the mount's pool of keys).

    To read recipient slots (format version 3, README.md *Recipient slots*) a provider
    offers ``decrypt_recipient_key(key_id, wrapped_key, encryption_algorithm) -> bytes``:
    the key service's Decrypt with that KeyId and EncryptionAlgorithm, returning its
    Plaintext (raising InvalidCiphertextException when the ciphertext does not decrypt).
    A provider with ``slot_kind`` set (:class:`kmsfs.format.recipient.RecipientKeyProvider`)
    writes recipient slots.
    """

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        """A new AES-256 data key: ``(plaintext_data_key (32 bytes), wrapped_blob, key_arn)``."""
        ...

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        """Unwrap a blob made by :meth:`generate_data_key` under the same context.

        Raises :class:`kmsfs.errors.InvalidCiphertextException` when the blob or the
        context does not authenticate; other key-service errors as they are.
        """
        ...


def full_context(file_id: bytes, stored_context: Mapping[str, str]) -> dict[str, str]:
    """The encryption context sent to the key service for the file with this id."""
    context = dict(stored_context)
    context[FILE_ID_CONTEXT_KEY] = file_id.hex()
    return context


@dataclass(frozen=True, slots=True, repr=False)
class FileKeys:
    """The per-file keys derived from one data key (see the spec's *Key schedule*)."""

    file_id: bytes
    chunk_key: bytes
    header_key: bytes
    hole_key: bytes
    commitment: bytes

    def __repr__(self) -> str:  # never print key material
        return f"FileKeys(file_id={self.file_id.hex()})"

    @classmethod
    def derive(cls, data_key: bytes, file_id: bytes) -> FileKeys:
        if len(data_key) != DATA_KEY_SIZE:
            raise ValueError("the key provider returned a data key that is not 32 bytes")
        if len(file_id) != FILE_ID_SIZE:
            raise ValueError("a file id is 16 bytes")
        okm = HKDF(
            algorithm=hashes.SHA256(), length=128, salt=file_id, info=_KEY_SCHEDULE_INFO
        ).derive(data_key)
        return cls(file_id, okm[0:32], okm[32:64], okm[64:96], okm[96:128])
