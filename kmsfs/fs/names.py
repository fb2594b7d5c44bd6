"""Encrypted file names and symlink targets (pure: bytes in, bytes out).

**Names** are encrypted with AES-SIV under the filesystem's name key, with the
directory's 16-byte id as associated data: deterministic within one directory (a
lookup needs no scan), different across directories (a name moved to another
directory no longer decrypts). The result is encoded with unpadded base64url
(RFC 4648 §5): never ``/`` or NUL, 4 characters per 3 bytes — denser than base32
(8 per 5), so more names fit under the backing filesystem's 255-byte limit — at the
price of needing a case-sensitive backing filesystem (ext4, xfs, btrfs, tmpfs; not
case-folding ones), as gocryptfs's default encoding does.

**Directory ids** live in each backing directory as ``kmsfs.diriv`` (16 random bytes,
written when the directory is made). Base64url output never holds a ``.``, so the
reserved names ``kmsfs.*`` can never collide with an encrypted name.

**Long names**: an encoded name longer than :data:`MAX_ENCODED_NAME` is stored as
``kmsfs.longname.<base64url(sha256(encoded))>`` with the full encoded name in the
sidecar file ``kmsfs.longname.<...>.name`` beside it (gocryptfs's scheme). Plaintext
names up to 175 bytes are stored inline; up to 255 via the sidecar.

**Symlink targets** are ``base64url(nonce ‖ AES-GCM(target))`` (random nonce, so equal
targets do not look equal), under a key of their own. The plaintext length follows
from the stored length, so ``lstat`` needs no decryption.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DIRIV_NAME = b"kmsfs.diriv"
LONGNAME_PREFIX = b"kmsfs.longname."
LONGNAME_SUFFIX = b".name"
RESERVED_PREFIX = b"kmsfs."
DIR_ID_SIZE = 16
MAX_ENCODED_NAME = 255
SIV_OVERHEAD = 16
SYMLINK_NONCE = 12
SYMLINK_OVERHEAD = SYMLINK_NONCE + 16


class NameError_(ValueError):
    """A backing name that is not one of ours or fails authentication."""


def b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64decode(text: bytes) -> bytes:
    """Decode unpadded base64url, accepting only the one canonical spelling.

    The standard decoder skips foreign characters, takes ``+`` for ``-`` and ignores the
    last character's spare bits: each would give one name several backing spellings.
    """
    try:
        data = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise NameError_("not base64url") from None
    if b64encode(data) != text:
        raise NameError_("not canonical base64url")
    return data


def new_dir_id() -> bytes:
    return os.urandom(DIR_ID_SIZE)


def is_internal(backing_name: bytes) -> bool:
    """kmsfs's own entries in a backing directory (never shown at the mountpoint)."""
    return backing_name.startswith(RESERVED_PREFIX)


def longname_sidecar(backing_name: bytes) -> bytes:
    return backing_name + LONGNAME_SUFFIX


def is_longname(backing_name: bytes) -> bool:
    return backing_name.startswith(LONGNAME_PREFIX) and not backing_name.endswith(LONGNAME_SUFFIX)


#: names the cache keeps (each way): about 330 bytes per name for both ways together.
#: A miss costs one AES-SIV call (~3 µs), a FUSE request 40-55 µs: the cache need only
#: cover a listing followed by its lookups (``ls -l`` of a large directory).
NAME_CACHE_SIZE = 10_000


class NameCipher:
    """Encrypt and decrypt names and symlink targets, with a cache of decrypted names.

    The cache is LRU-bounded (:data:`NAME_CACHE_SIZE`), and a name removed at the
    mountpoint leaves it at once (:meth:`forget`): deleted names do not stay in memory.
    """

    def __init__(self, metadata_key: bytes, *, cache_size: int = NAME_CACHE_SIZE) -> None:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=96, salt=None, info=b"kmsfs name keys v1"
        ).derive(metadata_key)
        self._names = AESSIV(okm[:64])
        self._symlinks = AESGCM(okm[64:])
        self._cache_size = cache_size
        # (dir id, encoded name) -> plaintext name, and the reverse; LRU-bounded.
        self._decrypted: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
        self._encrypted: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()

    def _remember(self, dir_id: bytes, plain: bytes, encoded: bytes) -> None:
        for cache, key, value in (
            (self._decrypted, (dir_id, encoded), plain),
            (self._encrypted, (dir_id, plain), encoded),
        ):
            cache[key] = value
            if len(cache) > self._cache_size:
                cache.popitem(last=False)

    def clear(self) -> None:
        """Drop every cached name (see kmsfs.fs.mount.return_memory)."""
        self._decrypted.clear()
        self._encrypted.clear()

    def forget(self, dir_id: bytes, plain: bytes, encoded: bytes) -> None:
        """The name is gone from its directory: drop it from the cache."""
        self._decrypted.pop((dir_id, encoded), None)
        self._encrypted.pop((dir_id, plain), None)

    def encrypt_name(self, dir_id: bytes, plain: bytes) -> bytes:
        """The full encoded name (may exceed 255 bytes: see :meth:`backing_name`)."""
        cached = self._encrypted.get((dir_id, plain))
        if cached is not None:
            return cached
        encoded = b64encode(self._names.encrypt(plain, [dir_id]))
        self._remember(dir_id, plain, encoded)
        return encoded

    def decrypt_name(self, dir_id: bytes, encoded: bytes) -> bytes:
        cached = self._decrypted.get((dir_id, encoded))
        if cached is not None:
            return cached
        sealed = b64decode(encoded)
        if len(sealed) <= SIV_OVERHEAD:
            raise NameError_("too short")
        try:
            plain = self._names.decrypt(sealed, [dir_id])
        except InvalidTag:
            raise NameError_("failed authentication") from None
        if not plain or b"/" in plain or b"\0" in plain or plain in (b".", b".."):
            raise NameError_("not a valid file name")
        self._remember(dir_id, plain, encoded)
        return plain

    @staticmethod
    def backing_name(encoded: bytes) -> bytes:
        """The entry name on disk for an encoded name (a longname digest if too long)."""
        if len(encoded) <= MAX_ENCODED_NAME:
            return encoded
        return LONGNAME_PREFIX + b64encode(hashlib.sha256(encoded).digest())

    @staticmethod
    def check_longname(backing: bytes, encoded: bytes) -> None:
        """A sidecar's content must hash to its entry's name (else it was swapped)."""
        if NameCipher.backing_name(encoded) != backing:
            raise NameError_("long name does not match its digest")

    # ----------------------------------------------------------------- symlinks
    def encrypt_target(self, target: bytes) -> bytes:
        nonce = os.urandom(SYMLINK_NONCE)
        return b64encode(nonce + self._symlinks.encrypt(nonce, target, b"kmsfs symlink v1"))

    def decrypt_target(self, stored: bytes) -> bytes:
        sealed = b64decode(stored)
        try:
            return self._symlinks.decrypt(
                sealed[:SYMLINK_NONCE], sealed[SYMLINK_NONCE:], b"kmsfs symlink v1"
            )
        except (InvalidTag, ValueError):
            raise NameError_("symlink target failed authentication") from None

    @staticmethod
    def target_length(stored_length: int) -> int:
        """Plaintext length of a symlink target from its stored (encoded) length."""
        return max(0, stored_length * 3 // 4 - SYMLINK_OVERHEAD)
