"""Fixtures of the format tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from format_testkit import FakeKeyProvider  # noqa: E402

from kmsfs.format.file import EncryptedFile  # noqa: E402


@pytest.fixture
def provider() -> FakeKeyProvider:
    return FakeKeyProvider()


@pytest.fixture
def open_fd(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """open_fd(name) -> an O_RDWR fd on tmp_path/name (created), closed at teardown."""
    fds: list[int] = []

    def opener(name: str = "file.kmsfs") -> int:
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


@pytest.fixture
def make_file(
    open_fd: Callable[[str], int], provider: FakeKeyProvider
) -> Callable[..., tuple[int, bytes]]:
    """make_file(name, plaintext, chunk_size=64) -> (fd, plaintext) written and flushed."""

    def maker(
        name: str, plaintext: bytes, chunk_size: int = 64, **kwargs: object
    ) -> tuple[int, bytes]:
        fd = open_fd(name)
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id="alias/test", chunk_size=chunk_size, **kwargs
        )
        engine.write(0, plaintext)
        engine.close()
        return fd, plaintext

    return maker
