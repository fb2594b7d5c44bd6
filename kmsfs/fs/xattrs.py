"""Extended attributes, encrypted: names deterministically, values with a nonce.

Only the ``user.`` namespace is offered at the mountpoint. ``user.NAME`` is stored on
the backing file as ``user.kmsfs.<base64url(AES-SIV(NAME))>`` (deterministic, so a
get needs no scan) and its value as ``nonce ‖ AES-GCM(value)`` with the backing name
as associated data. Both keys are derived (HKDF) from the filesystem's metadata key,
a data key that keyd wraps in kmsfs.conf.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

USER_PREFIX = b"user."
BACKING_PREFIX = b"user.kmsfs."
XATTR_NAME_MAX = 255
NONCE_SIZE = 12


class XattrCipher:
    def __init__(self, metadata_key: bytes) -> None:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=96, salt=None, info=b"kmsfs xattr keys v1"
        ).derive(metadata_key)
        self._names = AESSIV(okm[:64])
        self._values = AESGCM(okm[64:])

    def backing_name(self, name: bytes) -> bytes | None:
        """The stored name for ``user.NAME``, or None if too long to store."""
        sealed = self._names.encrypt(name[len(USER_PREFIX) :], [b"xattr-name"])
        backing = BACKING_PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=")
        return backing if len(backing) <= XATTR_NAME_MAX else None

    def plain_name(self, backing: bytes) -> bytes | None:
        """``user.NAME`` for a stored name, or None if it is not one of ours."""
        if not backing.startswith(BACKING_PREFIX):
            return None
        encoded = backing[len(BACKING_PREFIX) :]
        try:
            sealed = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
            return USER_PREFIX + self._names.decrypt(sealed, [b"xattr-name"])
        except (InvalidTag, binascii.Error, ValueError):
            return None

    def seal_value(self, backing: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._values.encrypt(nonce, value, backing)

    def open_value(self, backing: bytes, sealed: bytes) -> bytes | None:
        try:
            return self._values.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], backing)
        except (InvalidTag, ValueError):
            return None
