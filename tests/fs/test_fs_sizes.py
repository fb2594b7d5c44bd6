"""The maximum file size (EFBIG) and growth that costs nothing per byte of the gap."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.fs.helpers import Mount, MountFactory

GIB = 1 << 30


def test_huge_truncate_is_efbig(workdir: Path) -> None:
    path = workdir / "huge"
    path.write_bytes(b"data")
    with pytest.raises(OSError) as caught:
        os.truncate(path, 999999999999999)  # pjdfstest truncate/12.t, ftruncate/12.t
    assert caught.value.errno == errno.EFBIG
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as caught:
            os.ftruncate(fd, 999999999999999)
        assert caught.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data"


def test_a_write_past_the_maximum_reports_efbig(mounts: MountFactory) -> None:
    # a mount of its own: the refused write-back is a filesystem-wide write error that a
    # later syncfs() on the same mount may report, as on any filesystem
    mount = mounts.mount(mounts.init())
    path = mount.mnt / "far"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as caught:
            os.pwrite(fd, b"x", 1 << 50)  # refused at once or at fsync (writeback cache)
            os.fsync(fd)
        assert caught.value.errno == errno.EFBIG
    finally:
        try:
            os.close(fd)
        except OSError as error:  # a write-back error may surface here again
            assert error.errno == errno.EFBIG
    assert os.stat(mount.backing(path)).st_size == 0
    # the writer was told; the file then shows what is stored (not the size the kernel
    # cached for the refused write-back), as after a full disk
    assert os.stat(path).st_size == 0
    assert path.read_bytes() == b""


def test_truncate_to_4_gib_allocates_almost_nothing(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "sparse"
    path.write_bytes(b"")
    os.truncate(path, 4 * GIB)
    backing = shared_mount.backing(path)
    allocated = os.stat(backing).st_blocks * 512
    assert allocated <= 64 << 10, allocated
    assert os.stat(path).st_size == 4 * GIB
    with open(path, "rb") as handle:
        handle.seek(3 * GIB + 12345)
        assert handle.read(100000) == bytes(100000)
        handle.seek(GIB - 5)
        for _ in range(24):  # sequential: the mount's read-ahead helper joins in
            assert handle.read(1 << 20) == bytes(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 5 * GIB)  # a write past the end: a second gap of 1 GiB
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(backing).st_blocks * 512 <= 256 << 10
    with open(path, "rb") as handle:
        handle.seek(5 * GIB - 3)
        assert handle.read() == b"\0\0\0x"


def test_hole_prefix_finds_the_sparse_part_of_a_range(tmp_path: Path) -> None:
    from kmsfs.format.file import hole_prefix

    path = tmp_path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4 << 20)
        os.pwrite(fd, b"x", 2 << 20)
        assert hole_prefix(fd, 0, 1 << 20) == 1 << 20
        assert hole_prefix(fd, 1 << 20, 2 << 20) == 1 << 20  # up to the data
        assert hole_prefix(fd, 2 << 20, 1 << 20) == 0
        assert hole_prefix(fd, (2 << 20) + 8192, 1 << 20) == 1 << 20  # holes to the end
    finally:
        os.close(fd)
