"""Every filesystem operation at a real mountpoint, checked against ext4 semantics.

Most tests share one session mount (64 KiB chunks) and work in a fresh directory of it
(``workdir``); the ones that remount use a mount of their own.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fs.helpers import CHUNK, Mount, MountFactory, backing_of, drop_page_cache, umask

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def errno_of(function, *args, **kwargs) -> int:
    with pytest.raises(OSError) as caught:
        function(*args, **kwargs)
    return caught.value.errno


def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (so misplaced chunks are noticed)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def read_cold(path: Path) -> bytes:
    """Read a file through the mount with its page cache dropped first."""
    drop_page_cache(path)
    return path.read_bytes()


def ciphertext_size(plain: int, chunk: int = CHUNK) -> int:
    if plain == 0:
        return 0
    full, rest = divmod(plain, chunk)
    return 2048 + full * (chunk + 28) + (rest + 28 if rest else 0)


# ------------------------------------------------------------------ attributes
def test_create_write_read_and_stat_match_plaintext(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "file"
    data = pattern(3 * CHUNK + 17)
    with umask(0o022):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        assert os.write(fd, data) == len(data)
        assert os.pread(fd, 100, CHUNK - 50) == data[CHUNK - 50 : CHUNK + 50]
        assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid, st.st_nlink, st.st_size) == (0, 0, 1, len(data))
    assert read_cold(path) == data
    backing = os.stat(shared_mount.backing(path))
    assert backing.st_size == ciphertext_size(len(data))
    assert backing.st_ino == st.st_ino
    assert (backing.st_mode, backing.st_uid, backing.st_gid) == (st.st_mode, 0, 0)
    assert abs(st.st_mtime_ns - backing.st_mtime_ns) < 1_000_000_000
    assert os.stat(path).st_ino == st.st_ino


def test_mtime_of_written_files_survives_remount(mounts: MountFactory) -> None:
    """A documented limit: with the writeback cache the kernel stamps mtime at write(),
    while the backing file gets its mtime when kmsfs writes the data back a moment
    later, and that is what a remount shows. It may be later by that delay, never much
    earlier, and by well under two seconds."""
    mount = mounts.mount()
    shown = {}
    for index in range(5):
        path = mount.mnt / f"f{index}"
        path.write_bytes(b"x" * (index * 30_000 + 1))
        shown[path.name] = os.stat(path).st_mtime_ns
    mount.remount()
    after = {name: os.stat(mount.mnt / name).st_mtime_ns for name in shown}
    for name, before in shown.items():
        assert -50_000_000 <= after[name] - before < 2_000_000_000, (name, before, after[name])


def test_inode_numbers_stable_across_renames_and_links(workdir: Path) -> None:
    path = workdir / "a"
    path.write_bytes(b"x")
    ino = os.stat(path).st_ino
    os.rename(path, workdir / "b")
    assert os.stat(workdir / "b").st_ino == ino
    os.link(workdir / "b", workdir / "c")
    assert os.stat(workdir / "c").st_ino == ino
    (workdir / "d").mkdir()
    os.rename(workdir / "c", workdir / "d" / "c")
    assert os.stat(workdir / "d" / "c").st_ino == ino
    assert os.stat(workdir / "b").st_ino == ino


def test_chmod_exact_modes(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    for mode in (0o600, 0o4755, 0o2711, 0o000, 0o777, 0o644):
        os.chmod(path, mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert stat.S_IMODE(os.stat(shared_mount.backing(path)).st_mode) == mode
    directory = workdir / "d"
    directory.mkdir()
    for mode in (0o1777, 0o500, 0o000, 0o755):
        os.chmod(directory, mode)
        assert stat.S_IMODE(os.stat(directory).st_mode) == mode
        assert stat.S_IMODE(os.stat(shared_mount.backing(directory)).st_mode) == mode
    # an open file: fchmod
    with open(path, "rb") as handle:
        os.fchmod(handle.fileno(), 0o640)
        assert stat.S_IMODE(os.fstat(handle.fileno()).st_mode) == 0o640


def test_chown_as_root(workdir: Path, shared_mount: Mount) -> None:
    assert os.geteuid() == 0
    path = workdir / "f"
    path.write_bytes(b"data")
    os.chown(path, 1234, 1234)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    backing = os.stat(shared_mount.backing(path))
    assert (backing.st_uid, backing.st_gid) == (1234, 1234)
    os.chown(path, -1, 99)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 99)
    os.chown(path, 42, -1)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (42, 99)
    link = workdir / "l"
    os.symlink("f", link)
    os.chown(link, 555, 556, follow_symlinks=False)
    assert (os.lstat(link).st_uid, os.lstat(link).st_gid) == (555, 556)
    assert os.stat(path).st_uid == 42
    assert path.read_bytes() == b"data"


def test_utimens_nanoseconds(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    atime, mtime = 1_234_567_890_123_456_789, 1_111_111_111_222_333_444
    os.utime(path, ns=(atime, mtime))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    backing = os.stat(shared_mount.backing(path))
    assert (backing.st_atime_ns, backing.st_mtime_ns) == (atime, mtime)
    # utime on a file with unflushed writes: closing must not move mtime again
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"more data", 4)
        os.utime(fd, ns=(atime + 1, mtime + 1))
    finally:
        os.close(fd)
    time.sleep(1.1)
    st = os.stat(path)
    assert st.st_mtime_ns == mtime + 1
    assert os.stat(shared_mount.backing(path)).st_mtime_ns == mtime + 1
    assert read_cold(path) == b"datamore data"
    # a symlink's own times
    link = workdir / "l"
    os.symlink("f", link)
    os.utime(link, ns=(5_000_000_001, 6_000_000_002), follow_symlinks=False)
    assert os.lstat(link).st_mtime_ns == 6_000_000_002
    assert os.stat(path).st_mtime_ns == mtime + 1
    # "now"
    before = time.time_ns()
    os.utime(path)
    assert os.stat(path).st_mtime_ns >= before - 10_000_000


def test_write_updates_mtime_and_chmod_updates_ctime(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    os.utime(path, ns=(10**18, 10**18))
    with open(path, "r+b") as handle:
        handle.write(b"x")
    time.sleep(1.1)
    assert abs(os.stat(path).st_mtime - time.time()) < 30
    ctime = os.stat(path).st_ctime_ns
    time.sleep(0.02)
    os.chmod(path, 0o600)
    assert os.stat(path).st_ctime_ns > ctime


@pytest.mark.parametrize("use_fd", [False, True], ids=["truncate", "ftruncate"])
def test_truncate_shrink_and_grow(workdir: Path, use_fd: bool) -> None:
    path = workdir / "f"
    data = pattern(3 * CHUNK + 100, seed=1)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:

        def truncate(size: int) -> None:
            if use_fd:
                os.ftruncate(fd, size)
            else:
                os.truncate(path, size)

        expected = data
        for size in (CHUNK + 5, CHUNK, CHUNK - 1, 5 * CHUNK + 3, 2 * CHUNK + 1, 1, 0, 70_000):
            truncate(size)
            expected = expected[:size] + bytes(max(0, size - len(expected)))
            assert os.stat(path).st_size == size
            assert os.pread(fd, size + 10, 0) == expected
            assert read_cold(path) == expected
        os.pwrite(fd, b"tail", 70_000)
        expected += b"tail"
    finally:
        os.close(fd)
    assert read_cold(path) == expected


def test_truncate_not_open_file_to_zero_and_up(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    path.write_bytes(b"abc" * 1000)
    os.truncate(path, 0)
    assert os.stat(path).st_size == 0
    assert os.stat(shared_mount.backing(path)).st_size == 0
    os.truncate(path, 10)
    assert read_cold(path) == bytes(10)
    assert os.stat(shared_mount.backing(path)).st_size == ciphertext_size(10)


# ------------------------------------------------------------------ directories
def test_readdir_names_and_stats(workdir: Path) -> None:
    (workdir / "file").write_bytes(b"12345")
    (workdir / "empty").write_bytes(b"")
    (workdir / "dir").mkdir()
    os.symlink("file", workdir / "link")
    os.mkfifo(workdir / "fifo")
    assert sorted(os.listdir(workdir)) == ["dir", "empty", "fifo", "file", "link"]
    seen = {}
    with os.scandir(workdir) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            assert st.st_ino == entry.inode()
            seen[entry.name] = (stat.S_IFMT(st.st_mode), st.st_size if entry.is_file() else None)
    assert seen["file"] == (stat.S_IFREG, 5)
    assert seen["empty"] == (stat.S_IFREG, 0)
    assert seen["dir"][0] == stat.S_IFDIR
    assert seen["link"][0] == stat.S_IFLNK
    assert seen["fifo"][0] == stat.S_IFIFO
    assert os.lstat(workdir / "link").st_size == len("file")


def test_readdir_thousand_entries(workdir: Path) -> None:
    big = workdir / "big"
    big.mkdir()
    for index in range(1000):
        (big / f"entry-{index:04d}").write_bytes(b"x" * (index % 13))
    names = os.listdir(big)
    assert len(names) == 1000
    assert sorted(names) == [f"entry-{index:04d}" for index in range(1000)]
    with os.scandir(big) as entries:
        sizes = {entry.name: entry.stat().st_size for entry in entries}
    assert all(sizes[f"entry-{index:04d}"] == index % 13 for index in range(1000))
    # a listing that starts over after part of it was read (telldir/seekdir-like)
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(os.listdir(fd)) == 1000
        assert len(os.listdir(fd)) == 1000
    finally:
        os.close(fd)


def test_config_file_hidden_and_untouchable(shared_mount: Mount) -> None:
    config = shared_mount.cipher / "kmsfs.conf"
    original = config.read_bytes()
    assert "kmsfs.conf" not in os.listdir(shared_mount.mnt)
    assert errno_of(os.stat, shared_mount.mnt / "kmsfs.conf") == errno.ENOENT
    # a file of that name at the mountpoint is refused or is another file: never the config
    try:
        fd = os.open(shared_mount.mnt / "kmsfs.conf", os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as error:
        assert error.errno in (errno.EPERM, errno.EACCES)
    else:
        try:
            os.write(fd, b"not a config")
        finally:
            os.close(fd)
        assert (shared_mount.mnt / "kmsfs.conf").read_bytes() == b"not a config"
        os.unlink(shared_mount.mnt / "kmsfs.conf")
    assert config.read_bytes() == original


def test_mkdir_exact_modes_with_umask_zero(workdir: Path, shared_mount: Mount) -> None:
    # as on ext4: mkdir keeps the sticky bit and every rwx bit, and drops set-group-ID
    # (which a directory only inherits from a set-group-ID parent)
    cases = {0o755: 0o755, 0o700: 0o700, 0o1777: 0o1777, 0o000: 0o000, 0o111: 0o111}
    cases |= {0o2775: 0o775, 0o3777: 0o1777}
    with umask(0):
        for index, (mode, expected) in enumerate(cases.items()):
            path = workdir / f"d{index}"
            os.mkdir(path, mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == expected, oct(mode)
            assert stat.S_IMODE(os.stat(shared_mount.backing(path)).st_mode) == expected
    with umask(0o027):
        os.mkdir(workdir / "masked", 0o777)
    assert stat.S_IMODE(os.stat(workdir / "masked").st_mode) == 0o750
    assert errno_of(os.mkdir, workdir / "d0") == errno.EEXIST
    assert errno_of(os.mkdir, workdir / "missing" / "x") == errno.ENOENT
    # a new directory has nlink 2 and raises its parent's
    nlink = os.stat(workdir).st_nlink
    os.mkdir(workdir / "child")
    assert os.stat(workdir / "child").st_nlink == 2
    assert os.stat(workdir).st_nlink == nlink + 1


def test_setgid_directory_gives_its_group(workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    os.chown(shared, 0, 1234)
    os.chmod(shared, 0o2775)
    (shared / "file").write_bytes(b"x")
    os.mkdir(shared / "sub", 0o755)
    assert os.stat(shared / "file").st_gid == 1234
    assert os.stat(shared / "sub").st_gid == 1234


def test_setgid_directory_is_inherited_by_subdirectories(workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    os.chown(shared, 0, 1234)
    os.chmod(shared, 0o2775)
    with umask(0o022):
        os.mkdir(shared / "sub", 0o755)
    assert stat.S_IMODE(os.stat(shared / "sub").st_mode) == 0o2755


def test_rmdir(workdir: Path) -> None:
    (workdir / "d").mkdir()
    (workdir / "d" / "f").write_bytes(b"x")
    assert errno_of(os.rmdir, workdir / "d") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, workdir / "d" / "f") == errno.ENOTDIR
    assert errno_of(os.rmdir, workdir / "nothing") == errno.ENOENT
    os.unlink(workdir / "d" / "f")
    os.rmdir(workdir / "d")
    assert not (workdir / "d").exists()
    assert os.listdir(workdir) == []


def test_open_directory_removed_still_answers_fstat(workdir: Path) -> None:
    directory = workdir / "d"
    directory.mkdir()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(directory)
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_nlink == 0
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


def test_fsyncdir_and_fsync(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"z" * 100_000)
        os.fsync(fd)
        assert os.stat(shared_mount.backing(path)).st_size == ciphertext_size(100_000)
        os.write(fd, b"y")
        os.fdatasync(fd)
        assert os.stat(shared_mount.backing(path)).st_size == ciphertext_size(100_001)
    finally:
        os.close(fd)
    directory = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ----------------------------------------------------------------- open modes
def test_open_trunc_append_excl(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(pattern(2 * CHUNK + 3))
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"fresh")
    finally:
        os.close(fd)
    assert read_cold(path) == b"fresh"

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"+tail")
        os.pwrite(fd, b"!", 0)  # Linux: pwrite on O_APPEND appends too
    finally:
        os.close(fd)
    assert read_cold(path) == b"fresh+tail!"

    assert errno_of(os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    fd = os.open(workdir / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert errno_of(os.open, workdir / "missing", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, workdir, os.O_WRONLY) == errno.EISDIR
    fd = os.open(path, os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EBADF
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert errno_of(os.read, fd, 1) == errno.EBADF
    finally:
        os.close(fd)


def test_open_trunc_really_truncates(mounts: MountFactory) -> None:
    mount = mounts.mount()
    path = mount.mnt / "f"
    path.write_bytes(b"A" * 100 + b"B" * (3 * CHUNK))
    with open(path, "wb") as handle:  # O_WRONLY | O_CREAT | O_TRUNC, as the shell's '>'
        handle.write(b"hi")
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        os.pwrite(fd, b"end", 2 * CHUNK)  # grow the file again: the start must be zeros
        assert os.pread(fd, 5, 0) == bytes(5)
    finally:
        os.close(fd)
    mount.remount()
    assert path.read_bytes() == bytes(2 * CHUNK) + b"end"


@pytest.mark.parametrize(
    "offset,length",
    [(CHUNK + 100, 10), (2 * CHUNK - 5, 10), (0, 1), (3 * CHUNK + 10, 7), (CHUNK, CHUNK)],
)
def test_write_only_open_keeps_surrounding_bytes(workdir: Path, offset: int, length: int) -> None:
    path = workdir / "f"
    data = bytearray(pattern(3 * CHUNK + 20, seed=2))
    path.write_bytes(data)
    drop_page_cache(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"W" * length, offset)
    finally:
        os.close(fd)
    data[offset : offset + length] = b"W" * length
    assert path.read_bytes() == bytes(data)
    assert read_cold(path) == bytes(data)


def test_read_past_end_and_holes(workdir: Path) -> None:
    path = workdir / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert os.pread(fd, 10, 0) == b""
        os.pwrite(fd, b"end", 5 * CHUNK + 7)
        assert os.fstat(fd).st_size == 5 * CHUNK + 10
        assert os.pread(fd, 100, 5 * CHUNK + 7) == b"end"
        assert os.pread(fd, 10, 10 * CHUNK) == b""
        assert os.pread(fd, 2 * CHUNK, CHUNK - 3) == bytes(2 * CHUNK)
    finally:
        os.close(fd)
    assert read_cold(path) == bytes(5 * CHUNK + 7) + b"end"


def test_posix_fallocate_extends_with_zeros(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(b"head")
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 3 * CHUNK + 1)
        assert os.fstat(fd).st_size == 3 * CHUNK + 1
    finally:
        os.close(fd)
    assert read_cold(path) == b"head" + bytes(3 * CHUNK + 1 - 4)


# ----------------------------------------------------------------- unlink / rename
def test_unlink_while_open_keeps_working_until_closed(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    data = pattern(2 * CHUNK + 9, seed=3)
    path.write_bytes(data)
    backing = shared_mount.backing(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert not backing.exists()
        assert os.listdir(workdir) == []
        assert os.fstat(fd).st_size == len(data)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"AFTER-UNLINK", CHUNK - 4)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        expected = data[: CHUNK - 4] + b"AFTER-UNLINK" + data[CHUNK + 8 :]
        assert os.pread(fd, len(data) + 10, 0) == expected
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        os.fchmod(fd, 0o600)
        # a new file of the same name is another file
        path.write_bytes(b"new")
        assert os.pread(fd, 100, 0) == expected[:10]
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    assert errno_of(os.unlink, workdir / "missing") == errno.ENOENT
    assert errno_of(os.unlink, workdir) in (errno.EISDIR, errno.EPERM)


def test_rename_replace(workdir: Path, shared_mount: Mount) -> None:
    a, b = workdir / "a", workdir / "b"
    a.write_bytes(b"content of a")
    b.write_bytes(b"content of b, longer")
    ino, replaced = os.stat(a).st_ino, os.stat(b).st_ino
    os.rename(a, b)
    assert not a.exists()
    assert os.stat(b).st_ino == ino
    assert read_cold(b) == b"content of a"
    assert os.listdir(workdir) == ["b"]
    with pytest.raises(FileNotFoundError):  # the replaced file is gone from the backing tree
        backing_of(shared_mount.cipher, replaced)
    os.rename(b, b)  # to itself: nothing happens
    assert b.read_bytes() == b"content of a"
    assert errno_of(os.rename, workdir / "missing", b) == errno.ENOENT


def test_rename_over_a_file_with_another_hard_link(workdir: Path) -> None:
    wrong = []
    for index in range(16):  # the stale link is picked from a set: try it many times
        moved, replaced, other = (workdir / f"{kind}{index}" for kind in ("m", "r", "o"))
        moved.write_bytes(b"moved " * 20)
        replaced.write_bytes(b"replaced")
        os.link(replaced, other)
        os.rename(moved, replaced)
        drop_page_cache(other)
        if other.read_bytes() != b"replaced":
            wrong.append(f"{other.name} reads {other.read_bytes()[:12]!r}")
        with open(other, "r+b") as handle:
            handle.write(b"REPLACED")
        drop_page_cache(replaced)
        if replaced.read_bytes() != b"moved " * 20:
            wrong.append(f"writing {other.name} changed {replaced.name}")
    assert wrong == []


def test_rename_noreplace(workdir: Path) -> None:
    a, b, c = workdir / "a", workdir / "b", workdir / "c"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    assert errno_of(renameat2, a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert (a.read_bytes(), b.read_bytes()) == (b"A", b"B")
    renameat2(a, c, RENAME_NOREPLACE)
    assert not a.exists() and c.read_bytes() == b"A"


def test_rename_exchange(workdir: Path) -> None:
    a, b = workdir / "a", workdir / "b"
    a.write_bytes(b"A" * 100_000)
    b.write_bytes(b"B")
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert (os.stat(a).st_ino, os.stat(b).st_ino) == (ino_b, ino_a)
    assert read_cold(a) == b"B"
    assert read_cold(b) == b"A" * 100_000
    # a directory with a file, and the paths below it
    d = workdir / "d"
    d.mkdir()
    (d / "inner").write_bytes(b"inner")
    renameat2(a, d, RENAME_EXCHANGE)
    assert a.is_dir() and (a / "inner").read_bytes() == b"inner"
    assert d.read_bytes() == b"B"
    assert errno_of(renameat2, workdir / "missing", a, RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(renameat2, b, workdir / "missing", RENAME_EXCHANGE) == errno.ENOENT


def test_rename_directories(workdir: Path) -> None:
    top = workdir / "top"
    (top / "sub" / "deep").mkdir(parents=True)
    (top / "sub" / "deep" / "f").write_bytes(b"deep file")
    fd = os.open(top / "sub" / "deep" / "f", os.O_RDWR)
    try:
        os.rename(top, workdir / "moved")
        assert (workdir / "moved" / "sub" / "deep" / "f").read_bytes() == b"deep file"
        os.pwrite(fd, b"DEEP", 0)
        other = workdir / "other"
        other.mkdir()
        os.rename(workdir / "moved" / "sub", other / "sub2")
        assert read_cold(other / "sub2" / "deep" / "f") == b"DEEP file"
    finally:
        os.close(fd)
    (workdir / "empty").mkdir()
    (workdir / "full").mkdir()
    (workdir / "full" / "x").write_bytes(b"x")
    (workdir / "afile").write_bytes(b"f")
    assert errno_of(os.rename, workdir / "other", workdir / "full") in (
        errno.ENOTEMPTY,
        errno.EEXIST,
    )
    assert errno_of(os.rename, workdir / "other", workdir / "other" / "sub2" / "in") == errno.EINVAL
    assert errno_of(os.rename, workdir / "afile", workdir / "full") == errno.EISDIR
    assert errno_of(os.rename, workdir / "full", workdir / "afile") == errno.ENOTDIR
    nlink = os.stat(workdir).st_nlink
    os.rename(workdir / "full", workdir / "other" / "full")
    assert os.stat(workdir).st_nlink == nlink - 1
    assert (workdir / "other" / "full" / "x").read_bytes() == b"x"


def test_rename_directory_over_empty_directory(workdir: Path) -> None:
    (workdir / "src" / "sub").mkdir(parents=True)
    (workdir / "src" / "sub" / "f").write_bytes(b"moved")
    (workdir / "empty").mkdir()
    ino = os.stat(workdir / "src").st_ino
    os.rename(workdir / "src", workdir / "empty")
    assert os.stat(workdir / "empty").st_ino == ino
    assert (workdir / "empty" / "sub" / "f").read_bytes() == b"moved"
    assert os.listdir(workdir) == ["empty"]
    (workdir / "empty2").mkdir()
    renameat2(workdir / "empty2", workdir / "empty" / "sub", RENAME_EXCHANGE)
    assert (workdir / "empty2" / "f").read_bytes() == b"moved"
    assert os.listdir(workdir / "empty" / "sub") == []
    (workdir / "third").mkdir()
    os.rename(workdir / "third", workdir / "empty" / "sub")  # sub is the empty one now
    assert sorted(os.listdir(workdir)) == ["empty", "empty2"]


def test_rename_over_open_file(workdir: Path) -> None:
    old, new = workdir / "target", workdir / "source"
    old_data, new_data = pattern(CHUNK + 50, seed=4), pattern(2 * CHUNK, seed=5)
    old.write_bytes(old_data)
    new.write_bytes(new_data)
    fd = os.open(old, os.O_RDWR)
    try:
        os.rename(new, old)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(old_data) + 10, 0) == old_data
        assert read_cold(old) == new_data
        os.pwrite(fd, b"still mine", 0)  # the replaced file keeps working
        assert os.pread(fd, 10, 0) == b"still mine"
    finally:
        os.close(fd)
    assert read_cold(old) == new_data
    assert os.listdir(workdir) == ["target"]


# ------------------------------------------------------------------ links
def test_hard_links(workdir: Path, shared_mount: Mount) -> None:
    a, b = workdir / "a", workdir / "b"
    a.write_bytes(pattern(CHUNK + 10, seed=6))
    os.link(a, b)
    assert os.stat(a).st_nlink == 2 and os.stat(b).st_nlink == 2
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(shared_mount.backing(a)).st_nlink == 2
    with open(b, "r+b") as handle:
        handle.seek(CHUNK - 2)
        handle.write(b"via b")
    expected = bytearray(pattern(CHUNK + 10, seed=6))
    expected[CHUNK - 2 : CHUNK + 3] = b"via b"
    assert read_cold(a) == bytes(expected)
    # both open at once: one content
    fa, fb = os.open(a, os.O_RDWR), os.open(b, os.O_RDWR)
    try:
        os.pwrite(fa, b"A" * 5, 0)
        assert os.pread(fb, 5, 0) == b"AAAAA"
        os.pwrite(fb, b"tail-b", CHUNK + 10)
        assert os.fstat(fa).st_size == CHUNK + 16
        assert os.pread(fa, 100, CHUNK + 10) == b"tail-b"
    finally:
        os.close(fa)
        os.close(fb)
    expected[0:5] = b"AAAAA"
    expected += b"tail-b"
    # a third link in another directory
    (workdir / "d").mkdir()
    os.link(b, workdir / "d" / "c")
    assert os.stat(a).st_nlink == 3
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    assert read_cold(b) == bytes(expected)
    os.unlink(b)
    assert os.stat(workdir / "d" / "c").st_nlink == 1
    assert read_cold(workdir / "d" / "c") == bytes(expected)
    assert errno_of(os.link, workdir / "d", workdir / "dlink") == errno.EPERM
    assert errno_of(os.link, workdir / "d" / "c", workdir / "d") == errno.EEXIST


def test_symlink_readlink(workdir: Path) -> None:
    (workdir / "target").write_bytes(b"through the link")
    os.symlink("target", workdir / "rel")
    os.symlink("/nonexistent/dangling/" + "x" * 200, workdir / "dangling")
    assert os.readlink(workdir / "rel") == "target"
    assert os.readlink(workdir / "dangling") == "/nonexistent/dangling/" + "x" * 200
    assert stat.S_ISLNK(os.lstat(workdir / "rel").st_mode)
    assert os.lstat(workdir / "dangling").st_size == len("/nonexistent/dangling/") + 200
    assert (workdir / "rel").read_bytes() == b"through the link"
    assert errno_of(os.stat, workdir / "dangling") == errno.ENOENT
    assert errno_of(os.readlink, workdir / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", workdir / "rel") == errno.EEXIST


# ------------------------------------------------------------------ special files
def test_mkfifo(workdir: Path, shared_mount: Mount) -> None:
    fifo = workdir / "fifo"
    with umask(0):
        os.mkfifo(fifo, 0o640)
    st = os.stat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_ISFIFO(os.lstat(shared_mount.backing(fifo)).st_mode)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b"through the fifo")
        assert os.read(reader, 100) == b"through the fifo"
    finally:
        os.close(writer)
        os.close(reader)
    os.unlink(fifo)


def test_unix_socket(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "sock"
    assert len(os.fsencode(path)) < 108
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen(1)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_ISSOCK(os.lstat(shared_mount.backing(path)).st_mode)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(path))
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(10) == b"ping"
        finally:
            client.close()
    finally:
        server.close()
    os.unlink(path)
    assert not path.exists()


def test_statfs_from_backing_fs(shared_mount: Mount) -> None:
    mounted = os.statvfs(shared_mount.mnt)
    backing = os.statvfs(shared_mount.cipher)
    assert mounted.f_bsize == backing.f_bsize
    assert mounted.f_frsize == backing.f_frsize
    assert mounted.f_blocks == backing.f_blocks
    assert mounted.f_files == backing.f_files
    assert abs(mounted.f_bfree - backing.f_bfree) <= backing.f_blocks // 100
    assert abs(mounted.f_bavail - backing.f_bavail) <= backing.f_blocks // 100
    assert abs(mounted.f_ffree - backing.f_ffree) <= 10_000
    assert 0 < mounted.f_namemax <= 255


# ------------------------------------------------------------------ xattrs
def test_user_xattrs_encrypted(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    name, value = "user.secretcolour", b"MARKER-ultramarine-9f8e7d"
    baseline = set(os.listxattr(shared_mount.backing(path)))
    os.setxattr(path, name, value)
    assert os.getxattr(path, name) == value
    assert name in os.listxattr(path)
    assert errno_of(os.setxattr, path, name, b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, path, "user.none", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(path, name, b"v2", os.XATTR_REPLACE)
    assert os.getxattr(path, name) == b"v2"
    os.setxattr(path, name, value)
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.empty") == b""
    big = pattern(3000, seed=7)
    os.setxattr(path, "user.big", big)
    assert os.getxattr(path, "user.big") == big
    assert sorted(os.listxattr(path)) == ["user.big", "user.empty", name]

    backing = shared_mount.backing(path)
    stored = set(os.listxattr(backing)) - baseline
    assert len(stored) == 3
    for stored_name in stored:
        assert "secretcolour" not in stored_name and "empty" not in stored_name
        stored_value = os.getxattr(backing, stored_name)
        assert value not in stored_value and b"ultramarine" not in stored_value
        assert big not in stored_value

    # through an open fd, on a directory
    with open(path, "rb") as handle:
        assert os.getxattr(handle.fileno(), name) == value
        os.setxattr(handle.fileno(), "user.viafd", b"fd")
    assert os.getxattr(path, "user.viafd") == b"fd"
    os.setxattr(workdir, "user.dirattr", b"on a dir")
    assert os.getxattr(workdir, "user.dirattr") == b"on a dir"

    os.removexattr(path, name)
    assert errno_of(os.getxattr, path, name) == errno.ENODATA
    assert errno_of(os.removexattr, path, name) == errno.ENODATA
    assert name not in os.listxattr(path)
    assert errno_of(os.setxattr, path, "trusted.x", b"1") in (errno.EOPNOTSUPP, errno.EPERM)
    assert errno_of(os.getxattr, path, "trusted.x") in (errno.ENODATA, errno.EOPNOTSUPP)


def test_xattr_survives_rename_and_is_bound_to_its_name(workdir: Path, shared_mount: Mount) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    baseline = set(os.listxattr(shared_mount.backing(path)))
    os.setxattr(path, "user.a", b"value a")
    os.setxattr(path, "user.b", b"value b")
    os.rename(path, workdir / "g")
    assert os.getxattr(workdir / "g", "user.a") == b"value a"
    # swapping two stored values on the backing file must be detected, not served
    backing = shared_mount.backing(workdir / "g")
    names = sorted(set(os.listxattr(backing)) - baseline)
    assert len(names) == 2
    values = [os.getxattr(backing, stored) for stored in names]
    os.setxattr(backing, names[0], values[1])
    os.setxattr(backing, names[1], values[0])
    for plain in ("user.a", "user.b"):
        assert errno_of(os.getxattr, workdir / "g", plain) == errno.EIO
    assert shared_mount.alive


def test_access(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(b"data")
    os.chmod(path, 0o644)
    assert os.access(path, os.F_OK)
    assert os.access(path, os.R_OK | os.W_OK)
    assert not os.access(path, os.X_OK)  # root needs one x bit
    os.chmod(path, 0o744)
    assert os.access(path, os.X_OK)
    assert not os.access(workdir / "missing", os.F_OK)
    assert os.access(workdir, os.R_OK | os.W_OK | os.X_OK)


# ------------------------------------------------------------------ mmap
def test_mmap_shared_writable(mounts: MountFactory) -> None:
    mount = mounts.mount()
    path = mount.mnt / "mapped"
    data = bytearray(pattern(3 * CHUNK + 1000, seed=8))
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            assert mm[CHUNK - 3 : CHUNK + 3] == data[CHUNK - 3 : CHUNK + 3]
            for offset in (0, CHUNK - 4, 2 * CHUNK + 7, len(data) - 8):
                mm[offset : offset + 8] = b"MMAPDATA"
                data[offset : offset + 8] = b"MMAPDATA"
            mm.flush()
        # grow the file and map the new part
        os.ftruncate(fd, 5 * CHUNK)
        data += bytes(5 * CHUNK - len(data))
        with mmap.mmap(fd, 5 * CHUNK, mmap.MAP_SHARED) as mm:
            mm[4 * CHUNK + 1 : 4 * CHUNK + 9] = b"GROWNMAP"
            data[4 * CHUNK + 1 : 4 * CHUNK + 9] = b"GROWNMAP"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(data)
    assert read_cold(path) == bytes(data)
    mount.remount()
    assert path.read_bytes() == bytes(data)


def test_mmap_write_without_msync_reaches_file_at_close(mounts: MountFactory) -> None:
    mount = mounts.mount()
    path = mount.mnt / "mapped"
    path.write_bytes(bytes(2 * CHUNK))
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mm:
        mm[CHUNK - 2 : CHUNK + 2] = b"edge"
    mount.remount()
    data = path.read_bytes()
    assert data[CHUNK - 2 : CHUNK + 2] == b"edge"
    assert len(data) == 2 * CHUNK


def test_name_length_limits(workdir: Path) -> None:
    (workdir / ("n" * 255)).write_bytes(b"x")
    assert (workdir / ("n" * 255)).read_bytes() == b"x"
    assert errno_of(os.open, workdir / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG


def test_long_names_through_every_operation(workdir: Path) -> None:
    long_a, long_b = "a" * 255, "é" * 127  # 255 bytes each, whatever the backing encoding
    (workdir / long_a).write_bytes(b"long a")
    (workdir / "d").mkdir()
    os.rename(workdir / long_a, workdir / "d" / long_b)
    assert os.listdir(workdir / "d") == [long_b]
    assert (workdir / "d" / long_b).read_bytes() == b"long a"
    os.link(workdir / "d" / long_b, workdir / long_a)
    assert os.stat(workdir / long_a).st_nlink == 2
    os.symlink(long_a, workdir / ("s" * 250))
    assert os.readlink(workdir / ("s" * 250)) == long_a
    assert (workdir / ("s" * 250)).read_bytes() == b"long a"
    os.mkdir(workdir / ("D" * 255))
    (workdir / ("D" * 255) / long_a).write_bytes(b"deep")
    os.setxattr(workdir / long_a, "user." + "x" * 100, b"long xattr name")
    assert os.getxattr(workdir / long_a, "user." + "x" * 100) == b"long xattr name"
    # names whose encrypted form cannot be stored are refused with ERANGE, not mangled
    assert errno_of(os.setxattr, workdir / long_a, "user." + "x" * 240, b"v") == errno.ERANGE
    assert sorted(os.listdir(workdir)) == sorted([long_a, "d", "s" * 250, "D" * 255])
    os.unlink(workdir / "d" / long_b)
    os.rmdir(workdir / "d")
    os.unlink(workdir / ("D" * 255) / long_a)
    os.rmdir(workdir / ("D" * 255))
    assert sorted(os.listdir(workdir)) == sorted([long_a, "s" * 250])
    assert (workdir / long_a).read_bytes() == b"long a"


def test_reused_backing_inode_numbers_get_new_fuse_numbers(workdir: Path) -> None:
    """rmdir then mkdir often reuses the backing inode while the kernel still knows the old
    directory (here: a process's working directory). The new directory must be another,
    usable inode, not the removed one."""
    script = (
        "import os, sys\n"
        "base = sys.argv[1]\n"
        "for n in range(30):\n"
        "    path = os.path.join(base, 'again')\n"
        "    os.mkdir(path)\n"
        "    os.chdir(path)\n"
        "    old = os.stat('.').st_ino\n"
        "    os.rmdir(path)\n"
        "    os.mkdir(path)\n"
        "    with open(os.path.join(path, 'inside'), 'wb') as f:\n"
        "        f.write(b'x' * n)\n"
        "    assert open(os.path.join(path, 'inside'), 'rb').read() == b'x' * n\n"
        "    assert os.stat(path).st_ino != old\n"
        "    os.chdir(base)\n"
        "    os.unlink(os.path.join(path, 'inside'))\n"
        "    os.rmdir(path)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(workdir)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_mount_sets_its_read_ahead_and_dirty_budget(shared_mount: Mount) -> None:
    """1 MiB read-ahead (the kernel's READ size follows it) and 5% of the dirty limit."""
    device = os.stat(shared_mount.mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}")
    wanted = {"read_ahead_kb": "1024", "max_ratio": "5"}
    deadline = time.monotonic() + 10

    def current() -> dict[str, str]:
        return {name: (bdi / name).read_text().strip() for name in wanted}

    while current() != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current() == wanted
