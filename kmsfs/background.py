"""Run a kmsfs command detached (keyd, a mount) and wait until it says it is ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kmsfs.errors import KmsfsError

READY = b"R"


def report_ready(ready_fd: int | None) -> None:
    """Tell the parent of a detached command that it is up (no-op in the foreground)."""
    if ready_fd is not None:
        os.write(ready_fd, READY)
        os.close(ready_fd)


def start_detached(
    argv: list[str], log_path: Path, *, what: str, passphrase: bytes | None = None
) -> int:
    """Run ``kmsfs <argv> --ready-fd N`` in its own session, logging to ``log_path``.

    Returns the child's pid once it has called :func:`report_ready`; raises with the
    last line of its log if it exits first. A passphrase reaches the child through a
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
    last_line = _last_line(log_path)
    raise KmsfsError(f"{what} did not start (exit status {code}): {last_line}")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
