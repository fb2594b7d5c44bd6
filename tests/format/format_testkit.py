"""Shared helpers of the format tests: an in-memory key provider and a deterministic RNG."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.errors import InvalidCiphertextException, NotFoundException

TEST_WRAPPING_KEY = bytes(range(100, 132))
TEST_KEY_ID = "alias/test"
TEST_KEY_ARN = "arn:aws:kms:local:000000000000:key/00000000-0000-4000-8000-000000000001"
OTHER_KEY_ARN = "arn:aws:kms:local:000000000000:key/00000000-0000-4000-8000-000000000002"
TEST_RSA_KEY_ARN = "arn:aws:kms:local:000000000000:key/00000000-0000-4000-8000-0000000000a1"


def memfd() -> int:
    """An anonymous in-memory file for a backing file (closed by the caller)."""
    return os.memfd_create("kmsfs-test", os.MFD_CLOEXEC)


def pattern(seed: int, length: int) -> bytes:
    """``length`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def _context_bytes(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class FakeKeyProvider:
    """AES-GCM under a fixed wrapping key, binding the encryption context, like keyd.

    ``data_keys`` (optional) supplies the data keys handed out, in order (golden vectors);
    otherwise they are random. Blob: b"FAKE" + key-tag (1 byte) + nonce + sealed data key.
    """

    def __init__(
        self,
        wrapping_key: bytes = TEST_WRAPPING_KEY,
        *,
        key_arn: str = TEST_KEY_ARN,
        data_keys: list[bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        tag: bytes = b"\x01",
    ) -> None:
        self._aead = AESGCM(wrapping_key)
        self.key_arn = key_arn
        self._data_keys = list(data_keys or [])
        self._random = random_bytes
        self._tag = tag
        self.generate_calls = 0
        self.decrypt_calls = 0

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        if key_id == "alias/missing":
            raise NotFoundException("no such key")
        self.generate_calls += 1
        data_key = self._data_keys.pop(0) if self._data_keys else self._random(32)
        return data_key, self.wrap(data_key, encryption_context), self.key_arn

    def wrap(self, data_key: bytes, encryption_context: dict[str, str]) -> bytes:
        nonce = self._random(12)
        sealed = self._aead.encrypt(nonce, data_key, _context_bytes(encryption_context))
        return b"FAKE" + self._tag + nonce + sealed

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        self.decrypt_calls += 1
        if wrapped_blob[:5] != b"FAKE" + self._tag:
            raise InvalidCiphertextException("not our blob")
        try:
            return self._aead.decrypt(
                wrapped_blob[5:17], wrapped_blob[17:], _context_bytes(encryption_context)
            )
        except InvalidTag:
            raise InvalidCiphertextException("blob or context does not authenticate") from None


class DeterministicRandom:
    """A reproducible stand-in for os.urandom (SHA-256 in counter mode over a seed)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            out += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        return bytes(out[:size])


class RecipientReader:
    """The reading side of a recipient slot, as keyd does it: RSA-OAEP-SHA-256 Decrypt with
    the private key of the CMK ``key_arn`` (a test-only private key)."""

    def __init__(self, private_key, key_arn: str = TEST_RSA_KEY_ARN) -> None:
        self.private_key = private_key
        self.key_arn = key_arn
        self.calls: list[tuple[str, str]] = []

    def decrypt_recipient_key(
        self, key_id: str, wrapped: bytes, encryption_algorithm: str
    ) -> bytes:
        from kmsfs.format.recipient import oaep_sha256

        self.calls.append((key_id, encryption_algorithm))
        if key_id != self.key_arn:
            raise NotFoundException(f"{key_id} is not here")
        assert encryption_algorithm == "RSAES_OAEP_SHA_256"
        try:
            return self.private_key.decrypt(wrapped, oaep_sha256())
        except ValueError:
            raise InvalidCiphertextException("OAEP decryption failed") from None

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        raise InvalidCiphertextException("not a key-service blob")

    def generate_data_key(self, key_id: str, encryption_context: dict[str, str]):
        raise NotFoundException("a reader makes no keys")


def deterministic_oaep_sha256(public_key, message: bytes, seed: bytes) -> bytes:
    """RSAES-OAEP-SHA-256 encryption (RFC 8017, 7.1.1, empty label) with a given seed, for
    golden vectors only: ``cryptography`` draws the seed itself, so its ciphertexts differ
    every time. The result decrypts with any OAEP implementation."""
    numbers = public_key.public_numbers()
    k = (numbers.n.bit_length() + 7) // 8
    h_len = 32
    assert len(seed) == h_len and len(message) <= k - 2 * h_len - 2

    def mgf1(mask_seed: bytes, length: int) -> bytes:
        out = b""
        counter = 0
        while len(out) < length:
            out += hashlib.sha256(mask_seed + counter.to_bytes(4, "big")).digest()
            counter += 1
        return out[:length]

    data_block = (
        hashlib.sha256(b"").digest() + bytes(k - len(message) - 2 * h_len - 2) + b"\x01" + message
    )
    masked_db = bytes(a ^ b for a, b in zip(data_block, mgf1(seed, k - h_len - 1), strict=True))
    masked_seed = bytes(a ^ b for a, b in zip(seed, mgf1(masked_db, h_len), strict=True))
    encoded = int.from_bytes(b"\x00" + masked_seed + masked_db, "big")
    return pow(encoded, numbers.e, numbers.n).to_bytes(k, "big")
