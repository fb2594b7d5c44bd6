"""Mounting through mount(8): an /etc/fstab line (``mount -a -T``), ``mount -t fuse.kmsfs``,
mount.fuse3 running ``kmsfs SOURCE MOUNTPOINT -o ...``, and the option parsing behind them
(kmsfs/fs/fstab.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs.fstab import (
    kmsfs_mount_argv,
    parse_duration,
    parse_helper_args,
    parse_options,
)
from kmsfs.fs.mount import MountOptions, fuse_options
from tests.fs.helpers import MountFactory, is_mounted, mount_area

VENV_BIN = Path(sys.executable).parent
HELPER = VENV_BIN / "mount.kmsfs"


def dotless_kmsfs(area: Path) -> Path:
    """A link to this checkout's ``kmsfs`` on a path without dots: in a type
    ``fuse.PATH`` mount(8) finds no helper when PATH has a dot (util-linux 2.38 takes
    the part before the last dot for the helper's name), and .venv has one."""
    link = area / "bin" / "kmsfs"
    link.parent.mkdir()
    link.symlink_to(VENV_BIN / "kmsfs")
    assert "." not in str(link)
    return link


# ------------------------------------------------------------------ parsing
def test_kernel_options_go_to_fuse_and_the_last_word_wins() -> None:
    parsed = parse_options(["rw,nosuid,nodev", "noexec,noatime,suid,dirsync,sync"])
    assert parsed.read_only is False
    assert set(parsed.kernel_options) == {"suid", "nodev", "noexec", "noatime", "dirsync", "sync"}
    options = MountOptions(kernel_options=parsed.kernel_options)
    assert {"suid", "nodev", "noexec", "noatime"} <= fuse_options(options)


def test_userspace_options_are_ignored() -> None:
    given = "defaults,auto,noauto,user,nouser,users,owner,group,_netdev,nofail"
    given += ",x-systemd.requires=kmsfs-keyd.service,x-systemd.automount,X-mount.mkdir,comment=x"
    parsed = parse_options([given])
    assert parsed.kernel_options == ()
    assert parsed.settings == {}
    assert "x-systemd.requires=kmsfs-keyd.service" in parsed.ignored


def test_kmsfs_options_are_checked_and_converted() -> None:
    parsed = parse_options(
        ["ro,allow_other,nonempty,keyd_socket=/run/k.sock,keyd_uid=kmsfs,key_cache_seconds=30"]
        + ["idle=1h30m,busy_poll_us=0,max_dirty_ratio=10,log_file=/var/log/k.log,relatime"]
    )
    assert (parsed.read_only, parsed.allow_other, parsed.nonempty) == (True, True, True)
    assert parsed.settings == {
        "keyd_socket": "/run/k.sock",
        "keyd_uid": "kmsfs",
        "key_cache_seconds": 30.0,
        "idle": 5400.0,
        "busy_poll_us": 0,
        "max_dirty_ratio": 10,
        "log_file": "/var/log/k.log",
    }


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("bogus", ["unknown mount option 'bogus'", "nosuid"]),
        ("lazytime", ["not supported by FUSE"]),
        ("keyd_socket", ["needs a value"]),
        ("keyd_socket=", ["needs a value"]),
        ("key_cache_seconds=soon", ["key_cache_seconds"]),
        ("max_dirty_ratio=0", ["from 1 to 100"]),
        ("idle=10 minutes", ["not a duration"]),
    ],
)
def test_bad_options_are_one_clear_error(option: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as raised:
        parse_options([f"rw,{option},nosuid"])
    for word in words:
        assert word in str(raised.value)
    assert "\n" not in str(raised.value)


def test_sloppy_ignores_unknown_options() -> None:
    assert parse_options(["bogus,nosuid"], sloppy=True).kernel_options == ("nosuid",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("2h45m", 9900), ("500ms", 0.5), ("90", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "-5s", "1h 2m", "nan", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_helper_arguments_as_mount_and_mount_fuse3_pass_them() -> None:
    call = parse_helper_args(["/c", "/m", "-o", "rw,nosuid,_netdev", "-n", "-t", "fuse.kmsfs"])
    assert (call.cipherdir, call.mountpoint, call.options) == ("/c", "/m", ["rw,nosuid,_netdev"])
    assert kmsfs_mount_argv(call) == ["mount", "/c", "/m", "-o", "rw,nosuid"]
    assert parse_helper_args(["/c", "/m", "-sfv"]).fake
    for bad in (["/c"], ["/c", "/m", "/x"], ["/c", "/m", "-o"], ["/c", "/m", "--foo"]):
        with pytest.raises(UsageError):
            parse_helper_args(bad)


# -------------------------------------------------------- through mount(8)
pytestmark_mount = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) needs root")


def mount_options_of(mnt: Path) -> set[str]:
    """The per-mount (VFS) options of ``mnt`` in /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == str(mnt):
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def source_of(mnt: Path) -> tuple[str, str]:
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == str(mnt):
                after = fields[fields.index("-") + 1 :]
                return after[0], after[1]
    raise AssertionError(f"{mnt} is not mounted")


@pytest.fixture
def area(mounts: MountFactory) -> Iterator[Path]:
    """A directory for this test's mountpoints, cleaned up at the end (helpers.mount_area)."""
    with mount_area(mounts.root, "fstab") as path:
        yield path


def run(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, env=env, timeout=120
    )


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def assert_works(mnt: Path) -> None:
    (mnt / "hello").write_bytes(b"through mount(8)")
    assert (mnt / "hello").read_bytes() == b"through mount(8)"


@pytestmark_mount
def test_fstab_line_with_mount_a(mounts: MountFactory, area: Path) -> None:
    cipher, mnt = mounts.init(), area / "boot"
    options = (
        "nosuid,nodev,noexec,noatime,_netdev,nofail,x-systemd.requires=kmsfs-keyd.service,"
        "X-mount.mkdir,"
        f"keyd_socket={mounts.keyd.socket},key_cache_seconds=30,log_file={area}/boot.log"
    )
    fstab = area / "fstab"
    # gocryptfs's documented form, the program's path after "fuse.": mount.fuse3 runs
    # "PATH CIPHERDIR MOUNTPOINT -o OPTIONS", nothing to install in /sbin
    fstab.write_text(f"# kmsfs\n{cipher} {mnt} fuse.{dotless_kmsfs(area)} {options} 0 0\n")
    result = run("mount", "-a", "-T", fstab)
    assert result.returncode == 0, result.stderr + log_of(area / "boot.log")
    assert is_mounted(mnt)  # created by mount(8) (X-mount.mkdir: it checks before kmsfs can)
    assert {"nosuid", "nodev", "noexec", "noatime"} <= mount_options_of(mnt)
    assert source_of(mnt) == ("fuse.kmsfs", str(cipher))
    assert_works(mnt)
    again = run("mount", "-a", "-T", fstab)  # mounted already: mount(8) skips the line
    assert again.returncode == 0, again.stderr
    result = run("umount", mnt)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)


@pytestmark_mount
def test_fstab_bad_option_is_one_line(mounts: MountFactory, area: Path) -> None:
    cipher, mnt = mounts.init(), area / "bad"
    fstab = area / "fstab"
    fstab.write_text(
        f"{cipher} {mnt} fuse.{dotless_kmsfs(area)} X-mount.mkdir,nosuid,strictatime 0 0\n"
    )
    result = run("mount", "-a", "-T", fstab)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "kmsfs: error: mount option 'strictatime' is not supported" in result.stderr
    assert not is_mounted(mnt)


@pytest.fixture
def sbin_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.kmsfs -> this checkout's mount.kmsfs, removed afterwards."""
    link = Path("/sbin/mount.fuse.kmsfs")
    if link.exists() or link.is_symlink():
        pytest.skip(f"{link} exists already; not touching it")
    link.symlink_to(HELPER)
    try:
        yield link
    finally:
        link.unlink()


@pytestmark_mount
def test_mount_t_fuse_kmsfs(mounts: MountFactory, area: Path, sbin_helper: Path) -> None:
    cipher, mnt = mounts.init(), area / "typed"
    mnt.mkdir()
    options = f"ro,nodev,keyd_socket={mounts.keyd.socket},log_file={area}/typed.log"
    result = run("mount", "-t", "fuse.kmsfs", cipher, mnt, "-o", options)
    assert result.returncode == 0, result.stderr + log_of(area / "typed.log")
    assert {"ro", "nodev"} <= mount_options_of(mnt)
    assert source_of(mnt) == ("fuse.kmsfs", str(cipher))
    with pytest.raises(OSError):
        (mnt / "x").write_bytes(b"")
    result = run("umount", mnt)
    assert result.returncode == 0, result.stderr


@pytestmark_mount
def test_mount_fuse3_runs_the_kmsfs_command(mounts: MountFactory, area: Path) -> None:
    """Without /sbin/mount.fuse.kmsfs, mount(8) runs mount.fuse3, which runs
    ``kmsfs SOURCE MOUNTPOINT -o OPTIONS`` from PATH (mount(8) resets PATH to the
    standard one, which has /usr/local/bin: here mount.fuse3 is run directly with this
    checkout's bin first)."""
    mount_fuse3 = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"
    cipher, mnt = mounts.init(), area / "fuse3"
    mnt.mkdir()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    options = f"nosuid,keyd_socket={mounts.keyd.socket},log_file={area}/fuse3.log"
    result = run(mount_fuse3, cipher, mnt, "-t", "fuse.kmsfs", "-o", options, env=env)
    assert result.returncode == 0, result.stderr + log_of(area / "fuse3.log")
    assert "nosuid" in mount_options_of(mnt)
    assert "nodev" not in mount_options_of(mnt)  # mount.fuse3 added dev: as asked
    assert_works(mnt)
    assert run("umount", mnt).returncode == 0


def test_the_line_kmsfs_systemd_units_shows_is_accepted() -> None:
    """`kmsfs systemd-units` prints an fstab line (kmsfs.systemd.fstab_line): its options
    all reach the helper as mount(8)'s own, ignored, with nothing refused."""
    from kmsfs.systemd import fstab_line

    options = fstab_line("/srv/c", "/srv/m", keyd_socket="/run/k/keyd.sock").split()[3]
    parsed = parse_options([options])
    assert sorted(parsed.kernel_options) == ["nodev", "nosuid"]
    assert "x-systemd.requires=kmsfs-keyd.service" in parsed.ignored
    assert "X-mount.mkdir" in parsed.ignored
    assert "keyd_socket=/run/k/keyd.sock" not in parsed.ignored
