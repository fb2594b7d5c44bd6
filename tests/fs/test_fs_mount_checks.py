"""``kmsfs mount`` refuses mistakes in one line: a non-empty mountpoint, the same cipher
directory twice, a dead mountpoint left by a killed mount; and creates a missing
mountpoint, as ``mount --mkdir`` does."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.kms.client import KMSClient
from tests.conftest import KMSFS
from tests.fs.helpers import MountFactory, is_mounted, mount_area

pytestmark = pytest.mark.slow


@pytest.fixture
def area(mounts: MountFactory) -> Iterator[Path]:
    """A directory for this test's mountpoints, cleaned up at the end (helpers.mount_area)."""
    with mount_area(mounts.root, "chk") as path:
        yield path


def kmsfs_mount(
    mounts: MountFactory, cipher: Path, mnt: Path, *args: str, foreground: bool = False
) -> subprocess.CompletedProcess[str]:
    """``kmsfs mount`` detached (it returns once mounted) or, for commands expected to be
    refused, in the foreground; a foreground mount that does start is unmounted again."""
    command = [*KMSFS, "mount", str(cipher), str(mnt), "--keyd-socket", str(mounts.keyd.socket)]
    if foreground:
        command.append("-f")
    else:
        command += ["--log-file", str(mnt.parent / f"{mnt.name}.log")]
    process = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mounts.keyd.env,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a foreground mount that was not refused
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        stdout, stderr = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def dead_mount(mounts: MountFactory, cipher: Path, mnt: Path) -> None:
    """Mount ``cipher`` on ``mnt`` and kill the mount process: ``mnt`` stays a mount
    whose every use fails with ENOTCONN (a stat may still answer from the kernel's
    attribute cache; statfs always asks the filesystem)."""
    mount = mounts.mount(cipher, mnt)
    mount.kill9()
    with pytest.raises(OSError) as raised:
        os.statvfs(mnt)
    assert raised.value.errno == errno.ENOTCONN
    assert is_mounted(mnt)


# -------------------------------------------------------------- the mountpoint
def test_missing_mountpoint_is_created(mounts: MountFactory, area: Path) -> None:
    cipher = mounts.init()
    mnt = area / "new" / "mnt"
    result = kmsfs_mount(mounts, cipher, mnt)
    assert result.returncode == 0, result.stderr
    assert is_mounted(mnt)
    (mnt / "file").write_bytes(b"kept")
    assert (mnt / "file").read_bytes() == b"kept"


@pytest.mark.parametrize("foreground", [False, True], ids=["detached", "foreground"])
def test_nonempty_mountpoint_is_refused(mounts: MountFactory, area: Path, foreground: bool) -> None:
    mnt = area / "full"
    mnt.mkdir()
    (mnt / "mine").write_text("hidden by a mount")
    result = kmsfs_mount(mounts, mounts.init(), mnt, foreground=foreground)
    assert_one_line_error(result, "not empty", "nonempty")
    assert not is_mounted(mnt)
    assert (mnt / "mine").read_text() == "hidden by a mount"


@pytest.mark.parametrize("flag", [("-o", "rw,nonempty"), ("--nonempty",)], ids=["o", "flag"])
def test_nonempty_mountpoint_with_nonempty(
    mounts: MountFactory, area: Path, flag: tuple[str, ...]
) -> None:
    mnt = area / "full"
    mnt.mkdir()
    (mnt / "mine").write_text("hidden by a mount")
    result = kmsfs_mount(mounts, mounts.init(), mnt, *flag)
    assert result.returncode == 0, result.stderr
    assert is_mounted(mnt)
    assert os.listdir(mnt) == []
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert (mnt / "mine").read_text() == "hidden by a mount"


def test_a_file_as_mountpoint_is_refused(mounts: MountFactory, area: Path) -> None:
    target = area / "plain"
    target.write_text("x")
    assert_one_line_error(kmsfs_mount(mounts, mounts.init(), target), "not a directory")


# ------------------------------------------------------- one mount at a time
@pytest.mark.parametrize("foreground", [False, True], ids=["detached", "foreground"])
def test_same_cipherdir_twice_is_refused(
    mounts: MountFactory, area: Path, foreground: bool
) -> None:
    cipher = mounts.init()
    first = mounts.mount(cipher, area / "one")
    (area / "two").mkdir()
    result = kmsfs_mount(mounts, cipher, area / "two", foreground=foreground)
    assert_one_line_error(result, "already mounted", str(area / "one"))
    assert result.returncode == 10  # in use (kmsfs.cli.errors.EXIT_STATUSES)
    assert not is_mounted(area / "two")
    assert first.alive


def test_the_lock_of_a_mount_that_is_ending_is_waited_for(tmp_path: Path) -> None:
    """kmsfs umount returns once the kernel let go, a moment before the mount process
    exits and its lock goes: a mount of a cipher directory mounted nowhere waits for its
    lock (here held by this test, released by a timer) instead of failing at once."""
    from kmsfs.fs.mount import lock_cipherdir

    holder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(0.3, os.close, (holder,))
    release.start()
    try:
        fd = lock_cipherdir(tmp_path)
        assert fd is not None
        os.close(fd)
    finally:
        release.join()


def test_a_killed_mount_leaves_no_lock(mounts: MountFactory, area: Path) -> None:
    cipher = mounts.init()
    dead_mount(mounts, cipher, area / "one")
    second = mounts.mount(cipher, area / "two")  # the flock went with the process
    assert second.alive


# ---------------------------------------------------------------- dead mounts
def test_dead_mount_of_the_same_cipherdir_is_cleared(mounts: MountFactory, area: Path) -> None:
    cipher = mounts.init()
    mnt = area / "dead"
    dead_mount(mounts, cipher, mnt)
    result = kmsfs_mount(mounts, cipher, mnt)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert is_mounted(mnt)
    (mnt / "again").write_bytes(b"alive")
    assert os.listdir(mnt) == ["again"]


def test_dead_mount_of_another_cipherdir_is_explained(mounts: MountFactory, area: Path) -> None:
    mnt = area / "dead"
    dead_mount(mounts, mounts.init(), mnt)
    for foreground in (False, True):
        result = kmsfs_mount(mounts, mounts.init(), mnt, foreground=foreground)
        assert_one_line_error(result, str(mnt), "not connected", "kmsfs umount --lazy")
    with pytest.raises(OSError):  # left as it was
        os.statvfs(mnt)
    result = subprocess.run(
        [*KMSFS, "umount", "--lazy", str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []  # the directory under it, usable again


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace, setpriv)")
def test_a_user_without_access_to_dev_fuse_gets_one_line(keyd_factory, short_tmp: Path) -> None:
    """A non-root user who cannot open /dev/fuse (mode 0600, as in many containers; libfuse
    then gives up before fusermount3): one line naming /dev/fuse and what to do, no
    traceback. The device is shadowed by a root-only copy in a private mount namespace."""
    keyd = keyd_factory()
    keyd.init()
    sockets = short_tmp / "sockets"
    sockets.mkdir(mode=0o755)
    keyd.socket = sockets / "keyd.sock"
    keyd.start("--socket-mode", "0666")
    env = {**keyd.env, "KMSFS_KEYD_UID": "0"}
    cipher, mnt = short_tmp / "cipher", short_tmp / "mnt"
    subprocess.run([*KMSFS, "keys", "create", "--alias", "alias/u"], env=env, check=True)
    subprocess.run([*KMSFS, "init", str(cipher), "--key", "alias/u"], env=env, check=True)
    # the key's policy lets uid 65534 use it (the default names only root and the creator)
    with KMSClient(keyd.socket) as client:
        arn = client.describe_key("alias/u")["KeyMetadata"]["Arn"]
        account = arn.split(":")[4]
        nobody = f"arn:aws:iam::{account}:user/{pwd.getpwuid(65534).pw_name}"
        statement = {
            "Effect": "Allow",
            "Principal": {"AWS": [f"arn:aws:iam::{account}:root", nobody]},
            "Action": "kms:*",
            "Resource": "*",
        }
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        client.call("PutKeyPolicy", {"KeyId": arn, "PolicyName": "default", "Policy": policy})
    mnt.mkdir()
    short_tmp.chmod(0o755)
    for path in (cipher, *cipher.rglob("*"), mnt):
        os.chown(path, 65534, 65534)
    device = short_tmp / "fuse"
    os.mknod(device, 0o600 | 0o020000, os.makedev(10, 229))  # a root-only /dev/fuse
    script = (
        f"mount --bind {device} /dev/fuse && exec setpriv --reuid=65534 --regid=65534 "
        f'--clear-groups -- "$@"'
    )
    command = [*KMSFS, "mount", "-f", str(cipher), str(mnt), "--keyd-socket", str(keyd.socket)]
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command],
        env={**env, "HOME": str(mnt)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if is_mounted(mnt):  # not expected: never leave it behind
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert result.returncode == 9, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "cannot open /dev/fuse" in errors[0], result.stderr
