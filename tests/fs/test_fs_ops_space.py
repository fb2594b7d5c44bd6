"""When the mount opens files with direct_io (short of space), without a mount; the
full-disk behaviour on a real mount is in test_fs_full_disk.py."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from kmsfs.fs import ops as ops_module
from kmsfs.fs.ops import LOW_SPACE, Operations

MIB = 1 << 20


class _Statvfs:
    """os.statvfs of the cipher directory, answering what the test sets."""

    def __init__(self) -> None:
        self.free = 0

    def __call__(self, path: object) -> SimpleNamespace:
        return SimpleNamespace(f_bavail=self.free // 4096, f_frsize=4096)


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> _Statvfs:
    fake = _Statvfs()
    monkeypatch.setattr(ops_module.os, "statvfs", fake)
    return fake


def bare_operations() -> Operations:
    operations = Operations.__new__(Operations)  # only what the open-mode choice touches
    operations.inodes = SimpleNamespace(root_fd=-1)
    operations.read_only = False
    operations._space_error = 0
    operations._free_at_space_error = 0
    return operations


def open_file(refs: int = 0, direct_handles: int = 0) -> SimpleNamespace:
    node = SimpleNamespace(cache_stale=False)
    return SimpleNamespace(node=node, refs=refs, direct_handles=direct_handles)


def test_below_low_space_new_writers_get_direct_io(statvfs: _Statvfs) -> None:
    operations = bare_operations()
    statvfs.free = LOW_SPACE
    assert operations._open_mode(open_file(), os.O_WRONLY) == (False, True)
    statvfs.free = LOW_SPACE - 4096
    assert operations._open_mode(open_file(), os.O_WRONLY) == (True, True)
    assert operations._open_mode(open_file(), os.O_RDWR) == (True, True)
    assert operations._open_mode(open_file(), os.O_RDONLY) == (False, True)  # readers: cached


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_after_a_failure_writers_get_direct_io_until_space_returns(
    statvfs: _Statvfs, code: int
) -> None:
    """statvfs shows room (a quota, or a filesystem that cannot give what it shows), yet
    storing failed: writers get direct_io until LOW_SPACE more than then is free."""
    operations = bare_operations()
    statvfs.free = 100 * MIB
    assert not operations._short_of_space()
    operations._space_failed(code)
    assert operations._short_of_space()
    statvfs.free = 100 * MIB + LOW_SPACE - 4096
    assert operations._short_of_space()
    statvfs.free = 90 * MIB  # a later failure with less free: measured from there
    operations._space_failed(code)
    statvfs.free = 90 * MIB + LOW_SPACE
    assert not operations._short_of_space()
    assert operations._space_error == 0
    statvfs.free = 100 * MIB
    assert not operations._short_of_space()


def test_a_file_is_all_direct_io_or_all_cached_while_open(statvfs: _Statvfs) -> None:
    operations = bare_operations()
    statvfs.free = 0
    # open in cached mode already (dirty pages possible): a new writer stays cached
    assert operations._open_mode(open_file(refs=1), os.O_WRONLY) == (False, True)
    # open with direct_io: every new handle joins, readers and with room again too
    statvfs.free = 100 * MIB
    assert operations._open_mode(open_file(refs=1, direct_handles=1), os.O_RDONLY) == (
        True,
        True,
    )
    # the first cached open after direct_io handles drops the file's cached pages, once
    statvfs.free = 0
    first = open_file()
    assert operations._open_mode(first, os.O_WRONLY) == (True, True)
    assert first.node.cache_stale
    statvfs.free = 100 * MIB
    assert operations._open_mode(first, os.O_RDONLY) == (False, False)
    assert operations._open_mode(first, os.O_RDONLY) == (False, True)


def test_a_read_only_mount_never_asks(statvfs: _Statvfs) -> None:
    operations = bare_operations()
    operations.read_only = True
    statvfs.free = 0
    assert operations._open_mode(open_file(), os.O_RDWR) == (False, True)
