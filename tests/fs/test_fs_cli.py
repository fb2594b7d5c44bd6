"""`kmsfs init`, `kmsfs mount` (foreground and detached), `kmsfs umount`, and `-o ro`."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import KMSFS, Keyd
from tests.fs.helpers import MountFactory, is_mounted


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The command failed with exactly one line on stderr; return it."""
    assert result.returncode != 0, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr.decode()}"
    assert lines[0].startswith("kmsfs: error: "), lines[0]
    return lines[0]


def errno_of(function, *args, **kwargs) -> int:
    with pytest.raises(OSError) as caught:
        function(*args, **kwargs)
    return caught.value.errno


# ------------------------------------------------------------------ init
def test_init_writes_a_config_without_secrets(fs_keyd: Keyd, mounts: MountFactory) -> None:
    cipher = mounts.root / "fresh-init"
    result = fs_keyd.kmsfs("init", str(cipher), "--key", "alias/fs", "--chunk-size", "4096")
    assert result.returncode == 0
    import json

    config = json.loads((cipher / "kmsfs.conf").read_text())
    assert config["chunk_size"] == 4096
    assert config["key_arn"].startswith("arn:aws:kms:")
    assert re.fullmatch(r"[0-9a-f]{32}", config["filesystem_id"])
    assert "Plaintext" not in (cipher / "kmsfs.conf").read_text()


def test_init_refuses_non_empty_directory(fs_keyd: Keyd, mounts: MountFactory) -> None:
    cipher = mounts.root / "not-empty"
    cipher.mkdir()
    (cipher / "something").write_bytes(b"x")
    line = one_error_line(fs_keyd.kmsfs("init", str(cipher), "--key", "alias/fs", check=False))
    assert "not empty" in line
    assert sorted(os.listdir(cipher)) == ["something"]


def test_init_refuses_unknown_key(fs_keyd: Keyd, mounts: MountFactory) -> None:
    cipher = mounts.root / "unknown-key"
    result = fs_keyd.kmsfs("init", str(cipher), "--key", "alias/no-such-key", check=False)
    line = one_error_line(result)
    assert "alias/no-such-key" in line or "unknown" in line.lower()
    assert not (cipher / "kmsfs.conf").exists()


def test_init_refuses_disabled_key(fs_keyd: Keyd, mounts: MountFactory) -> None:
    fs_keyd.kmsfs("keys", "create", "--alias", "alias/off")
    fs_keyd.kmsfs("keys", "disable", "alias/off")
    cipher = mounts.root / "disabled-key"
    line = one_error_line(fs_keyd.kmsfs("init", str(cipher), "--key", "alias/off", check=False))
    assert "Disabled" in line or "disabled" in line
    assert not (cipher / "kmsfs.conf").exists()


def test_init_with_keyd_down(fs_keyd: Keyd, mounts: MountFactory) -> None:
    cipher = mounts.root / "no-keyd"
    result = fs_keyd.kmsfs(
        "init", str(cipher), "--key", "alias/fs", "--keyd-socket", "/tmp/no-such.sock", check=False
    )
    one_error_line(result)
    assert not (cipher / "kmsfs.conf").exists()


# ------------------------------------------------------------------ mount errors
def mount_command(keyd: Keyd, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*KMSFS, "mount", *args], capture_output=True, env=keyd.env, timeout=60, check=False
    )


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "detached"])
def test_mount_missing_mountpoint(fs_keyd: Keyd, mounts: MountFactory, foreground: bool) -> None:
    cipher = mounts.init()
    # a missing mountpoint is created (test_fs_mount_checks.py): one that cannot be is not
    not_a_dir = mounts.root / f"a-file-{foreground}"
    not_a_dir.write_text("")
    missing = not_a_dir / "no-such-mountpoint"
    flags = ["-f"] if foreground else ["--log-file", str(mounts.root / "detached.log")]
    result = mount_command(fs_keyd, *flags, str(cipher), str(missing))
    line = one_error_line(result)
    assert "does not exist" in line or "no-such-mountpoint" in line
    assert not is_mounted(missing)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "detached"])
def test_mount_with_keyd_down(fs_keyd: Keyd, mounts: MountFactory, foreground: bool) -> None:
    cipher = mounts.init()
    mnt = mounts.root / f"mnt-keyd-down-{foreground}"
    mnt.mkdir()
    flags = ["-f"] if foreground else ["--log-file", str(mounts.root / "detached.log")]
    result = mount_command(
        fs_keyd, *flags, str(cipher), str(mnt), "--keyd-socket", "/tmp/no-such-keyd.sock"
    )
    line = one_error_line(result)
    assert "keyd" in line
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []


def test_mount_errors_one_line_each(fs_keyd: Keyd, mounts: MountFactory) -> None:
    mnt = mounts.root / "mnt-errors"
    mnt.mkdir()
    not_cipher = mounts.root / "plain-dir"
    not_cipher.mkdir()
    line = one_error_line(mount_command(fs_keyd, "-f", str(not_cipher), str(mnt)))
    assert "kmsfs.conf" in line or "cipher" in line
    line = one_error_line(mount_command(fs_keyd, "-f", str(mounts.root / "nothing"), str(mnt)))
    assert "does not exist" in line
    line = one_error_line(mount_command(fs_keyd, "-f", str(mounts.init()), str(mnt), "-o", "bogus"))
    assert "bogus" in line
    assert not is_mounted(mnt)


def test_mount_on_a_mountpoint_in_use(fs_keyd: Keyd, mounts: MountFactory) -> None:
    mount = mounts.mount()
    (mount.mnt / "f").write_bytes(b"first mount")
    line = one_error_line(mount_command(fs_keyd, "-f", str(mounts.init()), str(mount.mnt)))
    assert "mountpoint" in line or "mounted" in line
    assert mount.alive
    assert (mount.mnt / "f").read_bytes() == b"first mount"


def test_mount_disabled_key(fs_keyd: Keyd, mounts: MountFactory) -> None:
    fs_keyd.kmsfs("keys", "create", "--alias", "alias/later-off")
    cipher = mounts.init(key="alias/later-off")
    fs_keyd.kmsfs("keys", "disable", "alias/later-off")
    mnt = mounts.root / "mnt-disabled"
    mnt.mkdir()
    try:
        line = one_error_line(mount_command(fs_keyd, "-f", str(cipher), str(mnt)))
        assert "Disabled" in line or "disabled" in line
        assert not is_mounted(mnt)
    finally:
        fs_keyd.kmsfs("keys", "enable", "alias/later-off")


# ------------------------------------------------------------------ detached mount
def test_detached_mount_and_umount(fs_keyd: Keyd, mounts: MountFactory) -> None:
    cipher = mounts.init()
    mnt = mounts.root / "mnt-detached"
    mnt.mkdir()
    log = mounts.root / "detached-ok.log"
    result = mount_command(
        fs_keyd, str(cipher), str(mnt), "--keyd-socket", str(fs_keyd.socket), "--log-file", str(log)
    )
    pid = None
    try:
        assert result.returncode == 0, result.stderr.decode()
        match = re.search(r"pid (\d+)", result.stdout.decode())
        assert match, result.stdout
        pid = int(match.group(1))
        assert is_mounted(mnt)  # ready when the command returns
        (mnt / "f").write_bytes(b"detached")
        assert (mnt / "f").read_bytes() == b"detached"
        umount = subprocess.run(
            [*KMSFS, "umount", str(mnt)], capture_output=True, env=fs_keyd.env, timeout=60
        )
        assert umount.returncode == 0, umount.stderr.decode()
        assert not is_mounted(mnt)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid), "the detached mount process outlived its unmount"
        assert "mounted" in log.read_text()
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    line = one_error_line(
        subprocess.run([*KMSFS, "umount", str(mnt)], capture_output=True, env=fs_keyd.env)
    )
    assert str(mnt) in line or "mount" in line


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ read-only
def test_read_only_mount(mounts: MountFactory) -> None:
    mount = mounts.mount()
    (mount.mnt / "dir").mkdir()
    (mount.mnt / "dir" / "f").write_bytes(b"read me")
    os.setxattr(mount.mnt / "dir" / "f", "user.tag", b"value")
    os.symlink("f", mount.mnt / "dir" / "link")
    mount.remount("-o", "ro")
    f = mount.mnt / "dir" / "f"
    assert f.read_bytes() == b"read me"
    assert (mount.mnt / "dir" / "link").read_bytes() == b"read me"
    assert os.getxattr(f, "user.tag") == b"value"
    assert sorted(os.listdir(mount.mnt / "dir")) == ["f", "link"]
    assert errno_of(os.open, f, os.O_WRONLY) == errno.EROFS
    assert errno_of(os.open, f, os.O_RDWR | os.O_TRUNC) == errno.EROFS
    assert errno_of(os.open, mount.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o600) == errno.EROFS
    assert errno_of(os.mkdir, mount.mnt / "newdir") == errno.EROFS
    assert errno_of(os.unlink, f) == errno.EROFS
    assert errno_of(os.rename, f, mount.mnt / "dir" / "g") == errno.EROFS
    assert errno_of(os.chmod, f, 0o600) == errno.EROFS
    assert errno_of(os.truncate, f, 0) == errno.EROFS
    assert errno_of(os.setxattr, f, "user.other", b"x") == errno.EROFS
    assert errno_of(os.symlink, "x", mount.mnt / "l2") == errno.EROFS
    assert errno_of(os.link, f, mount.mnt / "h") == errno.EROFS
    assert errno_of(os.utime, f, (1, 1)) == errno.EROFS
    assert not os.access(f, os.W_OK)
    assert os.statvfs(mount.mnt).f_flag & os.ST_RDONLY
    assert mount.alive
    assert f.read_bytes() == b"read me"
