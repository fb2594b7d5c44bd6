"""What pjdfstest checks, as tests of our own (``scripts/pjdfstest`` runs pjdfstest itself).

Each test runs on a mount with ``-o allow_other`` in both naming modes (encrypted names,
kmsfs's default, and ``--plaintext-names``): every file type through chmod, chown, link,
rename and unlink; operations as other users (forked children that drop to uid/gid 65534
or 1234) and the errors POSIX and Linux give them; sticky directories; rename's edge
cases; utimensat with UTIME_NOW and UTIME_OMIT; which operations move ctime. The
expected values are ext4's (Linux), checked by hand on ext4 when the tests were written.
Paths near PATH_MAX and huge truncates are in their own tests.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fs.helpers import Mount, MountFactory, run_as_child

NOBODY = 65534
OTHER = 1234
GROUP = 4321

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    """utimensat(2) with (seconds, nanoseconds) pairs; nanoseconds may be UTIME_NOW/OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def outcome(call: Callable[[], object]) -> object:
    """'ok', the call's result, or the errno name it failed with."""
    try:
        result = call()
    except OSError as error:
        return errno.errorcode.get(error.errno, error.errno)
    return "ok" if result is None else result


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def owner_of(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


CLOCK_REALTIME_COARSE = 5  # <linux/time.h>; not in Python's time module


def tick(timestamp_ns: int) -> None:
    """Return once every new inode timestamp will be later than ``timestamp_ns``.

    Linux stamps inodes (ext4, tmpfs, and the FUSE kernel for the times it keeps) with
    current_time(): the coarse real-time clock, which moves once a jiffy (1-4 ms), or
    since 6.13 a fine-grained time when the old one was looked at, which is never before
    the coarse clock. So once the coarse clock has passed ``timestamp_ns``, any change
    stamps a later time: wait that long (a jiffy at most), not a fixed time.
    """
    deadline = time.monotonic() + 10  # a stopped clock is a failure, not a hang
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= timestamp_ns:
        assert time.monotonic() < deadline, "the coarse clock does not move"
        time.sleep(0.0005)


# ------------------------------------------------------------------ fixtures
class BackingDir:
    """A plain directory beside the cipher directories, standing in for a mount.

    The same tests run on it first: it shows that what they expect is what the
    filesystem under kmsfs does.
    """

    def __init__(self, path: Path) -> None:
        self.mnt = path
        self.alive = True

    def log(self) -> str:
        return ""


@pytest.fixture(scope="module", params=["backing", "encrypted", "plaintext"])
def posix_mount(request: pytest.FixtureRequest, fs_root: Path, fs_keyd) -> Iterator[Mount]:
    if request.param == "backing":
        path = fs_root / f"plain-{uuid.uuid4().hex[:6]}"
        path.mkdir(mode=0o755)
        yield BackingDir(path)  # type: ignore[misc]
        return
    with MountFactory(fs_root, fs_keyd) as factory:
        cipher = factory.init(plaintext_names=request.param == "plaintext")
        # POSIX rules only: per-user key policies (forwarding, on by default for a
        # root mount) are tests/fs/test_forwarding_mount.py's
        mount = factory.mount(cipher, None, "-o", "allow_other", "--no-forward-callers")
        os.chmod(mount.mnt, 0o755)
        yield mount


@pytest.fixture
def place(posix_mount: Mount) -> Iterator[Path]:
    """A fresh directory (0755, root's) of the allow_other mount for one test."""
    assert posix_mount.alive, posix_mount.log()
    path = posix_mount.mnt / f"t{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    yield path
    assert posix_mount.alive, f"the mount died during the test:\n{posix_mount.log()}"


def sticky_dir(parent: Path, name: str = "tmp") -> Path:
    path = parent / name
    path.mkdir()
    os.chmod(path, 0o1777)
    return path


FILE_TYPE_BITS = {
    "regular": stat.S_IFREG,
    "directory": stat.S_IFDIR,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "symlink": stat.S_IFLNK,
}
FILE_TYPES = list(FILE_TYPE_BITS)


def make(path: Path, kind: str) -> None:
    if kind == "regular":
        path.write_bytes(b"contents")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o644)
    elif kind == "char":
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    elif kind == "block":
        os.mknod(path, stat.S_IFBLK | 0o644, os.makedev(7, 200))
    elif kind == "symlink":
        os.symlink("some/target", path)
    else:
        raise AssertionError(kind)


# ---------------------------------------------------------- every file type
@pytest.mark.parametrize("kind", FILE_TYPES)
def test_every_file_type_chmod_chown_link_rename_unlink(
    place: Path, posix_mount: Mount, kind: str
) -> None:
    path = place / "entry"
    make(path, kind)
    st = os.lstat(path)
    file_type = stat.S_IFMT(st.st_mode)
    assert file_type == FILE_TYPE_BITS[kind]
    on_a_mount = isinstance(posix_mount, Mount)  # the backing baseline has no backing entry
    if on_a_mount:
        assert os.lstat(posix_mount.backing(path)).st_mode == st.st_mode
    if kind in ("char", "block"):
        assert st.st_rdev == (os.makedev(1, 3) if kind == "char" else os.makedev(7, 200))
    ino = st.st_ino

    if kind != "symlink":  # Linux has no lchmod
        os.chmod(path, 0o640)
        assert os.lstat(path).st_mode == file_type | 0o640
        os.chmod(path, 0o1751 if kind == "directory" else 0o6751)
        assert os.lstat(path).st_mode == file_type | (0o1751 if kind == "directory" else 0o6751)
    ctime = os.lstat(path).st_ctime_ns
    tick(ctime)
    os.chown(path, OTHER, GROUP, follow_symlinks=False)
    after = os.lstat(path)
    assert (after.st_uid, after.st_gid) == (OTHER, GROUP)
    assert after.st_ctime_ns > ctime
    if on_a_mount:
        assert owner_of(posix_mount.backing(path)) == (OTHER, GROUP)
    if kind == "directory":
        assert after.st_mode == file_type | 0o1751
    elif kind != "symlink":  # chown clears set-user-ID, and set-group-ID of a group-executable
        assert after.st_mode == file_type | 0o751

    if kind != "directory":
        link = place / "link"
        os.link(path, link, follow_symlinks=False)
        assert os.lstat(link).st_ino == ino
        assert os.lstat(path).st_nlink == 2
    else:
        link = None

    moved = place / "moved"
    os.rename(path, moved)
    assert not os.path.lexists(path)
    assert os.lstat(moved).st_ino == ino
    assert stat.S_IFMT(os.lstat(moved).st_mode) == file_type
    assert sorted(os.listdir(place)) == (["link", "moved"] if link else ["moved"])

    if kind == "directory":
        os.rmdir(moved)
    else:
        os.unlink(moved)
        assert link is not None and os.lstat(link).st_nlink == 1
        os.unlink(link)
    assert os.listdir(place) == []


# ------------------------------------------------------------- other users
def test_entries_made_by_another_user_keep_the_mode_asked_for(place: Path) -> None:
    """Set-ID bits survive the ownership kmsfs hands over (a root chown would clear them)."""
    tmp = sticky_dir(place)
    group_dir = place / "group"
    group_dir.mkdir()
    os.chown(group_dir, 0, GROUP)
    os.chmod(group_dir, 0o2777)

    def as_nobody() -> dict[str, object]:
        os.umask(0)
        results: dict[str, object] = {}
        # in a set-group-ID directory of a group nobody is not in, S_ISGID is dropped
        os.close(os.open(group_dir / "f", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o6755))
        results["in group dir"] = oct(mode_of(group_dir / "f"))
        for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("both", 0o6777), ("plain", 0o640)):
            os.close(os.open(tmp / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode))
            results[name] = oct(mode_of(tmp / name))
        os.mknod(tmp / "fifo", stat.S_IFIFO | 0o4755)
        results["fifo"] = oct(mode_of(tmp / "fifo"))
        os.mknod(tmp / "socket", stat.S_IFSOCK | 0o2775)
        results["socket"] = oct(mode_of(tmp / "socket"))
        os.mkdir(tmp / "dir", 0o1777)
        results["dir"] = oct(mode_of(tmp / "dir"))
        return results

    assert run_as_child(as_nobody, uid=NOBODY) == {
        "suid": "0o4755",
        "sgid": "0o2755",
        "both": "0o6777",
        "plain": "0o640",
        "fifo": "0o4755",
        "socket": "0o2775",
        "dir": "0o1777",
        "in group dir": "0o4755",
    }
    assert owner_of(group_dir / "f") == (NOBODY, GROUP)
    for name in ("suid", "sgid", "both", "plain", "fifo", "socket", "dir"):
        assert owner_of(tmp / name) == (NOBODY, NOBODY), name


def test_other_users_get_posix_permission_errors(place: Path) -> None:
    os.chmod(place, 0o777)
    for name, mode in (("r644", 0o644), ("rw666", 0o666), ("suid", 0o4777), ("setid", 0o6777)):
        (place / name).write_bytes(b"root's data")
        os.chmod(place / name, mode)
    (place / "nobodys").write_bytes(b"nobody's")
    os.chown(place / "nobodys", NOBODY, GROUP)  # a group nobody is not in
    os.chmod(place / "nobodys", 0o644)
    (place / "sub").mkdir()
    os.chmod(place / "sub", 0o755)

    def as_nobody() -> dict[str, object]:
        results: dict[str, object] = {}
        results["truncate 644"] = outcome(lambda: os.truncate(place / "r644", 0))
        results["truncate 666"] = outcome(lambda: os.truncate(place / "rw666", 3))
        results["utime now 644"] = outcome(lambda: os.utime(place / "r644"))
        results["utime now 666"] = outcome(lambda: os.utime(place / "rw666"))
        results["utime set 666"] = outcome(lambda: os.utime(place / "rw666", ns=(1, 1)))
        results["utimensat omit 644"] = outcome(
            lambda: utimensat(place / "r644", (0, UTIME_OMIT), (0, UTIME_OMIT))
        )
        results["chmod root's"] = outcome(lambda: os.chmod(place / "r644", 0o600))
        results["chown root's"] = outcome(lambda: os.chown(place / "r644", NOBODY, NOBODY))
        results["chown own to other"] = outcome(lambda: os.chown(place / "nobodys", OTHER, -1))
        results["chgrp own to foreign"] = outcome(lambda: os.chown(place / "nobodys", -1, 0))
        results["chgrp own to own"] = outcome(lambda: os.chown(place / "nobodys", -1, NOBODY))
        results["chmod own"] = outcome(lambda: os.chmod(place / "nobodys", 0o2755))
        results["write setuid"] = outcome(
            lambda: (place / "suid").write_bytes(b"nobody was here") and None
        )
        results["truncate setid"] = outcome(lambda: os.truncate(place / "setid", 1))
        results["create in sub"] = outcome(lambda: (place / "sub" / "f").write_bytes(b""))
        results["mkdir in sub"] = outcome(lambda: os.mkdir(place / "sub" / "d"))
        results["rename out of sub"] = outcome(lambda: os.rename(place / "sub", place / "s2"))
        results["unlink root's"] = outcome(lambda: os.unlink(place / "r644"))
        results["rename root's"] = outcome(lambda: os.rename(place / "rw666", place / "moved"))
        return results

    results = run_as_child(as_nobody, uid=NOBODY)
    assert results == {
        "truncate 644": "EACCES",
        "truncate 666": "ok",
        "utime now 644": "EACCES",
        "utime now 666": "ok",
        "utime set 666": "EPERM",
        "utimensat omit 644": "ok",
        "chmod root's": "EPERM",
        "chown root's": "EPERM",
        "chown own to other": "EPERM",
        "chgrp own to foreign": "EPERM",
        "chgrp own to own": "ok",
        "chmod own": "ok",
        "write setuid": "ok",
        "truncate setid": "ok",
        "create in sub": "EACCES",
        "mkdir in sub": "EACCES",
        "rename out of sub": "ok",  # 0777 parent: a directory's own mode does not matter
        "unlink root's": "ok",
        "rename root's": "ok",
    }
    assert (place / "rw666").exists() is False and (place / "moved").read_bytes() == b"roo"
    assert (place / "r644").exists() is False
    # chmod g+s of a file whose group (now nobody's own) the owner is in keeps it
    assert mode_of(place / "nobodys") == 0o2755
    assert owner_of(place / "nobodys") == (NOBODY, NOBODY)
    # a write or a truncate by someone else clears the set-ID bits
    assert mode_of(place / "suid") == 0o777
    assert (place / "suid").read_bytes() == b"nobody was here"
    assert mode_of(place / "setid") == 0o777
    assert (place / "setid").read_bytes() == b"r"


def test_open_truncate_clears_set_id_bits_as_truncate_does(place: Path) -> None:
    """open(O_TRUNC) by anyone but root clears set-ID bits, as truncate(2) does.

    With atomic_o_trunc the kernel leaves the truncation, and so this, to the filesystem.
    """
    os.chmod(place, 0o777)
    modes = {"suid": 0o4777, "sgid-x": 0o2777, "sgid-nox": 0o2767, "both": 0o6777}
    for name, mode in {**modes, "roots": 0o6777}.items():
        (place / name).write_bytes(b"root's data")
        os.chmod(place / name, mode)

    def as_nobody() -> dict[str, object]:
        results: dict[str, object] = {}
        for name in modes:
            os.close(os.open(place / name, os.O_WRONLY | os.O_TRUNC))
            results[name] = oct(mode_of(place / name))
        return results

    assert run_as_child(as_nobody, uid=NOBODY) == {
        "suid": "0o777",
        "sgid-x": "0o777",
        "sgid-nox": "0o767",  # nobody is not in the file's group
        "both": "0o777",
    }
    for name in modes:
        assert (place / name).read_bytes() == b"", name
    os.close(os.open(place / "roots", os.O_WRONLY | os.O_TRUNC))  # root keeps them
    assert mode_of(place / "roots") == 0o6777


def test_chmod_set_group_id_by_owner_outside_the_group_is_dropped(place: Path) -> None:
    tmp = sticky_dir(place)
    (tmp / "f").write_bytes(b"x")
    os.chown(tmp / "f", NOBODY, GROUP)

    def as_nobody() -> object:
        os.chmod(tmp / "f", 0o2755)
        return oct(mode_of(tmp / "f"))

    assert run_as_child(as_nobody, uid=NOBODY) == "0o755"


def test_sticky_directory_rules(place: Path) -> None:
    tmp = sticky_dir(place)
    (tmp / "roots").write_bytes(b"root's")
    os.chmod(tmp / "roots", 0o666)
    (tmp / "rootdir").mkdir()
    os.chmod(tmp / "rootdir", 0o777)

    def as_nobody() -> dict[str, object]:
        (tmp / "mine").write_bytes(b"nobody's")
        os.mkdir(tmp / "mydir")
        return {
            "unlink root's": outcome(lambda: os.unlink(tmp / "roots")),
            "rmdir root's": outcome(lambda: os.rmdir(tmp / "rootdir")),
            "rename root's away": outcome(lambda: os.rename(tmp / "roots", tmp / "x")),
            "rename mine over root's": outcome(lambda: os.rename(tmp / "mine", tmp / "roots")),
            "rename mydir over root's dir": outcome(
                lambda: os.rename(tmp / "mydir", tmp / "rootdir")
            ),
            "write root's 0666": outcome(lambda: (tmp / "roots").write_bytes(b"changed") and None),
            "rename own": outcome(lambda: os.rename(tmp / "mine", tmp / "mine2")),
        }

    assert run_as_child(as_nobody, uid=NOBODY) == {
        "unlink root's": "EPERM",
        "rmdir root's": "EPERM",
        "rename root's away": "EPERM",
        "rename mine over root's": "EPERM",
        "rename mydir over root's dir": "EPERM",
        "write root's 0666": "ok",
        "rename own": "ok",
    }

    def as_other() -> dict[str, object]:
        return {
            "unlink nobody's": outcome(lambda: os.unlink(tmp / "mine2")),
            "rmdir nobody's": outcome(lambda: os.rmdir(tmp / "mydir")),
        }

    assert run_as_child(as_other, uid=OTHER) == {
        "unlink nobody's": "EPERM",
        "rmdir nobody's": "EPERM",
    }
    # the directory's owner may remove anything in it
    os.chown(tmp, OTHER, OTHER)
    assert run_as_child(as_other, uid=OTHER) == {"unlink nobody's": "ok", "rmdir nobody's": "ok"}
    assert sorted(os.listdir(tmp)) == ["rootdir", "roots"]
    assert (tmp / "roots").read_bytes() == b"changed"


# ------------------------------------------------------------------ rename
def test_rename_edge_cases(place: Path) -> None:
    (place / "d" / "sub").mkdir(parents=True)
    (place / "d" / "sub" / "f").write_bytes(b"deep")
    (place / "full").mkdir()
    (place / "full" / "x").write_bytes(b"x")
    (place / "empty").mkdir()
    (place / "file").write_bytes(b"file")

    assert outcome(lambda: os.rename(place / "d", place / "d" / "sub" / "d")) == "EINVAL"
    assert outcome(lambda: os.rename(place / "d", place / "full")) == "ENOTEMPTY"
    assert outcome(lambda: os.rename(place / "file", place / "empty")) == "EISDIR"
    assert outcome(lambda: os.rename(place / "d", place / "file")) == "ENOTDIR"
    assert outcome(lambda: os.rename(place / "missing", place / "x")) == "ENOENT"
    assert outcome(lambda: os.rename(place / "file", place / "nodir" / "x")) == "ENOENT"
    assert outcome(lambda: renameat2(place / "file", place / "d", RENAME_NOREPLACE)) == "EEXIST"
    assert (place / "full" / "x").read_bytes() == b"x"

    # onto itself, and between two links of one file: nothing happens
    os.rename(place / "file", place / "file")
    os.link(place / "file", place / "hard")
    os.rename(place / "file", place / "hard")
    assert (place / "file").read_bytes() == (place / "hard").read_bytes() == b"file"
    assert os.stat(place / "file").st_nlink == 2

    # a directory over an empty one, then listed and walked below its new name
    ino = os.stat(place / "d").st_ino
    os.rename(place / "d", place / "empty")
    assert os.stat(place / "empty").st_ino == ino
    assert os.listdir(place / "empty") == ["sub"]
    assert (place / "empty" / "sub" / "f").read_bytes() == b"deep"
    # into another directory: '..' follows, the parents' link counts too
    links = os.stat(place).st_nlink
    os.rename(place / "empty", place / "full" / "moved")
    assert os.stat(place / "full" / "moved" / "..").st_ino == os.stat(place / "full").st_ino
    assert os.stat(place).st_nlink == links - 1
    assert os.stat(place / "full").st_nlink == 3
    (place / "full" / "moved" / "sub" / "new").write_bytes(b"new")
    assert sorted(os.listdir(place / "full" / "moved" / "sub")) == ["f", "new"]

    # exchange a directory with a file in another directory
    renameat2(place / "full" / "moved", place / "hard", RENAME_EXCHANGE)
    assert (place / "full" / "moved").read_bytes() == b"file"
    assert sorted(os.listdir(place / "hard" / "sub")) == ["f", "new"]
    assert (place / "hard" / "sub" / "new").read_bytes() == b"new"
    assert sorted(os.listdir(place)) == ["file", "full", "hard"]


def test_rename_updates_ctime_and_keeps_open_files(place: Path) -> None:
    path = place / "a"
    path.write_bytes(b"open")
    fd = os.open(path, os.O_RDWR)
    try:
        ctime = os.stat(path).st_ctime_ns
        tick(ctime)
        (place / "other").mkdir()
        os.rename(path, place / "other" / "b")
        moved = place / "other" / "b"
        assert os.stat(moved).st_ctime_ns > ctime
        os.pwrite(fd, b"-written", 4)
        os.fsync(fd)
        assert os.fstat(fd).st_ino == os.stat(moved).st_ino
    finally:
        os.close(fd)
    assert moved.read_bytes() == b"open-written"


# --------------------------------------------------------------- utimensat
@pytest.mark.parametrize("kind", ["regular", "directory", "fifo", "symlink"])
def test_utimensat_now_and_omit(place: Path, kind: str) -> None:
    path = place / "e"
    make(path, kind)
    flags = AT_SYMLINK_NOFOLLOW if kind == "symlink" else 0
    utimensat(path, (1_000_000_000, 111), (1_100_000_000, 222), flags)
    st = os.lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_000_000_000_000_000_111,
        1_100_000_000_000_000_222,
    )

    utimensat(path, (0, UTIME_OMIT), (1_200_000_000, 333), flags)  # mtime only
    st = os.lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_000_000_000_000_000_111,
        1_200_000_000_000_000_333,
    )

    utimensat(path, (1_300_000_000, 444), (0, UTIME_OMIT), flags)  # atime only
    st = os.lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_300_000_000_000_000_444,
        1_200_000_000_000_000_333,
    )

    ctime = st.st_ctime_ns
    tick(ctime)
    utimensat(path, (0, UTIME_OMIT), (0, UTIME_OMIT), flags)  # nothing at all
    assert os.lstat(path).st_ctime_ns == ctime

    before = time.time_ns() - 1_000_000_000
    utimensat(path, (0, UTIME_OMIT), (0, UTIME_NOW), flags)
    st = os.lstat(path)
    assert st.st_atime_ns == 1_300_000_000_000_000_444
    assert st.st_mtime_ns >= before
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT), flags)
    assert os.lstat(path).st_atime_ns >= before

    # before 1970 and after 2038
    utimensat(path, (-1_000, 5), (2**33, 6), flags)
    st = os.lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_000 * 10**9 + 5, 2**33 * 10**9 + 6)
    if kind == "symlink":
        assert not os.path.exists(path)  # its target does not exist: nothing else was touched


# ------------------------------------------------------------------- ctime
def test_ctime_moves_with_every_change_and_not_with_reads(place: Path) -> None:
    path = place / "f"
    path.write_bytes(b"data")
    os.symlink("f", place / "l")

    def changes(step: Callable[[], object], target: Path = path) -> bool:
        before = os.lstat(target).st_ctime_ns
        tick(before)
        step()
        return os.lstat(target).st_ctime_ns != before

    def write() -> None:
        with open(path, "r+b") as handle:
            handle.write(b"D")

    assert changes(lambda: os.chmod(path, 0o600))
    assert changes(lambda: os.chown(path, OTHER, -1))
    assert changes(lambda: os.truncate(path, 2))
    assert changes(write)
    assert changes(lambda: os.utime(path, ns=(5, 5)))
    assert changes(lambda: os.setxattr(path, "user.k", b"v"))
    assert changes(lambda: os.link(path, place / "g"))
    assert changes(lambda: os.unlink(place / "g"))
    assert changes(lambda: os.chown(place / "l", OTHER, -1, follow_symlinks=False), place / "l")
    assert changes(lambda: (place / "new").write_bytes(b""), place)
    assert changes(lambda: os.unlink(place / "new"), place)
    assert not changes(lambda: path.read_bytes())
    assert not changes(lambda: os.stat(path))
    assert not changes(lambda: os.listdir(place), place)
    assert not changes(lambda: os.readlink(place / "l"), place / "l")


# ------------------------------------------------------------ . and .. in readdir
def listed_with_inodes(path: Path) -> list[tuple[str, int]]:
    """What getdents(2) returns for ``path`` (ls -a -i, unsorted): (name, d_ino) pairs."""
    listed = subprocess.run(
        ["ls", "-a", "-i", "-1", "-U", str(path)], capture_output=True, text=True, check=True
    )
    pairs = [line.split(maxsplit=1) for line in listed.stdout.splitlines()]
    return [(name, int(ino)) for ino, name in pairs]


def test_a_listing_has_dot_and_dot_dot(place: Path) -> None:
    """getdents returns '.' and '..' with their inode numbers, as on ext4 and gocryptfs
    (``ls -a`` showed neither; os.listdir leaves them out anyway)."""
    (place / "sub").mkdir()
    (place / "file").write_bytes(b"x")
    for directory, parent in ((place, place.parent), (place / "sub", place)):
        listed = listed_with_inodes(directory)
        expected = [(".", os.stat(directory).st_ino), ("..", os.stat(parent).st_ino)]
        expected += [(name, os.lstat(directory / name).st_ino) for name in os.listdir(directory)]
        assert sorted(listed) == sorted(expected)  # in any order (ext4's is its hash order)
    # a second listing through the same descriptor, and one that starts over
    fd = os.open(place, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(os.listdir(fd)) == ["file", "sub"]
        assert sorted(os.listdir(fd)) == ["file", "sub"]
    finally:
        os.close(fd)


# ------------------------------------------------------------ unlinked files
def test_an_unlinked_file_still_open_takes_chmod_chown_times_and_truncate(place: Path) -> None:
    """fchmod, fchown, futimens and ftruncate of an open file whose last link is gone
    change it, as on ext4 (gocryptfs answers ENOENT to the first three)."""
    path = place / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        os.fchmod(fd, 0o600)
        os.fchown(fd, OTHER, GROUP)
        os.utime(fd, ns=(5, 6))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink) == (
            0o600,
            OTHER,
            GROUP,
            0,
        )
        assert (st.st_atime_ns, st.st_mtime_ns) == (5, 6)
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
        assert os.pread(fd, 10, 0) == b"da"
    finally:
        os.close(fd)


def test_an_unlinked_file_open_nowhere(place: Path, posix_mount: Mount) -> None:
    """Reached only through an O_PATH descriptor (which opens no FUSE handle), an unlinked
    file is still changed by chmod, chown and truncate on ext4. kmsfs has no descriptor of
    the backing file any more, whose name is gone: ENOENT, as gocryptfs answers. Its
    attributes can still be read."""
    path = place / "f"
    path.write_bytes(b"data")
    before = os.stat(path)
    fd = os.open(path, os.O_PATH)
    try:
        os.unlink(path)
        through = f"/proc/self/fd/{fd}"
        outcomes = [
            outcome(lambda: os.chmod(through, 0o600)),
            outcome(lambda: os.chown(through, OTHER, GROUP)),
            outcome(lambda: os.truncate(through, 2)),
        ]
        st = os.stat(through)
        assert st.st_nlink == 0
        if isinstance(posix_mount, Mount):
            assert outcomes == ["ENOENT"] * 3
            assert (st.st_mode, st.st_uid, st.st_size) == (before.st_mode, before.st_uid, 4)
        else:
            assert outcomes == ["ok"] * 3
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size) == (0o600, OTHER, 2)
    finally:
        os.close(fd)
