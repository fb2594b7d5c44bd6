"""Inode numbers under churn, the kernel's late requests after an unlink, and paths near
PATH_MAX: what a long-lived mount meets (editors' create-and-rename saves, fsstress,
pjdfstest's ``*/03.t``)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsfs.fs.inodes import DIR_FD_CACHE
from tests.fs.helpers import Mount, run_as_child

_libc = ctypes.CDLL(None, use_errno=True)
NAME_MAX = 255
LONGEST_INLINE_NAME = 175  # encrypted names: the longest stored inline (255 bytes on disk)
PATH_MAX = 4096


def syncfs(path: Path) -> int:
    """syncfs(2) on the filesystem holding ``path``: 0, or the errno it failed with."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


def _create_and_unlink(workdir: Path, cycles: int) -> None:
    """``: > f; rm f`` ``cycles`` times, then the name still works and lists."""
    path = workdir / "f"
    for cycle in range(cycles):
        try:
            with open(path, "wb"):
                pass
            os.unlink(path)
        except OSError as error:
            raise AssertionError(f"cycle {cycle}: {error}") from None
    path.write_bytes(b"still fine")
    assert os.listdir(workdir) == ["f"]
    assert path.read_bytes() == b"still fine"


def test_one_name_created_and_unlinked_thousands_of_times(workdir: Path) -> None:
    """The backing filesystem reuses the inode number on every cycle, often while the kernel
    still knows the previous file. Numbers once grew by a generation per cycle and
    overflowed 64 bits after ~255 cycles: EIO, and the directory stopped listing."""
    _create_and_unlink(workdir, 3000)


@pytest.mark.slow
def test_one_name_created_and_unlinked_100000_times(workdir: Path) -> None:
    """The issue's figure: ~53 s in either naming mode on 2 idle cores, ~50-100 s busy."""
    _create_and_unlink(workdir, 100_000)


def test_syncfs_after_unlinking_written_files(workdir: Path) -> None:
    """After the last unlink of a written file the kernel writes back the timestamps it
    kept (SETATTR without a handle); answering ENOENT made the next syncfs() fail."""
    failures = []
    for round_ in range(20):
        for index in range(20):
            path = workdir / f"w{index}"
            with open(path, "wb") as file:
                file.write(b"data" * 100)
            os.unlink(path)
        code = syncfs(workdir)
        if code:
            failures.append((round_, errno.errorcode.get(code, code)))
    assert failures == []
    assert syncfs(workdir) == 0
    os.sync()


# ------------------------------------------------------------------ PATH_MAX
def _deep(letter: str, depth: int, length: int) -> str:
    """A relative path of ``depth`` components of ``length`` bytes."""
    return "/".join([letter * length] * depth)


def _outcome(function: Callable[[], object]) -> int:
    try:
        function()
    except OSError as error:
        return error.errno or -1
    return 0


def _exercise(base: Path, length: int) -> list[tuple[str, int]]:
    """Every operation on the longest paths made of ``length``-byte names (up to PATH_MAX - 1
    bytes) and on paths just over PATH_MAX, relative to ``base`` (the working directory, as
    pjdfstest does): what each returned."""
    os.chdir(base)
    results: list[tuple[str, int]] = []

    def run(label: str, function: Callable[[], object]) -> None:
        results.append((label, _outcome(function)))

    # with 255-byte names: 16 components, 4095 bytes, the longest path there is
    levels = PATH_MAX // (length + 1)
    for depth in range(1, levels):
        os.mkdir(_deep("d", depth, length))
        os.mkdir(_deep("e", depth, length))
    top = _deep("d", levels, length)
    assert PATH_MAX - (length + 1) < len(top) < PATH_MAX
    run("mkdir max", lambda: os.mkdir(top))
    # entries in these have paths as long as ``top``
    deep, other = _deep("d", levels - 1, length), _deep("e", levels - 1, length)

    def entry(letter: str, directory: str = deep) -> str:
        path = f"{directory}/{letter * length}"
        assert len(path) == len(top)
        return path

    file = entry("f")

    def create() -> None:
        fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"some data")
        finally:
            os.close(fd)

    def ftruncate() -> None:
        fd = os.open(file, os.O_RDWR)
        try:
            os.ftruncate(fd, 3)
        finally:
            os.close(fd)

    def read() -> bytes:
        with open(file, "rb") as opened:
            data = opened.read()
        assert data == b"som"
        return data

    run("create", create)
    run("stat", lambda: os.stat(file))
    run("chmod", lambda: os.chmod(file, 0o600))
    run("chown", lambda: os.chown(file, 1000, 1000))
    run("truncate", lambda: os.truncate(file, 5))
    run("ftruncate", ftruncate)
    run("read", read)
    run("setxattr", lambda: os.setxattr(file, "user.k", b"v"))
    run("getxattr", lambda: os.getxattr(file, "user.k"))
    run("listxattr", lambda: os.listxattr(file))
    run("removexattr", lambda: os.removexattr(file, "user.k"))
    run("utime", lambda: os.utime(file, (1, 2)))
    run("link", lambda: os.link(file, entry("l")))
    run("unlink link", lambda: os.unlink(entry("l")))
    run("rename across deep dirs", lambda: os.rename(file, entry("r", other)))
    run("rename back", lambda: os.rename(entry("r", other), file))
    run("readdir", lambda: os.listdir(deep))
    run("mkfifo", lambda: os.mkfifo(entry("p"), 0o644))
    run("mknod", lambda: os.mknod(entry("n"), 0o644 | stat.S_IFREG))
    run("symlink", lambda: os.symlink("some/target", entry("s")))
    run("readlink", lambda: os.readlink(entry("s")))
    run("listing", lambda: sorted(os.listdir(deep)))
    for letter in "fpns":
        run(f"unlink {letter}", lambda letter=letter: os.unlink(entry(letter)))
    run("rmdir max", lambda: os.rmdir(top))

    # one byte over: ENAMETOOLONG before anything reaches the filesystem
    os.mkdir(top)
    over = top + "/" + "y" * max(1, PATH_MAX - len(top) - 1)
    assert len(over) >= PATH_MAX
    run("mkdir over", lambda: os.mkdir(over))
    run("open over", lambda: os.open(over, os.O_CREAT | os.O_WRONLY, 0o644))
    run("stat over", lambda: os.stat(over))
    run("chmod over", lambda: os.chmod(over, 0o600))
    run("chown over", lambda: os.chown(over, 1, 1))
    run("truncate over", lambda: os.truncate(over, 0))
    run("unlink over", lambda: os.unlink(over))
    run("rmdir over", lambda: os.rmdir(over))
    run("mkfifo over", lambda: os.mkfifo(over))
    run("mknod over", lambda: os.mknod(over, 0o644 | stat.S_IFREG))
    run("symlink over", lambda: os.symlink("t", over))
    run("readlink over", lambda: os.readlink(over))
    run("setxattr over", lambda: os.setxattr(over, "user.k", b"v"))
    run("rename to over", lambda: os.rename(deep, over))
    run("link dir to over", lambda: os.link(top, over))
    os.rmdir(top)
    for depth in range(levels - 1, 0, -1):
        os.rmdir(_deep("d", depth, length))
        os.rmdir(_deep("e", depth, length))
    results.append(("all gone", len(os.listdir("."))))
    return results


@pytest.mark.parametrize("length", [NAME_MAX, LONGEST_INLINE_NAME])
def test_paths_near_path_max(workdir: Path, tmp_path: Path, length: int) -> None:
    """pjdfstest's ``*/03.t``: paths of up to PATH_MAX - 1 bytes made of long names work
    as on a plain directory (here: ext4), PATH_MAX bytes give ENAMETOOLONG. The mount must
    not build whole backing paths: the cipher directory's path plus every backing name
    exceeds PATH_MAX (plaintext names: by the prefix; encrypted names: 175-byte names
    are stored as 255-byte ones)."""
    expected = run_as_child(lambda: _exercise(tmp_path, length))
    assert all(code == 0 for label, code in expected if "over" not in label), expected
    assert all(code == errno.ENAMETOOLONG for label, code in expected if "over" in label)
    got = run_as_child(lambda: _exercise(workdir, length))
    assert got == expected


def _deep_chain(base: Path, depth: int) -> list[str]:
    """A chain of ``depth`` directories, a file in each written bottom-up, read top-down."""
    os.chdir(base)
    for _ in range(depth):
        os.mkdir("x")
        os.chdir("x")
    for level in range(depth, 0, -1):
        with open("f", "w") as file:
            file.write(str(level))
        os.chdir("..")
    contents = []
    for level in range(1, depth + 1):
        with open("x/" * level + "f") as file:
            contents.append(file.read())
    for level in range(depth, 0, -1):
        os.unlink("x/" * level + "f")
        os.rmdir("x/" * level)
    return contents


def test_deeper_than_the_descriptor_cache(shared_mount: Mount, workdir: Path) -> None:
    """1,500 nested directories: more than the mount keeps descriptors of, so directories
    are reopened from their nearest cached ancestor (walking up 1,500 levels, iteratively),
    and the mount's open descriptors stay bounded."""
    depth = 1500
    assert run_as_child(lambda: _deep_chain(workdir, depth)) == [
        str(level) for level in range(1, depth + 1)
    ]
    assert os.listdir(workdir) == []
    assert shared_mount.process is not None
    open_fds = len(os.listdir(f"/proc/{shared_mount.process.pid}/fd"))
    assert open_fds < DIR_FD_CACHE + 100
