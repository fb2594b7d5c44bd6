"""Keep a process's keys out of core dumps, other processes' reach and swap.

Both processes that hold plaintext keys call :func:`harden_process` first thing: keyd
(the CMKs) and the mount (the metadata key and files' data keys).

- No core dumps (``RLIMIT_CORE`` 0) and not dumpable (``prctl(PR_SET_DUMPABLE, 0)``):
  no core file, and processes of the same user cannot ptrace it or read its memory
  through ``/proc/<pid>/mem``; its ``/proc/<pid>`` files become root's.
- Memory locked (``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``: each page from
  when it is first touched) where that cannot hurt: when the process may lock without
  limit (``CAP_IPC_LOCK``, as root, or ``RLIMIT_MEMLOCK`` unlimited). Under a finite
  limit the kernel refuses the call if the process already maps more than the limit
  (every Python process does, with the usual 8 MiB), and if it accepted it, every
  allocation past the limit would then fail: so it is not attempted, and that is
  logged, as is any refusal.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
CAP_IPC_LOCK = 14


def harden_process(log: logging.Logger) -> list[str]:
    """Disable core dumps and ptrace, lock memory where allowed.

    Returns what could not be done, each already logged as a warning on ``log``.
    """
    problems: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        problems.append(f"cannot disable core dumps: {exc}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
    limit = memory_lock_limit()
    if limit is not None:
        problems.append(
            f"memory not locked: RLIMIT_MEMLOCK is {limit} bytes and the process lacks "
            "CAP_IPC_LOCK (run as root or with an unlimited RLIMIT_MEMLOCK); "
            "keys may be swapped out"
        )
    elif not _lock_all_memory(libc):
        code = ctypes.get_errno()
        hint = (
            " (raise RLIMIT_MEMLOCK or run as root)" if code in (errno.ENOMEM, errno.EPERM) else ""
        )
        problems.append(f"mlockall failed: {os.strerror(code)}{hint}; keys may be swapped out")
    for problem in problems:
        log.warning("%s", problem)
    return problems


def _lock_all_memory(libc: ctypes.CDLL) -> bool:
    """mlockall, locking pages as they are touched (MCL_ONFAULT, Linux 4.4) if possible.

    Without MCL_ONFAULT the kernel makes every page of every mapping resident at once,
    touched or not (whole allocator arenas, thread stacks): a mount's RSS under load
    went from ~80 to ~175 MiB. Secrets are only ever in touched pages.
    """
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return True
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: a kernel without MCL_ONFAULT
        return False
    return libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0


def memory_lock_limit() -> int | None:
    """The bytes this process may lock, or None if it may lock without limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or _has_effective_capability(CAP_IPC_LOCK):
        return None
    return soft


def is_dumpable() -> bool:
    """``prctl(PR_GET_DUMPABLE)``: whether the process may be dumped and ptraced."""
    return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


def _has_effective_capability(capability: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except (OSError, ValueError):
        return False
    return False
