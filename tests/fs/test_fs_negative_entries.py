"""LOOKUP of a name that is not there: a negative entry the kernel may cache (inode 0 with
an entry timeout, libfuse's convention), except in a directory whose entries the kernel
must not cache (a bound directory with forwarded callers); names made through the mount
after a failed lookup show at once."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from kmsfs.fs.ops import ENTRY_TIMEOUT, Operations
from kmsfs.fs.polling import BusyPoller


async def _anyone(directory_ino, ctx) -> None:
    return None


def _operations(tmp_path: Path, *, uncached: bool) -> tuple[Operations, list]:
    """An Operations with only what LOOKUP touches, its directory ``tmp_path``."""
    operations = Operations.__new__(Operations)
    operations.poller = BusyPoller(0)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    operations.inodes = SimpleNamespace(trim_dir_fds=lambda: None)
    forgotten: list = []
    operations.tree = SimpleNamespace(forget_name=forgotten.append)
    operations.key_bindings = SimpleNamespace(
        check_caller=_anyone, uncached=lambda directory_ino: uncached
    )
    entry = SimpleNamespace(backing=b"missing")
    operations._child_at = lambda parent, name: (os.fsencode(tmp_path), entry, dir_fd)
    return operations, [dir_fd, forgotten, entry]


def test_a_missing_name_is_a_negative_entry_the_kernel_may_keep(tmp_path: Path) -> None:
    operations, (dir_fd, forgotten, entry) = _operations(tmp_path, uncached=False)
    try:
        attrs = trio.run(operations.lookup, 1, b"missing", None)
    finally:
        os.close(dir_fd)
    assert attrs.st_ino == 0
    assert attrs.entry_timeout == ENTRY_TIMEOUT > 0
    assert forgotten == [entry]  # the name cache keeps nothing of it


def test_a_missing_name_of_an_uncached_directory_is_enoent(tmp_path: Path) -> None:
    """A bound directory's lookups are checked per caller: nothing the kernel may keep."""
    operations, (dir_fd, forgotten, entry) = _operations(tmp_path, uncached=True)
    try:
        with pytest.raises(pyfuse3.FUSEError) as raised:
            trio.run(operations.lookup, 1, b"missing", None)
    finally:
        os.close(dir_fd)
    assert raised.value.errno == errno.ENOENT
    assert forgotten == [entry]


def _make(kind: str, path: Path, other: Path) -> None:
    if kind == "create":
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    elif kind == "mkdir":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to("target")
    elif kind == "link":
        os.link(other, path)
    elif kind == "rename":
        other.rename(path)
    elif kind == "mkfifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))


@pytest.mark.parametrize(
    "kind", ["create", "mkdir", "symlink", "link", "rename", "mkfifo", "socket"]
)
def test_a_name_looked_up_missing_then_made_through_the_mount_shows(
    workdir: Path, kind: str
) -> None:
    path, other = workdir / "name", workdir / "other"
    other.write_bytes(b"x")
    for _ in range(2):  # twice: the second answer may come from the kernel's cache
        assert not os.path.lexists(path)
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    _make(kind, path, other)
    assert os.path.lexists(path)
    assert path.name in os.listdir(workdir)
    os.lstat(path)
    if kind in ("create", "link", "rename"):
        assert path.read_bytes() == (b"x" if kind != "create" else b"")
    # and gone again: removed through the mount, the kernel forgets it at once
    if kind == "mkdir":
        path.rmdir()
    else:
        path.unlink()
    assert not os.path.lexists(path)
    assert path.name not in os.listdir(workdir)
