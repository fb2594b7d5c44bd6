"""Run a kmsfs command detached (keyd, a mount) and wait until it says it is ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kmsfs.errors import KmsfsError

READY = b"R"
ERROR_PREFIX = "kmsfs: error: "  # how kmsfs.cli.errors starts a failure's line


def report_ready(ready_fd: int | None) -> None:
    """Tell the parent of a detached command that it is up (no-op in the foreground)."""
    if ready_fd is not None:
        os.write(ready_fd, READY)
        os.close(ready_fd)


def start_detached(
    argv: list[str], log_path: Path, *, what: str, passphrase: bytes | None = None
) -> int:
    """Run ``kmsfs <argv> --ready-fd N`` in its own session, logging to ``log_path``.

    Returns the child's pid once it has called :func:`report_ready`; raises
    :class:`DetachedStartFailed` (the child's exit status, the last line of its log) if
    it exits first. A passphrase reaches the child through a
    pipe (``--passphrase-fd``), never through argv or the environment.
    """
    ready_read, ready_write = os.pipe()
    pass_fds = [ready_write]
    extra = ["--ready-fd", str(ready_write)]
    secret_read = None
    if passphrase is not None:
        secret_read, secret_write = os.pipe()
        os.write(secret_write, passphrase)
        os.close(secret_write)
        pass_fds.append(secret_read)
        extra += ["--passphrase-fd", str(secret_read)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "kmsfs.cli", *argv, *extra],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
        os.close(ready_write)
        if secret_read is not None:
            os.close(secret_read)
    with os.fdopen(ready_read, "rb") as ready:
        answer = ready.read(1)
    if answer == READY:
        return child.pid
    code = child.wait()
    raise DetachedStartFailed(what, code, _last_line(log_path))


class DetachedStartFailed(KmsfsError):
    """A detached command exited before it was ready. The parent exits with the child's
    status (128+N if a signal N killed it), so scripts see the real reason, and repeats
    its one-line error."""

    def __init__(self, what: str, child_status: int, last_line: str) -> None:
        if child_status < 0:
            reason = f"killed by signal {-child_status}; last log line: {last_line}"
            self.exit_code = 128 - child_status
        else:
            reason = last_line.removeprefix(ERROR_PREFIX)
            # a child that exits 0 without saying it is ready has still failed to start
            self.exit_code = child_status or 1
        super().__init__(f"{what} did not start: {reason}")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
