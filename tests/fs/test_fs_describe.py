"""Messages about a file never fail themselves (they run inside error handling)."""

from __future__ import annotations

import errno
from types import SimpleNamespace

from kmsfs.fs.ops import Operations


def _unreachable(ino: int) -> bytes:
    raise OSError(errno.EMFILE, "Too many open files")  # opening a directory on the way


def test_a_file_whose_directory_cannot_be_opened_is_described_by_number() -> None:
    operations = Operations.__new__(Operations)  # only what _describe touches
    operations.inodes = SimpleNamespace(path=_unreachable)
    assert operations._describe(SimpleNamespace(ino=42)) == "inode 42 (no backing path now)"
