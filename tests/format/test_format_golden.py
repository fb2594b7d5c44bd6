"""Golden vectors: committed ciphertexts made with fixed keys must keep decrypting, and the
writer must keep producing them byte for byte (tests/format/make_golden.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from make_golden import GOLDEN_DIR, GoldenKeyProvider, build_vectors

import kmsfs.format as fmt
from kmsfs.format.file import EncryptedFile

MANIFEST = json.loads((GOLDEN_DIR / "manifest.json").read_text())
NAMES = sorted(MANIFEST["vectors"])


def test_the_vector_set_is_complete() -> None:
    assert NAMES == [
        "empty", "exact-chunks", "hello", "holes", "rewrapped", "three-chunks",
        "v2-hello", "v2-holes", "v2-split", "v3-recipient",
    ]  # fmt: skip
    for name in NAMES:
        vector = MANIFEST["vectors"][name]
        expected = None if name == "empty" else int(name[1]) if name[0] == "v" else 1
        assert vector["format_version"] == expected, name


@pytest.mark.parametrize("name", NAMES)
def test_committed_vector_decrypts_to_its_plaintext(name: str) -> None:
    vector = MANIFEST["vectors"][name]
    path = GOLDEN_DIR / f"{name}.kmsfs"
    ciphertext = path.read_bytes()
    assert hashlib.sha256(ciphertext).hexdigest() == vector["sha256"]
    plaintext = bytes.fromhex(vector["plaintext"])
    provider = GoldenKeyProvider()
    out = io.BytesIO()
    assert fmt.decrypt_stream(io.BytesIO(ciphertext), out, key_provider=provider) == len(plaintext)
    assert out.getvalue() == plaintext
    fd = os.open(path, os.O_RDONLY)
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert engine.read(0, len(plaintext) + 10) == plaintext
    finally:
        os.close(fd)
    with fmt.open_encrypted(path, "rb", key_provider=provider) as handle:
        assert handle.read() == plaintext
    report = fmt.verify(path, key_provider=provider)
    assert report.ok and not report.warnings
    info = fmt.inspect(path)
    assert info.plaintext_size == len(plaintext)
    if ciphertext:
        assert info.chunk_size == vector["chunk_size"] and info.file_id == vector["file_id"]
        assert info.encryption_context == vector["encryption_context"]
        assert info.key_generation == (2 if name == "rewrapped" else 1)
        assert info.slot_kind == ("RSAES_OAEP_SHA_256" if name == "v3-recipient" else "KMS_BLOB")
        assert info.format_version == vector["format_version"]


def test_the_writer_still_produces_the_committed_bytes() -> None:
    for name, vector in build_vectors().items():
        assert vector["ciphertext"] == (GOLDEN_DIR / f"{name}.kmsfs").read_bytes(), name


def test_golden_vectors_fail_under_the_wrong_wrapping_key() -> None:
    from format_testkit import FakeKeyProvider

    from kmsfs.errors import CorruptHeader

    wrong = FakeKeyProvider(bytes(32))
    with pytest.raises(CorruptHeader):
        fmt.decrypt_stream(
            io.BytesIO((GOLDEN_DIR / "hello.kmsfs").read_bytes()), io.BytesIO(), key_provider=wrong
        )
