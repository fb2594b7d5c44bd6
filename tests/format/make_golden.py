#!/usr/bin/env python3
"""Build the golden ciphertext vectors in tests/format/golden/ (run to regenerate).

    .venv/bin/python tests/format/make_golden.py

Everything random is fixed: the data keys, the file ids and nonces (``kmsfs.format._rng``
replaced by a seeded generator) and the fake key service's wrapping (its blob layout,
b"FAKE" + tag + nonce + AES-GCM, is frozen for these vectors). ``test_format_golden.py``
checks that the committed files still decrypt to their plaintexts *and* that this script
still produces them byte for byte — so a format change cannot slip in unnoticed. A
deliberate format change means a new format version and new vectors, never an edit of
these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: E402
from format_testkit import (  # noqa: E402
    OTHER_KEY_ARN,
    TEST_KEY_ARN,
    TEST_RSA_KEY_ARN,
    TEST_WRAPPING_KEY,
    DeterministicRandom,
    FakeKeyProvider,
    RecipientReader,
    deterministic_oaep_sha256,
)

from kmsfs.format import _rng  # noqa: E402
from kmsfs.format.file import EncryptedFile  # noqa: E402
from kmsfs.format.header import SlotKind, read_header, recipient_payload, rewrap  # noqa: E402

GOLDEN_DIR = Path(__file__).parent / "golden"
SECOND_WRAPPING_KEY = bytes(range(200, 232))
#: the test-only private key of the recipient CMK of the version-3 vector (never a real key)
RECIPIENT_PRIVATE_KEY_PEM = GOLDEN_DIR / "recipient-rsa2048.pem"


def recipient_private_key():
    return load_pem_private_key(RECIPIENT_PRIVATE_KEY_PEM.read_bytes(), password=None)


class GoldenKeyProvider:
    """Two fake CMKs (blob tags 1 and 2) with fixed wrapping keys."""

    def __init__(self, data_keys: list[bytes] | None = None, seed: bytes = b"wrap") -> None:
        random_bytes = DeterministicRandom(seed)
        self.first = FakeKeyProvider(
            TEST_WRAPPING_KEY, key_arn=TEST_KEY_ARN, data_keys=data_keys, random_bytes=random_bytes
        )
        self.second = FakeKeyProvider(
            SECOND_WRAPPING_KEY, key_arn=OTHER_KEY_ARN, random_bytes=random_bytes, tag=b"\x02"
        )

    def generate_data_key(self, key_id: str, encryption_context: dict[str, str]):
        return self.first.generate_data_key(key_id, encryption_context)

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        target = self.second if wrapped_blob[4:5] == b"\x02" else self.first
        return target.decrypt_data_key(wrapped_blob, encryption_context)

    def decrypt_recipient_key(self, key_id: str, wrapped: bytes, encryption_algorithm: str):
        reader = RecipientReader(recipient_private_key(), TEST_RSA_KEY_ARN)
        return reader.decrypt_recipient_key(key_id, wrapped, encryption_algorithm)


class GoldenRecipientProvider:
    """The writing side of a recipient slot with a fixed data key and a fixed OAEP seed
    (kmsfs.format.recipient.RecipientKeyProvider, made reproducible)."""

    slot_kind = SlotKind.RSAES_OAEP_SHA_256

    def __init__(self, data_key: bytes, seed: bytes) -> None:
        self.data_key = data_key
        self.random = DeterministicRandom(seed)

    def generate_data_key(self, key_id: str, encryption_context: dict[str, str]):
        public_key = recipient_private_key().public_key()
        payload = recipient_payload(self.data_key, encryption_context)
        wrapped = deterministic_oaep_sha256(public_key, payload, self.random(32))
        return self.data_key, wrapped, TEST_RSA_KEY_ARN

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        raise AssertionError("the writer of a recipient file cannot read it")


@contextlib.contextmanager
def fixed_randomness(seed: bytes) -> Iterator[None]:
    saved = _rng.random_bytes
    _rng.random_bytes = DeterministicRandom(seed)
    try:
        yield
    finally:
        _rng.random_bytes = saved


def _data_key(name: str) -> bytes:
    return hashlib.sha256(b"kmsfs golden data key " + name.encode()).digest()


def _make(
    name: str, chunk_size: int, context: dict[str, str], steps, memfd: int, version: int
) -> GoldenKeyProvider:
    provider = GoldenKeyProvider([_data_key(name)], seed=b"wrap " + name.encode())
    writer = provider
    if version == 3:
        writer = GoldenRecipientProvider(_data_key(name), seed=b"oaep " + name.encode())
    with fixed_randomness(b"rng " + name.encode()):
        engine = EncryptedFile.open(
            memfd, key_provider=writer, key_id="alias/golden",
            encryption_context=context, chunk_size=chunk_size, format_version=version,
        )  # fmt: skip
        for step in steps:
            getattr(engine, step[0])(*step[1:])
        engine.close()
    return provider


def build_vectors() -> dict[str, dict]:
    """name -> {ciphertext, plaintext, description, chunk_size, data_key, ...}."""
    pattern = bytes((7 * i + 3) % 256 for i in range(100))
    specs = [
        ("empty", 65536, {}, [], b"", "an empty file: no header at all"),
        ("hello", 65536, {}, [("write", 0, b"hello, kmsfs\n")], b"hello, kmsfs\n",
         "one short final chunk, default chunk size"),
        ("three-chunks", 32, {"kmsfs:fs-id": "golden-fs"}, [("write", 0, pattern)], pattern,
         "chunks of 32, 32, 32 and a final 4 bytes; a stored encryption context"),
        ("exact-chunks", 32, {}, [("write", 0, pattern[:64])], pattern[:64],
         "two full chunks, the second one final"),
        ("holes", 16, {},
         [("write", 0, b"abc"), ("truncate", 100), ("write", 50, b"XYZ")],
         b"abc" + bytes(47) + b"XYZ" + bytes(47),
         "data, hole, hole, data, hole, hole and a final hole chunk of 4 bytes"),
    ]  # fmt: skip
    # format version 2 (hole runs, one marker each); the version-1 vectors above stay
    specs_v2 = [
        ("v2-hello", 65536, {}, [("write", 0, b"hello, kmsfs\n")], b"hello, kmsfs\n",
         "format 2: one short final chunk, default chunk size"),
        ("v2-holes", 16, {},
         [("write", 0, b"abc"), ("truncate", 100), ("write", 50, b"XYZ")],
         b"abc" + bytes(47) + b"XYZ" + bytes(47),
         "format 2: data, hole run [1, 2], data, final hole run [4, 6] (4 bytes in chunk 6)"),
        ("v2-split", 16, {"kmsfs:fs-id": "golden-fs"},
         [("truncate", 200), ("write", 80, b"mid"), ("truncate", 150)],
         bytes(80) + b"mid" + bytes(67),
         "format 2: a run split by data (runs [0, 4] and [6, 8], data 5) and shrunk into:"
         " the final chunk 9 is 6 bytes of sealed zeros"),
    ]  # fmt: skip
    # format version 3: the data key wrapped to a recipient's RSA public key (OAEP-SHA-256)
    specs_v3 = [
        ("v3-recipient", 16, {"kmsfs:fs-id": "golden-fs"},
         [("write", 0, b"ingested, write-only"), ("truncate", 60)],
         b"ingested, write-only" + bytes(40),
         "format 3: a recipient slot (RSAES_OAEP_SHA_256 to recipient-rsa2048.pem), "
         "two data chunks and a final hole run"),
    ]  # fmt: skip
    vectors: dict[str, dict] = {}
    all_specs = (
        [(spec, 1) for spec in specs]
        + [(spec, 2) for spec in specs_v2]
        + [(spec, 3) for spec in specs_v3]
    )
    for (name, chunk_size, context, steps, plaintext, description), version in all_specs:
        fd = os.memfd_create(name)
        try:
            provider = _make(name, chunk_size, context, steps, fd, version)
            if name == "three-chunks":
                vectors[name] = _vector(fd, plaintext, description, chunk_size, name, context)
                # the same file, rewrapped under the second CMK (slot 1, generation 2)
                header = read_header(fd)
                blob = provider.second.wrap(_data_key(name), header.full_context)
                rewrap(fd, blob, OTHER_KEY_ARN, key_provider=provider)
                vectors["rewrapped"] = _vector(
                    fd, plaintext, "three-chunks after a rewrap: slot 1 active, generation 2",
                    chunk_size, name, context,
                )  # fmt: skip
            else:
                vectors[name] = _vector(fd, plaintext, description, chunk_size, name, context)
        finally:
            os.close(fd)
    return vectors


def _vector(
    fd: int, plaintext: bytes, description: str, chunk_size: int, name: str, context
) -> dict:
    ciphertext = os.pread(fd, 1 << 20, 0)
    return {
        "ciphertext": ciphertext,
        "plaintext": plaintext,
        "description": description,
        "chunk_size": chunk_size,
        "data_key": _data_key(name).hex(),
        "encryption_context": context,
        "file_id": ciphertext[16:32].hex() if ciphertext else None,
        "format_version": int.from_bytes(ciphertext[8:10], "big") if ciphertext else None,
        "sha256": hashlib.sha256(ciphertext).hexdigest(),
    }


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    manifest = {
        "about": "kmsfs format v1, v2 and v3 golden vectors; "
        "regenerate: tests/format/make_golden.py",
        "wrapping_keys": {
            "tag 1": TEST_WRAPPING_KEY.hex(),
            "tag 2": SECOND_WRAPPING_KEY.hex(),
            "recipient (v3)": f"{RECIPIENT_PRIVATE_KEY_PEM.name}, key ARN {TEST_RSA_KEY_ARN}",
        },
        "vectors": {},
    }
    for name, vector in build_vectors().items():
        (GOLDEN_DIR / f"{name}.kmsfs").write_bytes(vector.pop("ciphertext"))
        vector["plaintext"] = vector["plaintext"].hex()
        manifest["vectors"][name] = vector
    (GOLDEN_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(manifest['vectors'])} vectors to {GOLDEN_DIR}")


if __name__ == "__main__":
    main()
