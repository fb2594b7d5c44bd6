"""Mounted by root with ``-o allow_other``: other users are checked as on ext4.

The other users are forked children that drop to uid/gid 65534 (nobody) or 1234.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.fs.helpers import ChildError, Mount, MountFactory, run_as_child

NOBODY = 65534
OTHER = 1234


def outcome(call) -> object:
    try:
        result = call()
    except OSError as error:
        return errno.errorcode.get(error.errno, error.errno)
    return "ok" if result is None else result


@pytest.fixture(scope="module")
def other_mount(fs_root: Path, fs_keyd) -> Mount:
    factory = MountFactory(fs_root, fs_keyd)
    try:
        # the kernel's checks only: key policies per user (forwarding, on by default
        # for a root mount) are tests/fs/test_forwarding_mount.py's
        mount = factory.mount(None, None, "-o", "allow_other", "--no-forward-callers")
        root = mount.mnt
        os.chmod(root, 0o755)
        (root / "secret").write_bytes(b"root only")
        os.chmod(root / "secret", 0o600)
        (root / "public").write_bytes(b"everyone may read")
        os.chmod(root / "public", 0o644)
        os.mkdir(root / "tmp")
        os.chmod(root / "tmp", 0o1777)
        (root / "tmp" / "rootfile").write_bytes(b"root's, in a sticky directory")
        os.chmod(root / "tmp" / "rootfile", 0o666)
        os.mkdir(root / "private")
        os.chmod(root / "private", 0o700)
        (root / "private" / "inner").write_bytes(b"hidden")
        os.chmod(root / "private" / "inner", 0o644)
        os.mkdir(root / "group")
        os.chown(root / "group", 0, 4321)
        os.chmod(root / "group", 0o2777)
        yield mount
    finally:
        factory.close()


def test_other_user_is_checked_like_ext4(other_mount: Mount) -> None:
    root = other_mount.mnt

    def as_nobody() -> dict[str, object]:
        results: dict[str, object] = {}
        results["read secret"] = outcome(lambda: (root / "secret").read_bytes())
        results["read public"] = outcome(lambda: (root / "public").read_bytes())
        results["write public"] = outcome(lambda: os.close(os.open(root / "public", os.O_RDWR)))
        results["create in root"] = outcome(lambda: (root / "mine").write_bytes(b""))
        results["list private"] = outcome(lambda: os.listdir(root / "private"))
        results["read through private"] = outcome(lambda: (root / "private" / "inner").read_bytes())
        results["chmod public"] = outcome(lambda: os.chmod(root / "public", 0o666))
        results["utime public"] = outcome(lambda: os.utime(root / "public", (1, 1)))
        results["create in tmp"] = outcome(lambda: (root / "tmp" / "mine").write_bytes(b"mine"))
        results["read own"] = outcome(lambda: (root / "tmp" / "mine").read_bytes())
        results["chmod own"] = outcome(lambda: os.chmod(root / "tmp" / "mine", 0o600))
        results["chown own to root"] = outcome(lambda: os.chown(root / "tmp" / "mine", 0, 0))
        results["mkdir in tmp"] = outcome(lambda: os.mkdir(root / "tmp" / "mydir", 0o750))
        results["symlink in tmp"] = outcome(lambda: os.symlink("mine", root / "tmp" / "mylink"))
        results["fifo in tmp"] = outcome(lambda: os.mkfifo(root / "tmp" / "myfifo", 0o600))
        results["xattr on own"] = outcome(
            lambda: os.setxattr(root / "tmp" / "mine", "user.owner", b"nobody")
        )
        results["xattr on root's"] = outcome(
            lambda: os.setxattr(root / "public", "user.owner", b"nobody")
        )
        results["write root's 0666 file"] = outcome(
            lambda: os.close(os.open(root / "tmp" / "rootfile", os.O_RDWR))
        )
        results["unlink root's in sticky"] = outcome(lambda: os.unlink(root / "tmp" / "rootfile"))
        results["rename root's in sticky"] = outcome(
            lambda: os.rename(root / "tmp" / "rootfile", root / "tmp" / "stolen")
        )
        results["access secret R"] = os.access(root / "secret", os.R_OK)
        results["access public R"] = os.access(root / "public", os.R_OK)
        results["access public W"] = os.access(root / "public", os.W_OK)
        results["create in group dir"] = outcome(
            lambda: (root / "group" / "shared").write_bytes(b"group")
        )
        return results

    results = run_as_child(as_nobody, uid=NOBODY)
    assert results == {
        "read secret": "EACCES",
        "read public": b"everyone may read",
        "write public": "EACCES",
        "create in root": "EACCES",
        "list private": "EACCES",
        "read through private": "EACCES",
        "chmod public": "EPERM",
        "utime public": "EPERM",
        "create in tmp": 4,
        "read own": b"mine",
        "chmod own": "ok",
        "chown own to root": "EPERM",
        "mkdir in tmp": "ok",
        "symlink in tmp": "ok",
        "fifo in tmp": "ok",
        "xattr on own": "ok",
        "xattr on root's": "EACCES",
        "write root's 0666 file": "ok",
        "unlink root's in sticky": "EPERM",
        "rename root's in sticky": "EPERM",
        "access secret R": False,
        "access public R": True,
        "access public W": False,
        "create in group dir": 5,
    }
    # what they made is theirs, at the mountpoint and in the cipher directory
    for name in ("mine", "mydir", "mylink", "myfifo"):
        path = root / "tmp" / name
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
        backing = os.lstat(other_mount.backing(path))
        assert (backing.st_uid, backing.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(root / "tmp" / "mine").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "tmp" / "mydir").st_mode) == 0o750
    assert os.getxattr(root / "tmp" / "mine", "user.owner") == b"nobody"
    assert (root / "tmp" / "rootfile").exists()
    assert os.stat(root / "group" / "shared").st_uid == NOBODY

    # a third user may not remove nobody's file from the sticky directory; nobody may
    def as_other() -> object:
        return outcome(lambda: os.unlink(root / "tmp" / "mine"))

    assert run_as_child(as_other, uid=OTHER) == "EPERM"
    assert run_as_child(as_other, uid=NOBODY) == "ok"
    assert not (root / "tmp" / "mine").exists()
    assert other_mount.alive


def test_set_group_id_directory_group_for_other_users(other_mount: Mount) -> None:
    root = other_mount.mnt
    run_as_child(lambda: (root / "group" / "by-nobody").write_bytes(b"x"), uid=NOBODY)
    run_as_child(lambda: os.mkdir(root / "group" / "dir-by-nobody"), uid=NOBODY)
    assert os.stat(root / "group" / "by-nobody").st_gid == 4321
    assert os.stat(root / "group" / "dir-by-nobody").st_gid == 4321
    assert os.stat(root / "group" / "dir-by-nobody").st_mode & stat.S_ISGID


def test_without_allow_other_other_users_are_shut_out(shared_mount: Mount) -> None:
    with pytest.raises(ChildError) as caught:
        run_as_child(lambda: os.stat(shared_mount.mnt), uid=NOBODY)
    assert caught.value.errno == errno.EACCES
