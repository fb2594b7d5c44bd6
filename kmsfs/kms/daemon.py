"""keyd as a process: harden it, unseal the keystore, serve until told to stop.

``run_keyd`` is what ``kmsfs keyd serve`` runs in the foreground; ``-d`` runs that same
command detached (:func:`kmsfs.background.start_detached`) and returns once the child
reports that its socket is listening (or has failed, with the child's one-line error).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import signal
from pathlib import Path

import trio

from kmsfs.background import report_ready
from kmsfs.kms.audit import AuditLog
from kmsfs.kms.keystore import Keystore, RootKeySource, check_keystore_permissions
from kmsfs.kms.server import serve
from kmsfs.kms.service import KeyService

log = logging.getLogger("kmsfs.keyd")

PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2
AUDIT_SYNC_INTERVAL = 1.0


def harden_process() -> list[str]:
    """No core dumps, no ptrace by other processes of this user, memory locked.

    Returns what could not be done (each already logged): an unprivileged user
    usually may not lock all of its memory (RLIMIT_MEMLOCK).
    """
    problems: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        problems.append(f"cannot disable core dumps: {exc}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        code = ctypes.get_errno()
        hint = (
            " (raise RLIMIT_MEMLOCK or run as root)" if code in (errno.ENOMEM, errno.EPERM) else ""
        )
        problems.append(f"mlockall failed: {os.strerror(code)}{hint}; keys may be swapped out")
    for problem in problems:
        log.warning("%s", problem)
    return problems


def open_service(
    keystore_dir: Path, source: RootKeySource
) -> tuple[Keystore, AuditLog, KeyService]:
    check_keystore_permissions(keystore_dir)
    keystore = Keystore.open(keystore_dir, source)
    try:
        audit = AuditLog.open(keystore.audit_path)
    except BaseException:
        keystore.close()
        raise
    return keystore, audit, KeyService(keystore, audit)


def run_keyd(
    keystore_dir: Path,
    source: RootKeySource,
    socket_path: Path,
    *,
    socket_mode: int = 0o600,
    maintenance_interval: float = 60.0,
    ready_fd: int | None = None,
) -> None:
    """Serve keyd in this process until SIGTERM or SIGINT."""
    harden_process()
    keystore, audit, service = open_service(keystore_dir, source)
    try:
        trio.run(
            _serve_until_signalled,
            service,
            audit,
            socket_path,
            socket_mode,
            maintenance_interval,
            ready_fd,
        )
    finally:
        audit.close()
        keystore.close()
    log.info("keyd stopped")


async def _serve_until_signalled(
    service: KeyService,
    audit: AuditLog,
    socket_path: Path,
    socket_mode: int,
    maintenance_interval: float,
    ready_fd: int | None,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve(
                    service,
                    socket_path,
                    socket_mode=socket_mode,
                    maintenance_interval=maintenance_interval,
                    task_status=task_status,
                )
            )
            nursery.start_soon(_sync_audit_periodically, audit)
            log.info("keyd listening on %s (pid %d)", socket_path, os.getpid())
            report_ready(ready_fd)
            async for signum in signals:
                log.info("keyd received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _sync_audit_periodically(audit: AuditLog) -> None:
    while True:
        await trio.sleep(AUDIT_SYNC_INTERVAL)
        await trio.to_thread.run_sync(audit.sync)
