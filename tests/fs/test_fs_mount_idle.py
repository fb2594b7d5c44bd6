"""``kmsfs mount --idle DURATION`` (``-o idle=``) unmounts after that long with no request
and no open file, as gocryptfs ``-idle`` and CryFS ``--unmount-idle`` do."""

from __future__ import annotations

import os
import time

import pytest

from tests.fs.helpers import MountFactory, is_mounted

pytestmark = pytest.mark.slow

#: how long a test waits for something that must happen (a deadline, not a measure)
DEADLINE = 60.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE} s"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [("--idle", "1s"), ("-o", "idle=1s")], ids=["flag", "option"])
def test_an_unused_mount_unmounts_itself(mounts: MountFactory, how: tuple[str, str]) -> None:
    mount = mounts.mount(None, None, *how)
    (mount.mnt / "file").write_bytes(b"written before going idle")
    assert mount.process is not None
    code = mount.process.wait(timeout=DEADLINE)
    assert code == 0, mount.log()
    assert not is_mounted(mount.mnt)
    assert "unused for 1 s: unmounting" in mount.log()
    again = mounts.mount(mount.cipher, mount.mnt)  # nothing was lost
    assert (again.mnt / "file").read_bytes() == b"written before going idle"


def test_an_open_file_keeps_the_mount(mounts: MountFactory) -> None:
    mount = mounts.mount(None, None, "--idle", "0.2s", "--debug")
    fd = os.open(mount.mnt / "held", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        # every idle check (each 0.02 s) logs that the mount is in use: wait for enough
        # of them to cover several idle periods, with no request at all meanwhile
        wait_for(lambda: mount.log().count("idle check: in use") >= 40, "40 idle checks")
        assert is_mounted(mount.mnt)
        assert mount.alive
    finally:
        os.close(fd)
    assert mount.process is not None
    assert mount.process.wait(timeout=DEADLINE) == 0, mount.log()
    assert not is_mounted(mount.mnt)
