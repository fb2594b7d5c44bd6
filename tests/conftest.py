"""Fixtures shared by the whole suite: short temporary directories and real keyd processes.

Every keyd a test starts is stopped in teardown, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

KMSFS = [sys.executable, "-m", "kmsfs.cli"]


def run_kmsfs(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run the kmsfs command; on unexpected failure show its stderr."""
    result = subprocess.run([*KMSFS, *args], input=input, capture_output=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(
            f"kmsfs {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}"
        )
    return result


@pytest.fixture(scope="session", autouse=True)
def private_user_config() -> Iterator[Path]:
    """A keyd serving on a socket other than the default records it in the per-user
    config (kmsfs.kms.paths.remember_keyd_socket), where every later command would find
    it. For the suite, ``$XDG_CONFIG_HOME/kmsfs`` is a plain file: nothing is recorded
    (not in the real ~/.config, and no test's keyd is found by another test's command).
    A test about the per-user config sets its own ``XDG_CONFIG_HOME``."""
    path = Path(tempfile.mkdtemp(prefix="kmsfs-xdg-config-", dir="/tmp"))
    (path / "kmsfs").write_text("tests: no per-user kmsfs config\n")
    saved = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = saved
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (Unix socket paths must be < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kmsfs-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Keyd:
    """One keyd process on a temporary keystore and socket."""

    workdir: Path
    keystore: Path
    root_key: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "keyd-stderr.log"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KMSFS_KEYD_SOCKET": str(self.socket),
            "KMSFS_KEYSTORE": str(self.keystore),
        }

    def init(self) -> None:
        run_kmsfs(
            "keyd", "init", "--keystore", str(self.keystore), "--root-key-file", str(self.root_key)
        )

    def serve_args(self, *extra: str, root_key: bool = True) -> list[str]:
        """``keyd serve`` on this keyd's keystore and socket (and root key file)."""
        args = ["keyd", "serve", "--keystore", str(self.keystore), "--socket", str(self.socket)]
        if root_key:
            args += ["--root-key-file", str(self.root_key)]
        return [*args, *extra]

    def start(
        self,
        *extra: str,
        root_key: bool = True,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """Serve; ``prefix`` runs keyd under another command (setpriv: another user)."""
        assert self.process is None or self.process.poll() is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *KMSFS, *self.serve_args(*extra, root_key=root_key)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        import socket as socketlib

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"keyd exited {self.process.returncode}: {self.log()}")
            probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                probe.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        raise AssertionError(f"keyd did not listen within {timeout} s: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        code = self.process.returncode
        self.process = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def client(self):
        from kmsfs.kms.client import KMSClient

        return KMSClient(self.socket)

    def kmsfs(self, *args: str, input: bytes | None = None, check: bool = True):
        return run_kmsfs(*args, input=input, env=self.env, check=check)


@pytest.fixture
def keyd_factory(short_tmp: Path) -> Iterator[Callable[..., Keyd]]:
    """Make (initialised, not yet started) keyds; all are stopped at teardown."""
    made: list[Keyd] = []

    def make(name: str = "k") -> Keyd:
        workdir = short_tmp / name
        workdir.mkdir()
        keyd = Keyd(workdir, workdir / "ks", workdir / "root.key", workdir / "s.sock")
        made.append(keyd)
        return keyd

    try:
        yield make
    finally:
        for keyd in made:
            keyd.stop()


@pytest.fixture
def live_keyd(keyd_factory: Callable[..., Keyd]) -> Keyd:
    """A running keyd on a fresh keystore protected by a root key file."""
    instance = keyd_factory()
    instance.init()
    instance.start()
    return instance


@contextlib.contextmanager
def mounted_tmpfs(size: str, mode: int = 0o755, prefix: str = "ktmpfs-") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (a full disk on demand), unmounted and removed at the end
    whatever happened (retried while a process still has it busy, then lazily)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:04o}", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
