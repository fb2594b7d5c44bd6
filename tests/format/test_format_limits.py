"""The maximum file size: EFBIG-style refusal before anything changes."""

from __future__ import annotations

import os

import pytest
from format_testkit import TEST_KEY_ID, FakeKeyProvider, memfd

from kmsfs.errors import FileTooLarge
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import (
    DEFAULT_CHUNK_SIZE,
    MAX_CIPHERTEXT_SIZE,
    ciphertext_size,
    max_plaintext_size,
)

KEY_ID = TEST_KEY_ID


@pytest.mark.parametrize("chunk_size", [16, 4096, DEFAULT_CHUNK_SIZE, 1 << 24])
def test_the_maximum_is_the_largest_plaintext_whose_ciphertext_fits(chunk_size: int) -> None:
    limit = max_plaintext_size(chunk_size)
    assert ciphertext_size(limit, chunk_size) <= MAX_CIPHERTEXT_SIZE
    assert ciphertext_size(limit + 1, chunk_size) > MAX_CIPHERTEXT_SIZE
    assert MAX_CIPHERTEXT_SIZE == (1 << 44) - (1 << 12)  # ext4 with 4 KiB blocks


def test_huge_truncate_and_write_are_refused_before_anything_changes() -> None:
    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=FakeKeyProvider(), key_id=KEY_ID)
        engine.write(0, b"hello")
        engine.flush()
        before = os.pread(fd, 1 << 20, 0)
        limit = max_plaintext_size(engine.chunk_size)
        with pytest.raises(FileTooLarge):
            engine.truncate(999999999999999)  # pjdfstest ftruncate/12.t
        with pytest.raises(FileTooLarge):
            engine.truncate(limit + 1)
        with pytest.raises(FileTooLarge):
            engine.write(1 << 50, b"x")
        with pytest.raises(FileTooLarge):
            engine.write(limit, b"x")
        assert engine.size == 5 and engine.read(0, 10) == b"hello"
        engine.flush()
        assert os.pread(fd, 1 << 20, 0) == before
        engine.close()
    finally:
        os.close(fd)
