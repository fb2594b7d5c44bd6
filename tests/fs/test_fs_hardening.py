"""The mount holds keys: like keyd it is not dumpable and locks its memory where allowed."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil

import pytest

from kmsfs.hardening import PR_SET_DUMPABLE, harden_process
from tests.fs.helpers import MountFactory, run_as_child
from tests.fs.test_fs_memory import memory_report

NOBODY = 65534


def locked_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/PID/status")


@pytest.mark.skipif(os.geteuid() != 0, reason="root may lock all of its memory")
def test_mount_process_is_not_dumpable_and_locks_its_memory(mounts: MountFactory) -> None:
    mount = mounts.mount()
    assert mount.process is not None
    assert memory_report(mount)["dumpable"] == 0  # prctl(PR_GET_DUMPABLE) in the mount
    assert locked_kib(mount.process.pid) > 0, mount.log()  # mlockall
    assert "not locked" not in mount.log() and "mlockall" not in mount.log()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("prlimit") is None or shutil.which("setpriv") is None,
    reason="needs root, prlimit and setpriv to take CAP_IPC_LOCK away",
)
def test_mount_logs_that_it_cannot_lock_memory_and_works_anyway(mounts: MountFactory) -> None:
    # root without CAP_IPC_LOCK, RLIMIT_MEMLOCK 0: as an unprivileged user would be
    without_lock = (
        "prlimit",
        "--memlock=0:0",
        "setpriv",
        "--inh-caps=-ipc_lock",
        "--bounding-set=-ipc_lock",
        "--",
    )
    mount = mounts.mount(None, None, wrapper=without_lock)
    assert mount.process is not None
    (mount.mnt / "file").write_bytes(b"still works")
    assert (mount.mnt / "file").read_bytes() == b"still works"
    assert "memory not locked: RLIMIT_MEMLOCK is 0 bytes" in mount.log()
    assert locked_kib(mount.process.pid) == 0
    assert memory_report(mount)["dumpable"] == 0


def _harden_as_unprivileged_user() -> tuple[int, int, list[str]]:
    # setuid() left this child non-dumpable; a user's freshly started process is dumpable
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("kmsfs.test-hardening")
    log.addHandler(handler)
    owner_before = os.stat(f"/proc/{os.getpid()}/status").st_uid
    harden_process(log)
    owner_after = os.stat(f"/proc/{os.getpid()}/status").st_uid
    return owner_before, owner_after, records


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_harden_process_as_a_user_is_not_dumpable_and_logs_the_refused_lock() -> None:
    owner_before, owner_after, records = run_as_child(_harden_as_unprivileged_user, uid=NOBODY)
    # a process that is not dumpable has its /proc/PID files owned by root
    assert (owner_before, owner_after) == (NOBODY, 0)
    assert records == [
        "memory not locked: RLIMIT_MEMLOCK is 0 bytes and the process lacks CAP_IPC_LOCK "
        "(run as root or with an unlimited RLIMIT_MEMLOCK); keys may be swapped out"
    ]
